"""Quantize / dequantize KV-cache blocks: one scale per (block, head, channel group), taken over
all tokens of the block. The rounding, saturation and scale casting are the format's and
QuantSpec's own (a block-group is one per-channel "row" of block_size * group elements), so the
KV cache uses exactly the numerics every other quantized tensor uses.

Example: block_size 16, head_dim 64, group_size 32 -> each head of a block has 2 scales, each
the absmax of 16 tokens x 32 channels divided by 127 (int8) or 448 (fp8 e4m3).
"""
from __future__ import annotations

import torch

from .formats import QuantizationError
from .kv_plan import KV_CODE_FORMATS
from .quant_spec import SCALE_DTYPES, QuantSpec


def kv_spec(dtype: str, scale_precision: str) -> QuantSpec:
    if dtype not in KV_CODE_FORMATS:
        raise QuantizationError(f"KV dtype {dtype!r} is not quantized; valid: "
                                f"{', '.join(KV_CODE_FORMATS)}")
    return QuantSpec(KV_CODE_FORMATS[dtype], "per_channel", scale_dtype=scale_precision)


def _groups(head_dim: int, group_size: int | None) -> tuple[int, int]:
    g = group_size or head_dim
    if head_dim % g:
        raise QuantizationError(f"KV group_size {g} does not divide head_dim {head_dim}")
    return head_dim // g, g


def quantize_blocks(x: torch.Tensor, spec: QuantSpec, group_size: int | None,
                    what: str = "KV block", check: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., heads, block_size, head_dim] float -> (codes like x in the format's storage dtype,
    scales [..., heads, n_groups] in the spec's scale dtype).

    The math is QuantSpec's symmetric per-row path (absmax / qmax, scale cast to its dtype with
    a floor at the smallest normal, the format's encode). check=False skips the host-side
    NaN/Inf test so the call can run inside a CUDA graph: a non-finite input (or a scale past the
    scale dtype's range) then shows as a non-finite scale the caller tests after the step."""
    *lead, heads, bs, d = x.shape
    n_groups, g = _groups(d, group_size)
    rows = x.reshape(*lead, heads, bs, n_groups, g).movedim(-2, -3).reshape(-1, bs * g).float()
    fmt = spec.fmt
    scale = _row_scales(rows, spec, what, check)
    codes = fmt.to_storage(fmt.encode(rows / scale.float()))
    codes = codes.reshape(*lead, heads, n_groups, bs, g).movedim(-3, -2).reshape(x.shape)
    return codes, scale.reshape(*lead, heads, n_groups)


def _row_scales(rows: torch.Tensor, spec: QuantSpec, what: str, check: bool) -> torch.Tensor:
    fmt, dtype = spec.fmt, SCALE_DTYPES[spec.scale_dtype]
    absmax = rows.abs().amax(-1, keepdim=True)
    # All-zero rows get scale 1 (codes 0); NaN / Inf rows keep a non-finite scale.
    scale = torch.where(absmax == 0, torch.ones_like(absmax), fmt.symmetric_scale(absmax))
    scale = scale.clamp(min=torch.finfo(dtype).tiny).to(dtype)   # overflow -> inf, flagged below
    if check and not bool(torch.isfinite(scale).all()):
        raise QuantizationError(f"{what}: the values hold NaN/Inf (or exceed the {spec.scale_dtype} "
                                "scale range); cannot compute cache scales")
    return scale


def scales_finite(x: torch.Tensor, spec: QuantSpec, group_size: int | None, what: str = "KV block",
                  check: bool = True) -> torch.Tensor:
    """x [..., head_dim] float (tokens of an open block): a bool tensor, whether every channel
    group of every token has a finite scale, i.e. whether any block holding these tokens can be
    quantized (a block's absmax is its tokens' largest). check: raise where not, as
    quantize_blocks does; check=False only reports (for CUDA graphs)."""
    n_groups, g = _groups(x.shape[-1], group_size)
    return torch.isfinite(_row_scales(x.reshape(-1, g).float(), spec, what, check)).all()


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_blocks: codes [..., heads, block_size, head_dim] * their group scale."""
    *lead, heads, bs, d = codes.shape
    n_groups = scales.shape[-1]
    values = codes.to(torch.float32).reshape(*lead, heads, bs, n_groups, d // n_groups)
    return (values * scales.float()[..., None, :, None]).reshape(codes.shape).to(dtype)


def scale_dtype(scale_precision: str) -> torch.dtype:
    return SCALE_DTYPES[scale_precision]
