"""QuantSpec: how one tensor is quantized, and the quantize / dequantize math that follows from it.

Every granularity is "blocks along the last dimension":
  per_tensor   one scale for the whole tensor                        scale shape [1, 1]
  per_channel  one scale per row (weight output channel)             scale shape [rows, 1]
  per_token    the same for activations (row = token)                scale shape [rows, 1]
  per_group    one scale per `group_size` consecutive elements of a row, the last group may be
               shorter (ragged): K=576, g=128 -> groups of 128,128,128,128,64  scale [rows, 5]
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass

import torch

from .formats import QuantFormat, QuantizationError, check_finite, get_format

GRANULARITIES = ("per_tensor", "per_channel", "per_token", "per_group")
SCALE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class QuantSpec:
    format: str
    granularity: str
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "fp16"
    dynamic: bool = False  # activations: scales computed at run time per batch

    def __post_init__(self):
        fmt = get_format(self.format)
        if self.granularity not in GRANULARITIES:
            raise QuantizationError(f"QuantSpec.granularity={self.granularity!r}; valid: "
                                    f"{', '.join(GRANULARITIES)}")
        if (self.granularity == "per_group") != (self.group_size is not None):
            raise QuantizationError("QuantSpec.group_size must be set exactly when granularity is "
                                    f"per_group (got {self.granularity}, {self.group_size})")
        if self.group_size is not None and self.group_size < 1:
            raise QuantizationError(f"QuantSpec.group_size={self.group_size} must be >= 1")
        if self.scale_dtype not in SCALE_DTYPES:
            raise QuantizationError(f"QuantSpec.scale_dtype={self.scale_dtype!r}; valid: "
                                    f"{', '.join(SCALE_DTYPES)}")
        if fmt.symmetric_only and not self.symmetric:
            raise QuantizationError(f"format {self.format} is symmetric only")
        if fmt.kind == "int" and self.symmetric == (fmt.qmin == 0):
            hint = "int4/int8" if self.symmetric else "uint4/uint8"
            raise QuantizationError(
                f"format {self.format} with symmetric={self.symmetric}: use {hint} instead")

    @property
    def fmt(self) -> QuantFormat:
        return get_format(self.format)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**d)

    def encode(self) -> str:
        """Compact string form, used as a custom-op attribute (ops take str, not dataclasses)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @staticmethod
    def decode(text: str) -> "QuantSpec":
        return _decode_spec(text)

    def describe(self) -> str:
        g = f"g{self.group_size}" if self.group_size else self.granularity
        return f"{self.format}/{g}/{'sym' if self.symmetric else 'asym'}/{self.scale_dtype}"


@dataclass
class QuantizedTensor:
    """Codes in storage form plus the parameters needed to dequantize them."""

    data: torch.Tensor           # packed uint8 (4-bit), int8/uint8, or float8
    scale: torch.Tensor          # [rows, n_blocks] in spec.scale_dtype
    zero_point: torch.Tensor | None  # same shape as scale, integer-valued (asymmetric only)
    shape: tuple[int, ...]
    spec: QuantSpec

    def nbytes(self) -> int:
        zp = self.zero_point.numel() * self.zero_point.element_size() if self.zero_point is not None else 0
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size() + zp


def block_lengths(last_dim: int, spec: QuantSpec) -> list[int]:
    """Lengths of the blocks of one row; only per_group splits a row (ragged last group)."""
    if spec.granularity != "per_group":
        return [last_dim]
    g = spec.group_size
    full, tail = divmod(last_dim, g)
    return [g] * full + ([tail] if tail else [])


def _as_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if x.dim() == 0:
        raise QuantizationError("cannot quantize a 0-d tensor")
    rows = x.reshape(1, -1) if spec.granularity == "per_tensor" else x.reshape(-1, x.shape[-1])
    return rows


def _block_reduce(rows: torch.Tensor, lengths: list[int], op) -> torch.Tensor:
    """Reduce each block of each row with `op` (amax/amin over dim -1) -> [rows, n_blocks]."""
    return torch.stack([op(part, dim=-1) for part in torch.split(rows, lengths, dim=-1)], dim=-1)


