"""Numeric formats: each format owns its rounding, saturation, code range and bit packing.

A format maps *scaled* real values (x / scale, plus the zero point for asymmetric integer
formats) to codes and back. Choosing scales per tensor / channel / group is the job of
`ir.quant_spec`; this module only knows what a code is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import QuantizationError


# QLoRA's NF4 code book: the 16 quantiles of N(0, 1), normalised to [-1, 1], with an exact zero.
NF4_CODEBOOK = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class QuantFormat:
    """A storage format. A symmetric scale maps absmax onto `qmax`, or onto `scale_divisor` when
    set: int4 uses 7.5, half-way to the -8 code (as compressed-tensors does), so all 16 levels are
    in use and the step is 7% finer; the largest positive value then saturates at 7, half a step
    short. Measured on SmolLM2-135M W4A16 g64 RTN: perplexity 42.84 with 7.5 vs 45.80 with 7."""

    name: str
    bits: int
    kind: str  # "int", "float" (fp8) or "codebook" (nf4)
    qmin: float
    qmax: float
    storage_dtype: torch.dtype
    symmetric_only: bool
    scale_divisor: float | None = None

    @property
    def packed(self) -> bool:
        return self.bits == 4

    def symmetric_scale(self, absmax: torch.Tensor) -> torch.Tensor:
        """Scale mapping absmax onto the top of the range; e.g. int4: absmax 3.75 -> scale 0.5
        (codes -8..7); int8: absmax 127 -> scale 1.

        Divided by a tensor filled on absmax's device, never by a Python number: CUDA divides by
        a CPU scalar as a multiply by its reciprocal (one bit off the quotient), and int4's full
        range puts each block's extreme exactly on a rounding tie (±7.5), so that bit flipped
        codes between a CPU and a GPU compile of the same weights (SmolLM2 W4A16 RTN: +1.5% ppl).
        full_like fills on the device (no host-to-device copy inside GPTQ's group loop)."""
        return absmax / torch.full_like(absmax, self.scale_divisor or self.qmax)

    def encode(self, scaled: torch.Tensor) -> torch.Tensor:
        """Round and saturate scaled values to codes (int: round-half-even then clamp)."""
        if self.kind == "int":
            return torch.round(scaled).clamp_(self.qmin, self.qmax).to(torch.int16)
        if self.kind == "float":
            return scaled.clamp(-self.qmax, self.qmax).to(self.storage_dtype)
        book = _nf4_book(scaled.device)
        # Nearest code book entry; the midpoints between sorted entries give the decision bounds.
        mids = (book[1:] + book[:-1]) / 2
        return torch.bucketize(scaled.clamp(-1.0, 1.0).to(torch.float32), mids).to(torch.int16)

    def decode(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.kind == "codebook":
            return _nf4_book(codes.device).to(dtype)[codes.long()]
        return codes.to(dtype)

    def round_trip(self, scaled: torch.Tensor) -> torch.Tensor:
        """decode(encode(scaled)) as float32 (what fake quantization needs), without materialising
        the integer codes: int formats round half-even and saturate in float directly."""
        if self.kind == "int":
            return torch.round(scaled.float()).clamp_(self.qmin, self.qmax)
        return self.decode(self.encode(scaled), torch.float32)

    def to_storage(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes as stored: packed nibbles for 4-bit formats, else the native storage dtype."""
        if self.packed:
            return pack_nibbles(codes)
        return codes.to(self.storage_dtype)

    def from_storage(self, data: torch.Tensor, last_dim: int) -> torch.Tensor:
        """Inverse of to_storage; 4-bit data needs the unpacked last dimension (it may be odd)."""
        if self.packed:
            return unpack_nibbles(data, last_dim, signed=self.qmin < 0)
        if self.kind == "float":
            return data
        return data.to(torch.int16)


def _nf4_book(device) -> torch.Tensor:
    return torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last dim: element 2i in the low nibble, 2i+1 in the high.

    Signed codes are stored two's complement (-1 -> 0xF). An odd last dim is padded with a zero
    nibble, so unpacking needs the original length.
    """
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nib.shape[-1] % 2:
        nib = torch.nn.functional.pad(nib, (0, 1))
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_nibbles(data: torch.Tensor, last_dim: int, signed: bool) -> torch.Tensor:
    if data.dtype != torch.uint8:
        raise QuantizationError(f"packed 4-bit data must be uint8, got {data.dtype}")
    if data.shape[-1] != (last_dim + 1) // 2:
        raise QuantizationError(
            f"packed 4-bit data has last dim {data.shape[-1]}, expected {(last_dim + 1) // 2} "
            f"for {last_dim} codes")
    low = (data & 0xF).to(torch.int16)
    high = (data >> 4).to(torch.int16)
    codes = torch.stack((low, high), dim=-1).flatten(-2)[..., :last_dim]
    if signed:
        codes = (codes ^ 8) - 8  # sign-extend the nibble
    return codes


def _fp8(name: str, dtype: torch.dtype) -> QuantFormat:
    fmax = float(torch.finfo(dtype).max)
    return QuantFormat(name, 8, "float", -fmax, fmax, dtype, symmetric_only=True)


FORMATS: dict[str, QuantFormat] = {
    "int8": QuantFormat("int8", 8, "int", -128, 127, torch.int8, symmetric_only=False),
    "uint8": QuantFormat("uint8", 8, "int", 0, 255, torch.uint8, symmetric_only=False),
    "int4": QuantFormat("int4", 4, "int", -8, 7, torch.uint8, symmetric_only=False, scale_divisor=7.5),
    "uint4": QuantFormat("uint4", 4, "int", 0, 15, torch.uint8, symmetric_only=False),
    "fp8_e4m3": _fp8("fp8_e4m3", torch.float8_e4m3fn),
    "fp8_e5m2": _fp8("fp8_e5m2", torch.float8_e5m2),
    "nf4": QuantFormat("nf4", 4, "codebook", 0, 1.0, torch.uint8, symmetric_only=True),
}


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise QuantizationError(
            f"unknown quantization format {name!r}; valid: {', '.join(sorted(FORMATS))}") from None


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise naming `what` when x holds NaN/Inf: quantizing them would silently poison scales."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise QuantizationError(f"{what} contains {n_nan} NaN and {n_inf} Inf values; "
                                "cannot compute quantization parameters")
