"""Per-layer rules: layers kept in high precision (`ignore`, glob patterns) and per-layer
`overrides` ({pattern: {field: value} | "skip"}, later patterns win); and LayerSettings, the
effective quantization of one layer after both."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checks import fail, layer_matches, normalise, str_list

OVERRIDE_KEYS = ("weight_dtype", "activation_dtype", "group_size", "symmetric", "per_channel",
                 "clip_ratio")
SKIP = "skip"


@dataclass(frozen=True)
class LayerRules:
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.overrides, dict):
            raise fail("overrides", self.overrides, "must be a dict", "{pattern: {field: value} | 'skip'}")
        normalise(self, ignore=str_list("ignore", self.ignore))

    def is_ignored(self, layer_name: str) -> bool:
        return any(layer_matches(layer_name, p) for p in self.ignore)

    def matching_overrides(self, layer_name: str) -> dict[str, Any] | None:
        """The merged override fields of one layer, or None when an override skips it."""
        merged: dict[str, Any] = {}
        skip = False
        for pattern, value in self.overrides.items():  # later patterns win
            if layer_matches(layer_name, pattern):
                skip = value == SKIP
                if not skip:
                    merged.update(value)
        return None if skip else merged


@dataclass(frozen=True)
class LayerSettings:
    """The effective quantization of one layer, after `ignore` and `overrides`."""

    scheme: str
    weight_format: str
    activation_format: str | None
    group_size: int | None
    per_channel: bool
    symmetric: bool
    clip_ratio: float
