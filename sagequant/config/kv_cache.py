"""How the KV cache is stored (ir/kv_plan.KVQuantPlan is built from this section)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .checks import choice, fail, group, names, normalise

KV_SCALE_PRECISIONS = names("fp16", "fp32")

KV_DTYPES = {"none": "none", "int8": "int8", "fp8": "fp8", "fp8_e4m3": "fp8"}
KV_BLOCK_SIZES = (16, 32)


@dataclass(frozen=True)
class KVCacheConfig:
    kv_cache_dtype: str = "none"
    kv_block_size: int = 16
    kv_group_size: int | None = None
    kv_high_precision_layers: list[int] = field(default_factory=list)
    kv_scale_precision: str = "fp16"  # of the KV cache's scales (fp16 keeps fp8 KV under 0.52x bf16 bytes)

    def __post_init__(self) -> None:
        dtype = choice("kv_cache_dtype", self.kv_cache_dtype, KV_DTYPES)
        if type(self.kv_block_size) is not int or self.kv_block_size not in KV_BLOCK_SIZES:
            raise fail("kv_block_size", self.kv_block_size, "is not supported", "16, 32")
        layers = self.kv_high_precision_layers
        if not isinstance(layers, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise fail("kv_high_precision_layers", layers, "must be a list of layer indices",
                       "a list of ints >= 0")
        normalise(self, kv_cache_dtype=dtype,
                  kv_scale_precision=choice("kv_scale_precision", self.kv_scale_precision, KV_SCALE_PRECISIONS),
                  kv_group_size=group("kv_group_size", self.kv_group_size, allow_minus_one=False),
                  kv_high_precision_layers=sorted(set(layers)))
