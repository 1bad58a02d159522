"""CUDA kernels as torch custom ops, and their rows in the kernel registry (backend "cuda").

Importing this module needs neither a GPU nor triton: the ops import their Triton modules on
first call, and each row's `available()` names what this machine lacks (no CUDA device, compute
capability too low for FP8, no triton). Signatures match the reference kernels, so `lower` binds
either the same way:
  weight-only  (x, qweight, scales, zeros, bias, spec_json, shape)
  W8A8         (..., act_spec_json, act_scale)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ...ir.quant_spec import QuantSpec
from ...lowering.registry import KernelSpec
from . import hardware, layout

PRIORITIES = ("latency", "throughput", "memory")
WO_OP = "cuda_weight_only_linear"
FP8_OP = "cuda_w8a8_fp8_linear"
INT8_OP = "cuda_w8a8_int8_linear"


def _impl(name: str):
    """The Triton implementation module (imports triton), loaded on first use."""
    return importlib.import_module(f"{__package__}.{name}")


@dataclass(frozen=True)
class CudaKernelSpec(KernelSpec):
    """A registry row with the CUDA kernels' extra constraints, checked before the base ones."""

    granularities: tuple[str, ...] = ()  # weight scale granularities it reads; empty: any
    k_multiple: int = 1                  # in_features must be a multiple of this

    def rejects(self, weight_spec: QuantSpec, in_features: int) -> str | None:
        if self.granularities and weight_spec.granularity not in self.granularities:
            return (f"weight scales {weight_spec.describe()} are {weight_spec.granularity}; this "
                    f"kernel takes {' or '.join(self.granularities)} scales")
        if in_features % self.k_multiple:
            return (f"in_features {in_features} is not a multiple of {self.k_multiple} "
                    f"(required by {self.name})")
        return super().rejects(weight_spec, in_features)

    def binding_attrs(self, weight_spec: QuantSpec, shape: list[int]) -> dict:
        """Weight-only rows pick their path by M at run time from a fixed table: record it."""
        if self.op is not torch.ops.sagequant.cuda_weight_only_linear.default:
            return {}
        n, k = shape
        return {"dispatch_by_m": layout.dispatch_table(n, k, weight_spec.format,
                                                       layout.kernel_group(weight_spec, k))}


# --- weight-only: W4A16, W8A16, FP8-W8A16 -------------------------------------------------

@torch.library.custom_op(f"sagequant::{WO_OP}", mutates_args=())
def cuda_weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                            zeros: torch.Tensor | None, bias: torch.Tensor | None, spec: str,
                            shape: list[int]) -> torch.Tensor:
    hardware.require_cuda_tensors(WO_OP, x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    return _impl("triton_weight_only").weight_only_linear(
        x, qweight, scales, zeros, bias, QuantSpec.decode(spec), shape)


@cuda_weight_only_linear.register_fake
def _wo_fake(x, qweight, scales, zeros, bias, spec, shape):
    return x.new_empty((*x.shape[:-1], shape[0]))


# --- W8A8: activation quantization fused in one kernel, then FP8 / INT8 GEMM ---------------

def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _check_activation(act_spec: str, act_scale: torch.Tensor | None, fmt: str,
                      kernel: str) -> None:
    spec = QuantSpec.decode(act_spec)
    dynamic = spec.granularity == "per_token" and act_scale is None
    static = spec.granularity == "per_tensor" and act_scale is not None
    if spec.format != fmt or not (dynamic or static):
        raise ValueError(f"{kernel}: activation spec {spec.describe()} (dynamic={spec.dynamic}, "
                         f"static scale given: {act_scale is not None}) is not supported; it takes "
                         f"{fmt} per-token dynamic scales or one calibrated per-tensor scale")


def _activation(x: torch.Tensor, act_spec: str, act_scale: torch.Tensor | None, fmt: str,
                kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    _check_activation(act_spec, act_scale, fmt, kernel)
    return _impl("triton_w8a8").quantize_activation(_rows(x), fmt, act_scale)


@torch.library.custom_op(f"sagequant::{FP8_OP}", mutates_args=())
def cuda_w8a8_fp8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                         zeros: torch.Tensor | None, bias: torch.Tensor | None, spec: str,
                         shape: list[int], act_spec: str,
                         act_scale: torch.Tensor | None) -> torch.Tensor:
    hardware.require_cuda_tensors(FP8_OP, x=x, qweight=qweight, scales=scales, bias=bias)
    n, k = shape
    if n % 16 or k % 16:
        raise ValueError(f"{FP8_OP}: torch._scaled_mm needs out_features and in_features "
                         f"divisible by 16, got {shape}")
    w = layout.weight_rows(qweight, QuantSpec.decode(spec), n, k)
    if x.numel() // k <= layout.FP8_GEMV_MAX_M:  # decode: quantization fused into a GEMV
        _check_activation(act_spec, act_scale, "fp8_e4m3", FP8_OP)
        out = _impl("triton_fp8_gemv").fp8_gemv(_rows(x), act_scale, w, scales, bias, x.dtype)
        return out.reshape(*x.shape[:-1], n)
    xq, xs = _activation(x, act_spec, act_scale, "fp8_e4m3", FP8_OP)
    out = _impl("triton_w8a8").fp8_linear(xq, xs, w, scales, bias, x.dtype)
    return out.reshape(*x.shape[:-1], n)


@torch.library.custom_op(f"sagequant::{INT8_OP}", mutates_args=())
def cuda_w8a8_int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None, bias: torch.Tensor | None, spec: str,
                          shape: list[int], act_spec: str,
                          act_scale: torch.Tensor | None) -> torch.Tensor:
    hardware.require_cuda_tensors(INT8_OP, x=x, qweight=qweight, scales=scales, bias=bias)
    n, k = shape
    wspec = QuantSpec.decode(spec)
    w = layout.weight_rows(qweight, wspec, n, k)
    impl = _impl("triton_w8a8")
    xq, xs = _activation(x, act_spec, act_scale, "int8", INT8_OP)
    group = layout.kernel_group(wspec, k)
    if xq.shape[0] >= impl.INT_MM_MIN_M and group >= k and k % 8 == 0 and n % 8 == 0:
        out = impl.int8_linear_int_mm(xq, xs, w, scales, bias, x.dtype)
    else:
        out = impl.int8_linear(xq, xs, w, scales, group, bias, x.dtype)
    return out.reshape(*x.shape[:-1], n)


