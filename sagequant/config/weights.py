"""How weights are stored: dtype, grouping, symmetry, clipping, scale precision, fp8 format, the
weight-scale observer and NF4's double quantization."""
from __future__ import annotations

from dataclasses import dataclass

from .checks import boolean, choice, clip, group, names, normalise

WEIGHT_DTYPES = names("int8", "int4", "fp8", "nf4", "w8a16", "w4a16", "w8a8")
SCALE_PRECISIONS = names("fp16", "fp32")
FP8_FORMATS = names("e4m3", "e5m2")
WEIGHT_OBSERVERS = names("minmax", "mse")


@dataclass(frozen=True)
class WeightConfig:
    weight_dtype: str = "int4"      # the seed also lets w8a16 / w4a16 / w8a8 appear here
    group_size: int | None = 128    # None (or -1): one scale per output channel
    symmetric: bool = True
    per_channel: bool = True
    clip_ratio: float = 1.0
    # Weight scales' dtype. fp32: compressed-tensors' scales for an fp32 model, bit for bit; fp16
    # halves the scale bytes, but rounding every scale moves ~0.5% of the codes across a rounding
    # boundary: SmolLM2 W4A16 g64 RTN measured 40.94 ppl with fp16 vs 39.94 with fp32 (8192 news tokens).
    scale_precision: str = "fp32"
    fp8_format: str = "e4m3"        # of fp8 weights and activations
    # Weight scales: each block's min/max, or the shrink of it with the smallest round-trip MSE
    # (used by convert's round-to-nearest and by GPTQ's group scales).
    weight_observer: str = "minmax"
    # QLoRA's double quantization: NF4's per-block scales stored as uint8 codes with one fp32
    # scale and zero point per 256 scales (0.13 instead of 0.25 bits/weight at block 64, fp16).
    nf4_double_quant: bool = False

    def __post_init__(self) -> None:
        normalise(self, weight_dtype=choice("weight_dtype", self.weight_dtype, WEIGHT_DTYPES),
                  group_size=group("group_size", self.group_size, allow_minus_one=True),
                  symmetric=boolean("symmetric", self.symmetric),
                  per_channel=boolean("per_channel", self.per_channel),
                  clip_ratio=clip("clip_ratio", self.clip_ratio),
                  scale_precision=choice("scale_precision", self.scale_precision, SCALE_PRECISIONS),
                  fp8_format=choice("fp8_format", self.fp8_format, FP8_FORMATS),
                  weight_observer=choice("weight_observer", self.weight_observer, WEIGHT_OBSERVERS),
                  nf4_double_quant=boolean("nf4_double_quant", self.nf4_double_quant))