def _expand(params: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[rows, n_blocks] -> [rows, last_dim] by repeating each block's value over its elements."""
    return params.repeat_interleave(torch.tensor(lengths, device=params.device), dim=-1)


def _cast_scale(scale: torch.Tensor, spec: QuantSpec, what: str, round_up: bool = False) -> torch.Tensor:
    dtype = SCALE_DTYPES[spec.scale_dtype]
    finfo = torch.finfo(dtype)
    if bool((scale > finfo.max).any()):
        raise QuantizationError(f"{what}: scale {float(scale.max()):.4g} overflows {spec.scale_dtype}; "
                                "use scale_precision='fp32'")
    # Scales below the dtype's smallest normal lose precision; raising them only shrinks codes.
    cast = scale.clamp(min=finfo.tiny).to(dtype)
    if round_up:
        # A scale rounded down would make the range wider than the codes can span, so its top
        # element clamps by more than half a step; the next representable scale never does.
        cast = torch.where(cast.float() < scale, torch.nextafter(cast, torch.full_like(cast, finfo.max)), cast)
    return cast


def compute_qparams(x: torch.Tensor, spec: QuantSpec, clip_ratio: float = 1.0,
                    what: str = "tensor") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) from the tensor's own range, shrunk by clip_ratio, rounded to scale_dtype."""
    check_finite(x, what)
    fmt = spec.fmt
    rows = _as_rows(x.detach(), spec).to(torch.float32)
    lengths = block_lengths(rows.shape[-1], spec)
    if spec.symmetric:
        absmax = _block_reduce(rows.abs(), lengths, torch.amax) * clip_ratio
        # All-zero blocks get scale 1: every code is 0 and dequantizes to exactly 0.
        scale = torch.where(absmax > 0, fmt.symmetric_scale(absmax), torch.ones_like(absmax))
        return _cast_scale(scale, spec, what), None
    # Asymmetric: the range always includes 0 so that 0 is exactly representable.
    lo = (_block_reduce(rows, lengths, torch.amin) * clip_ratio).clamp(max=0)
    hi = (_block_reduce(rows, lengths, torch.amax) * clip_ratio).clamp(min=0)
    span = hi - lo
    # a same-device divisor, as in symmetric_scale: the correctly rounded quotient on every device
    scale = torch.where(span > 0, span / torch.full_like(span, fmt.qmax - fmt.qmin), torch.ones_like(span))
    scale = _cast_scale(scale, spec, what, round_up=True)
    zero_point = torch.round(fmt.qmin - lo / scale.float()).clamp(fmt.qmin, fmt.qmax)
    return scale, zero_point.to(torch.int32)


# MSE clip search grid: shrink factors 1.0, 0.99, ..., 0.70 of each block's range.
MSE_SHRINK_STEPS = 31
MSE_MIN_SHRINK = 0.70