def _w8a8_fake(x, qweight, scales, zeros, bias, spec, shape, act_spec, act_scale):
    return x.new_empty((*x.shape[:-1], shape[0]))


cuda_w8a8_fp8_linear.register_fake(_w8a8_fake)
cuda_w8a8_int8_linear.register_fake(_w8a8_fake)


# --- registry rows ---------------------------------------------------------------------------

def _row(name, schemes, op, description, formats, min_cc, what, **kw) -> CudaKernelSpec:
    return CudaKernelSpec(
        name=name, backend="cuda", schemes=schemes, priorities=PRIORITIES, op=op,
        description=description, formats=formats,
        available=hardware.requirement(min_cc, what, needs_triton=True), **kw)


W4A16 = _row(
    "cuda_w4a16_triton", ("W4A16",), torch.ops.sagequant.cuda_weight_only_linear.default,
    "packed int4/uint4 group-wise, fp16/bf16 activations; with K % 8 == 0 int32-word GEMV "
    "(M=1) and tensor-core word kernel (M<=32, <=64 for N<=4096), else byte GEMV / split-K; "
    "tiled tensor-core (M<1024), dequantize+cuBLAS (larger M); ragged groups masked",
    ("int4", "uint4"), (8, 0), "bf16 tensor-core mma", group_sizes=layout.GROUP_SIZES)
W8A16 = _row(
    "cuda_w8a16_triton", ("W8A16",), torch.ops.sagequant.cuda_weight_only_linear.default,
    "int8/uint8 weights per-channel or group-wise, the same kernels as cuda_w4a16_triton",
    ("int8", "uint8"), (8, 0), "bf16 tensor-core mma", group_sizes=layout.GROUP_SIZES)
FP8_W8A16 = _row(
    "cuda_fp8_w8a16_triton", ("FP8-W8A16",), torch.ops.sagequant.cuda_weight_only_linear.default,
    "fp8 weights upcast in registers, 16-bit activations, the same kernels as cuda_w4a16_triton",
    ("fp8_e4m3", "fp8_e5m2"), (8, 9), "FP8 conversions", group_sizes=layout.GROUP_SIZES)
NF4 = _row(
    "cuda_nf4_triton", ("NF4-A16",), torch.ops.sagequant.cuda_weight_only_linear.default,
    "NF4 code book weights read as int32 words: GEMV (M=1), tensor-core dots per nibble plane "
    "(M<64, group >= 128), dequantize+cuBLAS (larger M)",
    ("nf4",), (8, 0), "bf16 tensor-core mma", group_sizes=layout.GROUP_SIZES, k_multiple=8)
W8A8_FP8 = _row(
    "cuda_w8a8_fp8_scaled_mm", ("W8A8-FP8",), torch.ops.sagequant.cuda_w8a8_fp8_linear.default,
    "M=1: per-token (or static) e4m3 activation quantization fused into a Triton FP8 GEMV; "
    "larger M: the quantization kernel, then torch._scaled_mm with row-/tensor-wise scales",
    ("fp8_e4m3",), (8, 9), "FP8 tensor cores (torch._scaled_mm)",
    granularities=("per_tensor", "per_channel"), k_multiple=16, activation_quant=True)
W8A8_INT8 = _row(
    "cuda_w8a8_int8_triton", ("W8A8-INT8",), torch.ops.sagequant.cuda_w8a8_int8_linear.default,
    "fused per-token (or static) int8 activation quantization, then an int8 tensor-core GEMM "
    "with the dequantizing epilogue (scales, bias, cast) fused",
    ("int8",), (8, 0), "int8 tensor-core mma", group_sizes=layout.GROUP_SIZES[1:],
    activation_quant=True)
ROWS = (W4A16, W8A16, FP8_W8A16, NF4, W8A8_FP8, W8A8_INT8)
