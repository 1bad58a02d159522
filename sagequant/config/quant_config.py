"""QuantConfig: the seed's flat fields, kept in sections and normalised to one execution scheme.

Each section checks its own fields (weights.py, activations.py, ...); this module checks what
spans sections (the scheme, the observer against the activations, per-layer overrides). Validation
happens once, at construction, so every later stage can trust the config; a QuantConfig is not
changed afterwards (`replace` gives a new one). The flat field names stay the constructor's
keywords, the attributes and the JSON form (`to_dict`), so old configs and artifacts keep loading.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from .activations import ActivationConfig
from .backend import BackendConfig
from .calibration import CalibrationConfig
from .checks import ConfigError, fail
from .guard import GuardConfig
from .kv_cache import KVCacheConfig
from .layers import OVERRIDE_KEYS, SKIP, LayerRules, LayerSettings
from .mixed_precision import MixedPrecisionConfig
from .qat import QATConfig
from .rotation import RotationConfig
from .weights import WeightConfig

SCHEMES = ("W8A16", "W4A16", "FP8-W8A16", "NF4-A16", "W8A8-INT8", "W8A8-FP8", "W4A8-INT8", "W4A8-FP8")
# (weight kind, activation kind) -> scheme; anything else is a contradiction.
_SCHEME_OF = {
    ("int8", "a16"): "W8A16",
    ("int4", "a16"): "W4A16",
    ("fp8", "a16"): "FP8-W8A16",
    ("nf4", "a16"): "NF4-A16",
    ("int8", "int8"): "W8A8-INT8",
    ("fp8", "fp8"): "W8A8-FP8",
    ("int4", "int8"): "W4A8-INT8",
    ("int4", "fp8"): "W4A8-FP8",
}
_VALID_SCHEMES = (
    "valid schemes: W8A16 (weight_dtype int8|w8a16, activation_dtype a16|fp16|bf16); "
    "W4A16 (weight_dtype int4|w4a16, activation_dtype a16); "
    "FP8-W8A16 (weight_dtype fp8, activation_dtype a16); "
    "NF4-A16 (weight_dtype nf4, activation_dtype a16); "
    "W8A8-INT8 (weight_dtype int8|w8a8, activation_dtype int8|w8a8); "
    "W8A8-FP8 (weight_dtype fp8|w8a8, activation_dtype fp8); "
    "W4A8-INT8 (weight_dtype int4, activation_dtype int8); "
    "W4A8-FP8 (weight_dtype int4, activation_dtype fp8)"
)
_QAT_SCHEMES = ("W8A16", "W4A16", "FP8-W8A16", "W8A8-INT8", "W8A8-FP8")

# Section attribute -> its class. Three seed fields (calibration, guard, backend) name the method,
# the mode and the target, so their sections are calibration_options / guard_options /
# backend_options.
SECTIONS: dict[str, type] = {
    "weights": WeightConfig, "activations": ActivationConfig, "kv_cache": KVCacheConfig,
    "calibration_options": CalibrationConfig, "guard_options": GuardConfig,
    "mixed_precision": MixedPrecisionConfig, "qat": QATConfig, "backend_options": BackendConfig,
    "layer_rules": LayerRules, "rotation": RotationConfig,
}
SECTION_OF = {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
# The flat JSON form's key order (the seed's fields first, as every earlier artifact wrote them).
FIELDS = ("weight_dtype", "activation_dtype", "calibration", "group_size", "symmetric",
          "per_channel", "kv_cache_dtype", "clip_ratio", "enable_qat", "fuse_ln", "fuse_qdq",
          "backend", "priority", "draft_mode", "scale_precision", "ignore", "overrides",
          "fp8_format", "calibration_samples", "calibration_seq_len", "fallback", "kv_block_size",
          "kv_group_size", "kv_high_precision_layers", "activation_scale", "observer",
          "weight_observer", "smoothquant_alpha", "awq_grid", "awq_clip", "awq_duo_scaling",
          "awq_search_rows", "awq_sink_weight", "awq_scale_loss", "gptq_block_size", "gptq_damp", "gptq_act_order", "gptq_true_sequential",
          "sink_tokens", "nf4_double_quant", "kv_scale_precision",
          "qat_learn_scales", "guard", "guard_samples", "guard_bounds", "target_bits_per_weight",
          "target_max_delta_loss", "precision_upgrades", "sensitivity_samples", "sensitivity_method",
          "rotate", "rotate_online", "rotate_heads", "rotate_seed", "gptq_row_energy_cap",
          "gptq_sink_weight", "gptq_select_blocks", "gptq_static_groups")
assert sorted(FIELDS) == sorted(SECTION_OF), "every section field has its place in FIELDS"


class QuantConfig:
    """The seed's fields plus ignore/overrides/fallback/KV settings, in sections (see SECTIONS);
    `QuantConfig(group_size=64).group_size == QuantConfig(group_size=64).weights.group_size`."""

    def __init__(self, **fields: Any) -> None:
        unknown = [k for k in fields if k not in SECTION_OF]
        if unknown:
            raise TypeError(f"QuantConfig() got an unexpected keyword argument {unknown[0]!r}; "
                            f"valid fields: {', '.join(FIELDS)}")
        grouped: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for name, value in fields.items():
            grouped[SECTION_OF[name]][name] = value
        sections = {name: cls(**grouped[name]) for name, cls in SECTIONS.items()}
        act = sections["activations"]
        if act.activation_dtype == "w8a8":
            # w8a8 names 8-bit activations; they are fp8 only when the weights are fp8.
            sections["activations"] = dataclasses.replace(
                act, activation_dtype="fp8" if sections["weights"].weight_dtype == "fp8" else "int8")
        self.__dict__.update(sections)
        self._check_nf4_double_quant()
        self._check_observer()
        self._check_scheme()
        self._check_rotation()
        self._check_block_choice()
        self.__dict__["layer_rules"] = dataclasses.replace(self.layer_rules,
                                                           overrides=self._checked_overrides())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"QuantConfig is not changed after construction (set {name!r} with "
                             "config.replace(...))")

    # ---- checks across sections ------------------------------------------------------------
    def _check_nf4_double_quant(self) -> None:
        if self.nf4_double_quant and self._weight_kind() != "nf4":
            raise fail("nf4_double_quant", True, f"needs weight_dtype='nf4' (got "
                       f"{self.weight_dtype!r})", "False, or weight_dtype='nf4'")

    def _check_observer(self) -> None:
        if self.observer is None:
            return
        if self.calibration == "percentile" and self.observer != "percentile":
            raise ConfigError(
                f"QuantConfig.observer={self.observer!r} contradicts QuantConfig.calibration="
                f"'percentile' (which means the percentile observer); set observer=None or "
                f"'percentile', or pick another calibration")
        if self.observer in ("mse", "histogram") and self.activation_dtype == "a16":
            raise ConfigError(
                f"QuantConfig.observer={self.observer!r} optimises the clip of quantized "
                f"activations, but activation_dtype={self.activation_dtype!r} keeps them 16-bit; "
                "use it with activation_dtype int8 or fp8, or observer minmax / moving_average / "
                "percentile")
        if self.observer == "histogram" and self.activation_dtype == "fp8":
            raise ConfigError(
                "QuantConfig.observer='histogram' (entropy calibration) is defined for int8 "
                "activations, not fp8; use observer='mse' or 'percentile' with fp8")

    def _check_block_choice(self) -> None:
        if self.gptq_select_blocks and self.guard == "off":
            raise ConfigError(
                f"QuantConfig.gptq_select_blocks={self.gptq_select_blocks} chooses each block's rounding "
                "on the sequences held back for the accuracy guard, but guard='off' holds none back; "
                "set guard='report' or 'error' (or gptq_select_blocks=0)")

    def _check_rotation(self) -> None:
        if self.rotate != "off" and self.sensitivity_method == "fisher":
            raise ConfigError(
                f"QuantConfig.rotate={self.rotate!r} contradicts QuantConfig.sensitivity_method='fisher': "
                "the Fisher estimate reads the unrotated float model's weights and gradients, not the "
                "rotated graph's; use sensitivity_method='measured' (or rotate='off')")

    def _weight_kind(self) -> str:
        """int8 / int4 / fp8 / nf4, after the seed's w8a16 / w4a16 / w8a8 spellings."""
        if self.weight_dtype == "w8a8":
            return "fp8" if self.activation_dtype == "fp8" else "int8"
        return {"w8a16": "int8", "w4a16": "int4"}.get(self.weight_dtype, self.weight_dtype)

    def _contradiction(self, why: str) -> ConfigError:
        return ConfigError(
            f"QuantConfig.weight_dtype={self.weight_dtype!r} contradicts "
            f"QuantConfig.activation_dtype={self.activation_dtype!r}: {why}; {_VALID_SCHEMES}")

    def _check_scheme(self) -> None:
        weight, act = self._weight_kind(), self.activation_dtype
        if self.weight_dtype in ("w8a16", "w4a16") and act != "a16":
            raise self._contradiction(f"{self.weight_dtype} means 16-bit activations")
        if self.weight_dtype == "w8a8" and act == "a16":
            raise self._contradiction("w8a8 means quantized activations (set int8 or fp8)")
        if weight == "nf4" and act != "a16":
            raise self._contradiction("NF4 weights run with 16-bit activations only (for 4-bit "
                                      "weights with 8-bit activations use int4: W4A8-INT8 / W4A8-FP8)")
        if (weight, act) not in _SCHEME_OF:
            raise self._contradiction(f"{weight} weights cannot run with {act} activations")
        if not self.symmetric and weight in ("fp8", "nf4"):
            raise ConfigError(
                f"QuantConfig.symmetric=False contradicts QuantConfig.weight_dtype="
                f"{self.weight_dtype!r}: fp8 and nf4 are symmetric only; asymmetric is valid "
                f"for W8A16, W4A16, W8A8-INT8")
        if self.enable_qat and weight == "nf4":
            raise ConfigError(
                f"QuantConfig.enable_qat=True contradicts QuantConfig.weight_dtype="
                f"{self.weight_dtype!r}: there is no FakeQuant for NF4; QAT supports "
                f"{', '.join(_QAT_SCHEMES)}")

    def _checked_overrides(self) -> dict[str, Any]:
        checked: dict[str, Any] = {}
        for pattern, value in self.overrides.items():
            if not isinstance(pattern, str) or not pattern:
                raise fail("overrides", pattern, "has a pattern that is not a non-empty string",
                           "glob patterns on layer names")
            if value == SKIP:
                checked[pattern] = SKIP
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"QuantConfig.overrides[{pattern!r}]={value!r} must be a dict "
                                  f"or {SKIP!r}; valid keys: {', '.join(OVERRIDE_KEYS)}")
            layer = self._layer_config(value, f"overrides[{pattern!r}]")
            # Store the normalised spellings so a round trip compares equal.
            checked[pattern] = {key: getattr(layer, key) for key in value}
        return checked

    def _layer_config(self, changes: Mapping[str, Any], where: str) -> QuantConfig:
        for key in changes:
            if key not in OVERRIDE_KEYS:
                raise ConfigError(f"QuantConfig.{where} sets unknown key {key!r}; valid keys: "
                                  f"{', '.join(OVERRIDE_KEYS)}")
        try:
            # No overrides in the per-layer config: they are what is being applied.
            return QuantConfig(**{**self.to_dict(), "overrides": {}, **changes})
        except ConfigError as err:
            raise ConfigError(f"QuantConfig.{where}: {err}") from None

    # ---- what the config means -------------------------------------------------------------
    @property
    def scheme(self) -> str:
        """The one execution scheme this config runs as (see SCHEMES)."""
        return _SCHEME_OF[(self._weight_kind(), self.activation_dtype)]

    @property
    def weight_format(self) -> str:
        """Storage format name of the numerics layer (ir.formats)."""
        kind = self._weight_kind()
        if kind == "fp8":
            return f"fp8_{self.fp8_format}"
        if kind in ("int8", "int4") and not self.symmetric:
            return "u" + kind
        return kind

    @property
    def activation_format(self) -> str | None:
        """None for 16-bit activations, else the numerics format of quantized activations."""
        if self.activation_dtype == "a16":
            return None
        return f"fp8_{self.fp8_format}" if self.activation_dtype == "fp8" else "int8"

    @property
    def observer_kind(self) -> str:
        """The activation observer calibration uses (QuantConfig.observer or its default)."""
        if self.observer is not None:
            return self.observer
        return "percentile" if self.calibration == "percentile" else "minmax"

    def guard_bound(self, name: str, scheme: str) -> float:
        """The guard's bound `name` for layers / models of `scheme`: guard_bounds, else the default."""
        return self.guard_options.bound(name, scheme)

    def is_ignored(self, layer_name: str) -> bool:
        return self.layer_rules.is_ignored(layer_name)

    def layer_settings(self, layer_name: str) -> LayerSettings | None:
        """Effective settings of one layer; None when it stays in float (ignored or 'skip')."""
        if self.is_ignored(layer_name):
            return None
        merged = self.layer_rules.matching_overrides(layer_name)
        if merged is None:
            return None
        layer = self._layer_config(merged, f"overrides of layer {layer_name!r}") if merged else self
        return LayerSettings(layer.scheme, layer.weight_format, layer.activation_format,
                             layer.group_size, layer.per_channel, layer.symmetric,
                             layer.clip_ratio)

    # ---- copies and the JSON form ------------------------------------------------------------
    def replace(self, **changes: Any) -> QuantConfig:
        """A new, validated config with `changes` applied."""
        return QuantConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        sections = {name: dataclasses.asdict(self.__dict__[name]) for name in SECTIONS}
        return {name: sections[SECTION_OF[name]][name] for name in FIELDS}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)  # unsorted: override order matters

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"QuantConfig.from_dict needs a mapping, got {type(data).__name__}")
        unknown = [k for k in data if k not in SECTION_OF]
        if unknown:
            raise ConfigError(f"QuantConfig has no field {unknown[0]!r}; valid fields: {', '.join(FIELDS)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise ConfigError(f"QuantConfig JSON is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # equal configs compare by value; use to_json() as a key

    def __repr__(self) -> str:
        return "QuantConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


def _flat_field(name: str) -> property:
    section = SECTION_OF[name]
    return property(lambda self: getattr(self.__dict__[section], name),
                    doc=f"QuantConfig.{section}.{name}")


for _name in FIELDS:
    setattr(QuantConfig, _name, _flat_field(_name))
