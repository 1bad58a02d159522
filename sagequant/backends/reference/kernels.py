"""CPU reference kernels: the numerical oracle. Weight-only linear = dequantize the stored codes
with the format's own numerics, then a float GEMM in the activation dtype. W8A8 linear = quantize
the activation (per token, or with the calibrated static scale), then the product of the two
dequantized operands accumulated in float64 — exactly what an int32-accumulating INT8 GEMM or an
fp32-accumulating FP8 GEMM computes before its output rounding. W4A8 runs the W8A8 oracle on
int4 weight codes."""
from __future__ import annotations

import torch

from ...config import SCHEMES
from ...ir.activation_ops import dequantize_activation
from ...ir.quant_spec import QuantizedTensor, QuantSpec, dequantize, quantize
from ...lowering.registry import KernelSpec

PRIORITIES = ("latency", "throughput", "memory")
WEIGHT_ONLY_SCHEMES = tuple(s for s in SCHEMES if s.endswith("A16"))
W8A8_SCHEMES = tuple(s for s in SCHEMES if s.startswith("W8A8"))
W4A8_SCHEMES = tuple(s for s in SCHEMES if s.startswith("W4A8"))


@torch.library.custom_op("sagequant::weight_only_linear_ref", mutates_args=())
def weight_only_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor | None, bias: torch.Tensor | None, spec: str,
                           shape: list[int]) -> torch.Tensor:
    qt = QuantizedTensor(qweight, scales, zeros, tuple(shape), QuantSpec.decode(spec))
    return torch.nn.functional.linear(x, dequantize(qt, x.dtype), bias)


@weight_only_linear_ref.register_fake
def _fake(x, qweight, scales, zeros, bias, spec, shape):
    return x.new_empty((*x.shape[:-1], shape[0]))


CPU_WEIGHT_ONLY = KernelSpec(
    name="cpu_weight_only_ref",
    backend="cpu",
    schemes=WEIGHT_ONLY_SCHEMES,
    priorities=PRIORITIES,
    op=torch.ops.sagequant.weight_only_linear_ref.default,
    description="dequantize (int8/int4/fp8/nf4, any group incl. ragged) then float GEMM",
)


@torch.library.custom_op("sagequant::w8a8_linear_ref", mutates_args=())
def w8a8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, bias: torch.Tensor | None, spec: str,
                    shape: list[int], act_spec: str, act_scale: torch.Tensor | None) -> torch.Tensor:
    xq = quantize(x, QuantSpec.decode(act_spec), scale=act_scale, what="activation")
    w = dequantize(QuantizedTensor(qweight, scales, zeros, tuple(shape), QuantSpec.decode(spec)), torch.float64)
    out = torch.nn.functional.linear(dequantize(xq, torch.float64), w,
                                     None if bias is None else bias.double())
    return out.to(x.dtype)


@w8a8_linear_ref.register_fake
def _fake_w8a8(x, qweight, scales, zeros, bias, spec, shape, act_spec, act_scale):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.custom_op("sagequant::w8a8_linear_prequantized_ref", mutates_args=())
def w8a8_linear_prequantized_ref(codes: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
                                 scales: torch.Tensor, zeros: torch.Tensor | None,
                                 bias: torch.Tensor | None, spec: str, shape: list[int],
                                 act_spec: str, out_dtype: torch.dtype) -> torch.Tensor:
    """w8a8_linear_ref on an activation quantized upstream (fuse_norm_qdq): same float64 GEMM."""
    x = dequantize_activation(codes, x_scale, act_spec, torch.float64)
    w = dequantize(QuantizedTensor(qweight, scales, zeros, tuple(shape), QuantSpec.decode(spec)), torch.float64)
    out = torch.nn.functional.linear(x, w, None if bias is None else bias.double())
    return out.to(out_dtype)


@w8a8_linear_prequantized_ref.register_fake
def _fake_w8a8_prequantized(codes, x_scale, qweight, scales, zeros, bias, spec, shape, act_spec, out_dtype):
    return codes.new_empty((*codes.shape[:-1], shape[0]), dtype=out_dtype)


CPU_W8A8 = KernelSpec(
    name="cpu_w8a8_ref",
    backend="cpu",
    schemes=W8A8_SCHEMES,
    priorities=PRIORITIES,
    op=torch.ops.sagequant.w8a8_linear_ref.default,
    description="quantize activations (dynamic per-token or static per-tensor), float64 GEMM of "
                "the dequantized int8/fp8 operands",
    activation_quant=True,
    prequantized_op=torch.ops.sagequant.w8a8_linear_prequantized_ref.default,
)

# W4A8: the same oracle (it dequantizes whatever weight codes it is given: int4 / uint4, any group
# incl. ragged), its own registry row so a W4A8 layer is bound to a kernel named for it.
CPU_W4A8 = KernelSpec(
    name="cpu_w4a8_ref",
    backend="cpu",
    schemes=W4A8_SCHEMES,
    priorities=PRIORITIES,
    op=torch.ops.sagequant.w8a8_linear_ref.default,
    description="quantize activations to int8/fp8 (dynamic per-token or static per-tensor), float64 "
                "GEMM with the dequantized int4 weight (per-channel or per-group)",
    formats=("int4", "uint4"),
    activation_quant=True,
    prequantized_op=torch.ops.sagequant.w8a8_linear_prequantized_ref.default,
)