def mse_qparams(x: torch.Tensor, spec: QuantSpec, clip_ratio: float = 1.0,
                what: str = "tensor") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-block scale (and zero point) minimising ||x - Q(x)||² over shrunk ranges: each block
    independently takes the shrink in [0.70, 1] × clip_ratio whose round-trip error is smallest.
    Shrink 1 is plain min/max, so no block ends up worse than round-to-nearest's."""
    check_finite(x, what)
    rows = _as_rows(x.detach(), spec).to(torch.float32)
    lengths = block_lengths(rows.shape[-1], spec)
    best_scale, best_zp, best_err = None, None, None
    for shrink in torch.linspace(1.0, MSE_MIN_SHRINK, MSE_SHRINK_STEPS).tolist():
        scale, zp = compute_qparams(x, spec, clip_ratio * shrink, what)
        deq = dequantize(quantize(x, spec, scale, zp, what=what))
        err = _block_reduce((_as_rows(deq, spec).float() - rows) ** 2, lengths, torch.sum)
        if best_err is None:
            best_scale, best_zp, best_err = scale.clone(), None if zp is None else zp.clone(), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zp is not None:
            best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def weight_qparams(x: torch.Tensor, spec: QuantSpec, clip_ratio: float = 1.0, observer: str = "minmax",
                   what: str = "tensor") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight scales by QuantConfig.weight_observer: 'minmax' (the block's range) or 'mse'."""
    if observer == "mse":
        return mse_qparams(x, spec, clip_ratio, what)
    return compute_qparams(x, spec, clip_ratio, what)


def quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None,
             zero_point: torch.Tensor | None = None, clip_ratio: float = 1.0,
             what: str = "tensor") -> QuantizedTensor:
    """Quantize x; with no scale given, derive it from x (round-to-nearest)."""
    check_finite(x, what)
    if scale is None:
        scale, zero_point = compute_qparams(x, spec, clip_ratio, what)
    elif not spec.symmetric and zero_point is None:
        raise QuantizationError(f"{what}: asymmetric spec {spec.describe()} needs a zero point")
    rows = _as_rows(x.detach(), spec).to(torch.float32)
    lengths = block_lengths(rows.shape[-1], spec)
    if scale.shape != (rows.shape[0], len(lengths)) and scale.numel() != 1:
        raise QuantizationError(f"{what}: scale shape {tuple(scale.shape)} does not match "
                                f"{(rows.shape[0], len(lengths))} for {spec.describe()}")
    scaled = rows / _expand(scale.float().expand(rows.shape[0], len(lengths)), lengths)
    if zero_point is not None:
        scaled = scaled + _expand(zero_point.float().expand(rows.shape[0], len(lengths)), lengths)
    codes = spec.fmt.encode(scaled)
    return QuantizedTensor(spec.fmt.to_storage(codes), scale, zero_point, tuple(x.shape), spec)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    spec, fmt = qt.spec, qt.spec.fmt
    last = qt.shape[-1] if spec.granularity != "per_tensor" else math.prod(qt.shape)
    codes = fmt.decode(fmt.from_storage(qt.data, last), torch.float32)
    lengths = block_lengths(codes.shape[-1], spec)
    n_rows = codes.shape[0]
    if qt.zero_point is not None:
        codes = codes - _expand(qt.zero_point.float().expand(n_rows, len(lengths)), lengths)
    values = codes * _expand(qt.scale.float().expand(n_rows, len(lengths)), lengths)
    return values.reshape(qt.shape).to(dtype)


# QLoRA-style double quantization of per-block scales: the scales, flattened, in blocks of 256
# with one fp32 scale and zero point each; uint8 asymmetric because scales are all positive.
SCALE_DOUBLE_QUANT = QuantSpec("uint8", "per_group", group_size=256, symmetric=False, scale_dtype="fp32")


def double_quantize_scales(scale: torch.Tensor, what: str = "scales") -> QuantizedTensor:
    """Quantize a [rows, n_blocks] scale tensor as one [1, rows * n_blocks] row (SCALE_DOUBLE_QUANT)."""
    return quantize(scale.float().reshape(1, -1), SCALE_DOUBLE_QUANT, what=what)


def fake_quantize(x: torch.Tensor, spec: QuantSpec, clip_ratio: float = 1.0) -> torch.Tensor:
    return dequantize(quantize(x, spec, clip_ratio=clip_ratio), x.dtype)


def fake_quantize_block(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                        zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize(x, spec, scale, zero_point)) as float32, bit for bit, for x [rows, k]
    whose k columns all lie in one block of each row (scale / zero point [rows, 1]); no checks,
    no code packing, no host syncs: the per-column step of GPTQ, run tens of thousands of times
    per block on a GPU."""
    s = scale.float()
    scaled = x.float() / s
    if zero_point is None:
        return spec.fmt.round_trip(scaled) * s
    z = zero_point.float()
    return (spec.fmt.round_trip(scaled + z) - z) * s



@functools.lru_cache(maxsize=256)
def _decode_spec(text: str) -> QuantSpec:
    return QuantSpec.from_dict(json.loads(text))
