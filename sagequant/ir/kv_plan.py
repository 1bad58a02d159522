"""KVQuantPlan: how the KV cache is quantized, shared by the kv_cache_quant pass and the KV pool.

The cache is paged in blocks of `block_size` tokens; each (block, head) stores its values in
`dtype` plus one scale per `group_size` channels of the head (one per head when None). The
layout (`layout()`, also in the JSON) is what a paged KV pool and a prefix cache share:
  codes   [num_blocks, kv_heads, block_size, head_dim], 1 byte per element (int8 / fp8 e4m3)
  scales  [num_blocks, kv_heads, head_dim / group_size], scale_precision
Layers in high_precision_layers keep a 16-bit cache (float on the CPU reference) with no scales.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ..config import KV_BLOCK_SIZES, ConfigError, QuantConfig, strict_from_dict

KV_DTYPES = ("none", "int8", "fp8")
# The numeric format (ir/formats.py) each quantized KV dtype stores its codes in.
KV_CODE_FORMATS = {"int8": "int8", "fp8": "fp8_e4m3"}
_SCALE_BYTES = {"fp16": 2, "fp32": 4}


def _fail(name: str, value: Any, valid: str) -> ConfigError:
    return ConfigError(f"KVQuantPlan.{name}={value!r} is not supported; valid: {valid}")


def _is_int(value: Any) -> bool:
    # Rejects bools and floats (NaN included) so a plan never holds a non-integer size.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class KVQuantPlan:
    dtype: str = "none"
    block_size: int = 16
    group_size: int | None = None
    scale_precision: str = "fp16"
    high_precision_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise _fail("dtype", self.dtype, ", ".join(KV_DTYPES))
        if not _is_int(self.block_size) or self.block_size not in KV_BLOCK_SIZES:
            raise _fail("block_size", self.block_size, ", ".join(map(str, KV_BLOCK_SIZES)))
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size <= 0):
            raise _fail("group_size", self.group_size, "None (one scale per head) or an int > 0")
        if self.scale_precision not in _SCALE_BYTES:
            raise _fail("scale_precision", self.scale_precision, ", ".join(_SCALE_BYTES))
        layers = self.high_precision_layers
        if not isinstance(layers, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in layers):
            raise _fail("high_precision_layers", layers, "a tuple of layer indices >= 0")
        # Frozen: normalise a JSON list (or unsorted input) to a sorted tuple in place.
        object.__setattr__(self, "high_precision_layers", tuple(sorted(set(layers))))

    @property
    def enabled(self) -> bool:
        return self.dtype != "none"

    @property
    def bytes_per_element(self) -> int:
        return 1 if self.enabled else 2

    @property
    def scale_bytes(self) -> int:
        """Bytes of one stored scale; 0 when the cache stays 16-bit and stores no scales."""
        return _SCALE_BYTES[self.scale_precision] if self.enabled else 0

    def validate_layers(self, num_layers: int) -> None:
        """Raise when high_precision_layers names a decoder layer the model does not have."""
        if not _is_int(num_layers) or num_layers <= 0:
            raise ConfigError(f"KVQuantPlan.validate_layers(num_layers={num_layers!r}) needs an "
                              f"int > 0")
        bad = [i for i in self.high_precision_layers if i >= num_layers]
        if bad:
            raise ConfigError(f"KVQuantPlan.high_precision_layers names layers {bad} that do not "
                              f"exist; valid: 0..{num_layers - 1} (num_layers={num_layers})")

    @property
    def code_format(self) -> str | None:
        """Name of the ir.formats format of the stored codes; None for an unquantized cache."""
        return KV_CODE_FORMATS.get(self.dtype)

    def layer_dtype(self, layer: int) -> str:
        return "none" if layer in self.high_precision_layers else self.dtype

    def check_head_dim(self, head_dim: int) -> None:
        """Raise when group_size does not split a head into whole groups."""
        if self.group_size is not None and head_dim % self.group_size:
            raise ConfigError(f"KVQuantPlan.group_size={self.group_size} does not divide the "
                              f"model's head_dim={head_dim}; valid: None (one scale per head) or "
                              f"a divisor of {head_dim}")

    def layout(self) -> dict[str, str]:
        """Block and scale layout of the cache storage (shape order, dtypes), as documented above."""
        if not self.enabled:
            return {"codes": "[num_blocks, kv_heads, block_size, head_dim] 16-bit (no scales)",
                    "scales": "none"}
        per = f"head_dim/{self.group_size}" if self.group_size else "1"
        return {"codes": f"[num_blocks, kv_heads, block_size={self.block_size}, head_dim] "
                         f"{self.code_format}, 1 byte/element",
                "scales": f"[num_blocks, kv_heads, {per}] {self.scale_precision}, one per "
                          f"(block, head, channel group) over the block's tokens"}

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["high_precision_layers"] = list(self.high_precision_layers)
        data["layout"] = self.layout()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KVQuantPlan:
        fields = dict(data)
        layout = fields.pop("layout", None)
        plan = strict_from_dict(cls, fields)
        if layout is not None and layout != plan.layout():
            raise ConfigError(f"KVQuantPlan layout {layout!r} does not match this build's layout "
                              f"for the plan: {plan.layout()!r}")
        return plan


def build_kv_plan(config: QuantConfig) -> KVQuantPlan:
    """The KV plan a config asks for; high-precision layers only matter when KV is quantized."""
    enabled = config.kv_cache_dtype != "none"
    return KVQuantPlan(
        dtype=config.kv_cache_dtype,
        block_size=config.kv_block_size,
        group_size=config.kv_group_size,
        scale_precision=config.kv_scale_precision,
        high_precision_layers=tuple(config.kv_high_precision_layers) if enabled else (),
    )
