"""Fused decoder-layer ops the engine's step graph calls (runtime/fuse_step.py writes them), as
torch custom ops: the default implementation is the reference math (the ATen ops they replace,
so CPU runs are unchanged), the CUDA one the Triton kernels of triton_fused.py. Also gives the
canonical `sagequant::rms_norm` a one-kernel CUDA implementation. Imports without triton or a GPU.

  add_rms_norm(x, residual, weight, eps) -> (rms_norm(x + residual) * weight, x + residual)
  rotary_embedding(x, cos, sin)          -> x * cos + rotate_half(x) * sin
  silu_mul(gate, up)                     -> silu(gate) * up
"""
from __future__ import annotations

import importlib

import torch

from ...ir.formats import QuantizationError
from ...ir.ops import rms_norm
from . import hardware

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _impl():
    missing = hardware.triton_missing()
    if missing:
        raise RuntimeError(f"the fused CUDA decoder ops need triton: {missing}")
    return importlib.import_module(f"{__package__}.triton_fused")


def _pow2(n: int) -> bool:
    return n >= 2 and n & (n - 1) == 0


@torch.library.custom_op("sagequant::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    return rms_norm(total, weight, eps, 0.0), total


@add_rms_norm.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):
    total = torch.empty(torch.broadcast_shapes(x.shape, residual.shape),
                        dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    return total.new_empty(total.shape, dtype=torch.promote_types(total.dtype, weight.dtype)), total


def _norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype in _TRITON_DTYPES and weight.dtype == x.dtype and weight.shape == x.shape[-1:]


@add_rms_norm.register_kernel("cuda")
def _add_rms_norm_cuda(x, residual, weight, eps):
    if x.shape != residual.shape or x.dtype != residual.dtype or not _norm_fits(x, weight):
        total = x + residual
        return rms_norm(total, weight, eps, 0.0), total
    hardware.require_cuda_tensors("add_rms_norm", x=x, residual=residual, weight=weight)
    return _impl().add_rms_norm(x, residual, weight, eps)


@torch.library.register_kernel("sagequant::rms_norm", "cuda")
def _rms_norm_cuda(x, weight, eps, weight_offset):
    if weight_offset or not _norm_fits(x, weight):  # Gemma's (1 + w): the reference math
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
        return normed * (weight.float() + weight_offset if weight_offset else weight)
    return _impl().add_rms_norm(x, None, weight, eps)[0]


def rotate_half_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


@torch.library.custom_op("sagequant::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rotate_half_ref(x, cos, sin).contiguous()


@rotary_embedding.register_fake
def _rotary_fake(x, cos, sin):
    return torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=x.dtype, device=x.device)


def rotary_fits(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """What the Triton rotary kernels take: 4-D x [b, h, s, d] with d a power of two, cos/sin of
    x's dtype broadcastable as [b or 1, 1, s, d]."""
    return (x.dim() == 4 and _pow2(x.shape[-1]) and x.dtype in _TRITON_DTYPES
            and all(t.dtype == x.dtype and t.dim() == 4 and t.shape[1] == 1
                    and t.shape[0] in (1, x.shape[0]) and t.shape[2:] == x.shape[2:]
                    for t in (cos, sin)))


@rotary_embedding.register_kernel("cuda")
def _rotary_cuda(x, cos, sin):
    if not rotary_fits(x, cos, sin):
        return rotate_half_ref(x, cos, sin).contiguous()
    hardware.require_cuda_tensors("rotary_embedding", x=x, cos=cos, sin=sin)
    return _impl().rotary(x, cos, sin)


@torch.library.custom_op("sagequant::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


@silu_mul.register_fake
def _silu_mul_fake(gate, up):
    return torch.empty(torch.broadcast_shapes(gate.shape, up.shape),
                       dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)


@silu_mul.register_kernel("cuda")
def _silu_mul_cuda(gate, up):
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.dtype not in _TRITON_DTYPES:
        return torch.nn.functional.silu(gate) * up
    hardware.require_cuda_tensors("silu_mul", gate=gate, up=up)
    return _impl().silu_mul(gate, up)


def rope_cache_decode(q, k, v, cos, sin, cache, index) -> torch.Tensor | None:
    """The decode attention prologue in one launch: rotary of q and k (with cos, sin), k and v
    written into the paged cache (16-bit: the token's entries; quantized: the token's row of the
    open block, quantized when it fills, triton_kv_write.py). Returns the q to attend with; None
    when this step is not one it handles (then the caller runs the unfused ops; a 16-bit cache
    without rotary keeps its two index writes)."""
    if not (q.is_cuda and q.shape[2] == 1 and v.dtype == q.dtype and k.dtype == q.dtype
            and _pow2(q.shape[-1]) and not hardware.cuda_missing()):
        return None
    if cos is not None and not (rotary_fits(q, cos, sin) and rotary_fits(k, cos, sin)):
        return None
    if cache.quantized:
        return quantized_cache_decode(q, k, v, cos, sin, cache, index)
    if cos is None:
        return None
    return _impl().rope_cache_decode(q, k, v, cos, sin, cache.k, cache.v, index.block_table,
                                     index.positions)


def quantized_cache_decode(q, k, v, cos, sin, cache, index) -> torch.Tensor:
    """rope_cache_decode's quantized-cache kernel on a pool layer (kv_pool.LayerCache) and a
    DecodeIndex: a NaN/Inf sets index.nonfinite (CUDA graphs), or raises at once without one."""
    impl = importlib.import_module(f"{__package__}.triton_kv_write")
    flag = index.nonfinite if index.nonfinite is not None else torch.zeros(1, dtype=torch.bool, device=q.device)
    out = impl.quant_cache_decode(q, k, v, cos, sin, cache.k, cache.v, cache.k_scale, cache.v_scale,
                                  cache.tail, index.block_table, index.positions, index.slots, flag)
    if index.nonfinite is None and bool(flag):   # eager step: check now, as quantize_blocks does
        raise QuantizationError("KV cache: the values hold NaN/Inf (or exceed the scale range); "
                                "cannot compute cache scales")
    return out
