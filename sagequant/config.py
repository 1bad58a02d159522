"""QuantConfig: the seed's quantization fields, validated and normalised to one execution scheme.

Validation happens once, at construction, so every later stage can trust the config. Every error
is a ConfigError naming the field, the bad value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Mapping

from .errors import ConfigError


BACKENDS = ("ascend", "cpu", "cuda", "kunlun", "mlu", "onnxruntime", "rocm", "tensorrt")
SCHEMES = ("W8A16", "W4A16", "FP8-W8A16", "NF4-A16", "W8A8-INT8", "W8A8-FP8")

# Accepted spellings -> canonical value, per string field.
_WEIGHT_DTYPES = {s: s for s in ("int8", "int4", "fp8", "nf4", "w8a16", "w4a16", "w8a8")}
_A16 = ("fp16", "bf16", "float16", "bfloat16", "a16", "w8a16", "w4a16", "none")
# "w8a8" as an activation spelling means "8-bit activations of the weights' kind"; resolved later.
_ACTIVATION_DTYPES = {**{s: "a16" for s in _A16}, "int8": "int8", "fp8": "fp8", "w8a8": "w8a8"}
_CALIBRATIONS = {
    **{s: s for s in ("minmax", "percentile", "smoothquant", "awq", "gptq", "smoothquant+awq", "awq+gptq")},
    "awq+smoothquant": "smoothquant+awq", "gptq+awq": "awq+gptq",
}
_KV_DTYPES = {"none": "none", "int8": "int8", "fp8": "fp8", "fp8_e4m3": "fp8"}
_ACTIVATION_SCALES = {s: s for s in ("dynamic_per_token", "static_per_tensor")}
_WEIGHT_OBSERVERS = {s: s for s in ("minmax", "mse")}
_OBSERVERS = {**{s: s for s in ("minmax", "moving_average", "percentile", "mse", "histogram")},
              "entropy": "histogram"}
_PRIORITIES = {s: s for s in ("latency", "throughput", "memory")}
_SCALE_PRECISIONS = {s: s for s in ("fp16", "fp32")}
_FP8_FORMATS = {s: s for s in ("e4m3", "e5m2")}
_BACKEND_NAMES = {s: s for s in BACKENDS}
KV_BLOCK_SIZES = (16, 32)

# (weight kind, activation kind) -> scheme; anything else is a contradiction.
_SCHEME_OF = {
    ("int8", "a16"): "W8A16",
    ("int4", "a16"): "W4A16",
    ("fp8", "a16"): "FP8-W8A16",
    ("nf4", "a16"): "NF4-A16",
    ("int8", "int8"): "W8A8-INT8",
    ("fp8", "fp8"): "W8A8-FP8",
}
_VALID_SCHEMES = (
    "valid schemes: W8A16 (weight_dtype int8|w8a16, activation_dtype a16|fp16|bf16); "
    "W4A16 (weight_dtype int4|w4a16, activation_dtype a16); "
    "FP8-W8A16 (weight_dtype fp8, activation_dtype a16); "
    "NF4-A16 (weight_dtype nf4, activation_dtype a16); "
    "W8A8-INT8 (weight_dtype int8|w8a8, activation_dtype int8|w8a8); "
    "W8A8-FP8 (weight_dtype fp8|w8a8, activation_dtype fp8)"
)
_QAT_SCHEMES = ("W8A16", "W4A16", "FP8-W8A16", "W8A8-INT8", "W8A8-FP8")
_GUARD_MODES = {s: s for s in ("enforce", "report", "off")}
_SENSITIVITY_METHODS = {s: s for s in ("measured", "fisher")}
# Accuracy-guard bounds per scheme (passes/guard.py), loose enough for legitimate quantization of
# each scheme and tight enough to stop a collapse: KL(float || quantized) and delta loss in nats
# per token on the held-back sequences, top-1 agreement as a fraction, and every quantized layer's
# own output SQNR (its scheme's bound). QuantConfig.guard_bounds overrides any of them.
# Measured on SmolLM2-135M, 2 x 256 held-back Wikipedia tokens, RTN g128 (BENCHMARKS.md, issue 10):
# W4A16 KL 0.55-0.76, delta loss 0.35-0.67, top-1 0.59-0.61, worst layer 11 dB; W8A16 KL 0.002,
# worst layer 35 dB. A collapse (ppl x1e12) is a delta loss of ~25 nats.
GUARD_BOUND_KEYS = ("max_kl", "max_delta_loss", "min_top1", "min_layer_sqnr_db")
GUARD_DEFAULTS = {
    "W8A16": {"max_kl": 0.05, "max_delta_loss": 0.05, "min_top1": 0.7, "min_layer_sqnr_db": 25.0},
    "FP8-W8A16": {"max_kl": 0.1, "max_delta_loss": 0.1, "min_top1": 0.6, "min_layer_sqnr_db": 18.0},
    "W8A8-INT8": {"max_kl": 0.3, "max_delta_loss": 0.3, "min_top1": 0.5, "min_layer_sqnr_db": 12.0},
    "W8A8-FP8": {"max_kl": 0.3, "max_delta_loss": 0.3, "min_top1": 0.5, "min_layer_sqnr_db": 12.0},
    "W4A16": {"max_kl": 1.5, "max_delta_loss": 1.5, "min_top1": 0.3, "min_layer_sqnr_db": 6.0},
    "NF4-A16": {"max_kl": 1.5, "max_delta_loss": 1.5, "min_top1": 0.3, "min_layer_sqnr_db": 6.0},
}
# What mixed precision may raise a sensitive layer to (passes/mixed_precision.py).
PRECISION_UPGRADES = ("int8", "fp8", "float")
OVERRIDE_KEYS = ("weight_dtype", "activation_dtype", "group_size", "symmetric", "per_channel",
                 "clip_ratio")
SKIP = "skip"


def _fail(name: str, value: Any, why: str, valid: str) -> ConfigError:
    return ConfigError(f"QuantConfig.{name}={value!r} {why}; valid: {valid}")


def _choice(name: str, value: Any, choices: Mapping[str, str]) -> str:
    valid = ", ".join(sorted(choices))
    if not isinstance(value, str):
        raise _fail(name, value, "must be a string", valid)
    key = value.strip().lower()
    if key not in choices:
        raise _fail(name, value, "is not supported", valid)
    return choices[key]


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "must be a bool", "True, False")
    return value


def _int(name: str, value: Any, minimum: int) -> int:
    # bool is an int subclass; True as a sample count is always a mistake.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(name, value, "is not valid", f"an int >= {minimum}")
    return value


def _group(name: str, value: Any, allow_minus_one: bool) -> int | None:
    valid = "None or a positive int" + (" (-1 means None)" if allow_minus_one else "")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(name, value, "must be an int or None", valid)
    if allow_minus_one and value == -1:
        return None
    if value <= 0:
        raise _fail(name, value, "is not a valid group size", valid)
    return value


def _clip(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise _fail(name, value, "is out of range", "a finite float in (0, 1]")
    return float(value)


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(name, value, "is not a finite number", "a finite int or float")
    return float(value)


def _str_list(name: str, value: Any) -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) and p for p in value):
        raise _fail(name, value, "must be a list of non-empty strings", "e.g. ['lm_head']")
    return list(value)


def strict_from_dict(cls, data: Mapping[str, Any]):
    """Build a dataclass from a mapping, refusing unknown keys by name (a typo must fail)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{cls.__name__}.from_dict needs a mapping, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field {unknown[0]!r}; valid fields: {', '.join(names)}")
    return cls(**data)


def layer_matches(layer_name: str, pattern: str) -> bool:
    """True when glob `pattern` matches the whole name or a dotted suffix of it.

    So "lm_head" selects "model.lm_head" and "layers.0.*" selects "model.layers.0.mlp.up_proj",
    while "k_proj" does not select "kk_proj".
    """
    return (layer_name == pattern or fnmatchcase(layer_name, pattern)
            or fnmatchcase(layer_name, "*." + pattern))


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


@dataclass
class QuantConfig:
    """The seed's fields plus ignore/overrides/fallback/KV settings; see `scheme`."""

    weight_dtype: str = "int4"
    activation_dtype: str = "w8a16"
    calibration: str = "minmax"
    group_size: int | None = 128
    symmetric: bool = True
    per_channel: bool = True
    kv_cache_dtype: str = "none"
    clip_ratio: float = 1.0
    enable_qat: bool = False
    fuse_ln: bool = True
    fuse_qdq: bool = True
    backend: str = "cpu"
    priority: str = "latency"
    draft_mode: bool = False
    scale_precision: str = "fp16"
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    overrides: dict[str, Any] = field(default_factory=dict)
    fp8_format: str = "e4m3"
    calibration_samples: int = 128
    calibration_seq_len: int = 512
    fallback: str | None = None
    kv_block_size: int = 16
    kv_group_size: int | None = None
    kv_high_precision_layers: list[int] = field(default_factory=list)
    # Quantized activations: scales computed per token at run time, or one static scale per
    # tensor from calibration.
    activation_scale: str = "dynamic_per_token"
    # Activation range observer; None picks percentile for calibration='percentile', else minmax.
    observer: str | None = None
    # Weight scales: each block's min/max, or the shrink of it with the smallest round-trip MSE
    # (used by convert's round-to-nearest and by GPTQ's group scales).
    weight_observer: str = "minmax"
    # Algorithm options (used only by the calibration method that names them).
    smoothquant_alpha: float | str = 0.5   # migration strength, or "auto" for a per-layer search
    awq_grid: int = 20                     # scale-ratio grid points of the AWQ search
    awq_clip: bool = True                  # AWQ's weight clipping search
    # Also search s = mean|x|^r / mean|ŵ|^(1-r). Off by default: on SmolLM2 W4A16 g128 it won the
    # per-linear objective on 34 of 90 groups yet gave ppl 41.35 vs 40.53 without (BENCHMARKS §2a).
    awq_duo_scaling: bool = False
    awq_search_rows: int = 2048            # calibration token rows the scale search runs on
    gptq_block_size: int = 128
    gptq_damp: float = 0.01                # dampening, as a fraction of mean(diag(H))
    gptq_act_order: bool = False
    # Quantize a block's linears stage by stage (q/k/v, o, gate/up, down), each stage's Hessians
    # observed after the earlier stages were quantized; False: one observation run per block.
    gptq_true_sequential: bool = True
    # QLoRA's double quantization: NF4's per-block scales stored as uint8 codes with one fp32
    # scale and zero point per 256 scales (0.13 instead of 0.25 bits/weight at block 64, fp16).
    nf4_double_quant: bool = False
    qat_learn_scales: bool = True          # QAT: LSQ-learned scales (False: observers track them)
    # Accuracy guard: the last `guard_samples` calibration sequences are held back from calibration
    # and float vs quantized is measured on them; "enforce" fails the compile past a bound,
    # "report" only records, "off" does neither.
    guard: str = "enforce"
    guard_samples: int = 2
    guard_bounds: dict[str, float] = field(default_factory=dict)  # overrides GUARD_DEFAULTS
    # Mixed precision by budget (at most one target): average bits per weight over the quantized
    # linears (fp16 for layers kept float), or the largest summed per-layer delta loss (nats).
    target_bits_per_weight: float | None = None
    target_max_delta_loss: float | None = None
    precision_upgrades: list[str] = field(default_factory=lambda: ["int8", "float"])
    sensitivity_samples: int = 2  # calibration sequences the per-layer sensitivity is measured on
    # "measured": one forward per layer and option (exact, slow on large models); "fisher": one
    # backward pass, second-order estimate with the diagonal empirical Fisher.
    sensitivity_method: str = "measured"

    def __post_init__(self) -> None:
        self.weight_dtype = _choice("weight_dtype", self.weight_dtype, _WEIGHT_DTYPES)
        self.activation_dtype = self._resolve_activation(
            _choice("activation_dtype", self.activation_dtype, _ACTIVATION_DTYPES))
        self.calibration = _choice("calibration", self.calibration, _CALIBRATIONS)
        self.group_size = _group("group_size", self.group_size, allow_minus_one=True)
        for name in ("symmetric", "per_channel", "enable_qat", "fuse_ln", "fuse_qdq", "draft_mode"):
            _bool(name, getattr(self, name))
        self.kv_cache_dtype = _choice("kv_cache_dtype", self.kv_cache_dtype, _KV_DTYPES)
        self.clip_ratio = _clip("clip_ratio", self.clip_ratio)
        self.backend = _choice("backend", self.backend, _BACKEND_NAMES)
        self.priority = _choice("priority", self.priority, _PRIORITIES)
        self.scale_precision = _choice("scale_precision", self.scale_precision, _SCALE_PRECISIONS)
        self.ignore = _str_list("ignore", self.ignore)
        self.fp8_format = _choice("fp8_format", self.fp8_format, _FP8_FORMATS)
        self.calibration_samples = _int("calibration_samples", self.calibration_samples, 1)
        self.calibration_seq_len = _int("calibration_seq_len", self.calibration_seq_len, 1)
        self.activation_scale = _choice("activation_scale", self.activation_scale, _ACTIVATION_SCALES)
        self._check_algorithm_options()
        self._check_guard_and_budget()
        self._check_observer()
        self.weight_observer = _choice("weight_observer", self.weight_observer, _WEIGHT_OBSERVERS)
        self._check_fallback()
        self._check_kv()
        self._check_scheme()
        self._check_overrides()

    def _check_algorithm_options(self) -> None:
        alpha = self.smoothquant_alpha
        if alpha != "auto":
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
                raise _fail("smoothquant_alpha", alpha, "is not supported", "a number in [0, 1] or 'auto'")
            self.smoothquant_alpha = float(alpha)
        self.awq_grid = _int("awq_grid", self.awq_grid, 2)
        self.awq_search_rows = _int("awq_search_rows", self.awq_search_rows, 1)
        self.gptq_block_size = _int("gptq_block_size", self.gptq_block_size, 1)
        for name in ("awq_clip", "awq_duo_scaling", "gptq_act_order", "gptq_true_sequential", "qat_learn_scales", "nf4_double_quant"):
            _bool(name, getattr(self, name))
        if self.nf4_double_quant and self._weight_kind() != "nf4":
            raise _fail("nf4_double_quant", True, f"needs weight_dtype='nf4' (got "
                        f"{self.weight_dtype!r})", "False, or weight_dtype='nf4'")
        damp = self.gptq_damp
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
            raise _fail("gptq_damp", damp, "is not supported", "a number in (0, 1), e.g. 0.01")
        self.gptq_damp = float(damp)

    def _check_observer(self) -> None:
        if self.observer is None:
            return
        self.observer = _choice("observer", self.observer, _OBSERVERS)
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

    @property
    def observer_kind(self) -> str:
        """The activation observer calibration uses (QuantConfig.observer or its default)."""
        if self.observer is not None:
            return self.observer
        return "percentile" if self.calibration == "percentile" else "minmax"

    def _check_guard_and_budget(self) -> None:
        self.guard = _choice("guard", self.guard, _GUARD_MODES)
        self.guard_samples = _int("guard_samples", self.guard_samples, 1)
        self.sensitivity_samples = _int("sensitivity_samples", self.sensitivity_samples, 1)
        self.sensitivity_method = _choice("sensitivity_method", self.sensitivity_method, _SENSITIVITY_METHODS)
        if not isinstance(self.guard_bounds, dict):
            raise _fail("guard_bounds", self.guard_bounds, "must be a dict",
                        f"{{name: number}} with names {', '.join(GUARD_BOUND_KEYS)}")
        self.guard_bounds = dict(self.guard_bounds)  # normalised below; the caller's dict untouched
        for key, value in list(self.guard_bounds.items()):
            if key not in GUARD_BOUND_KEYS:
                raise _fail("guard_bounds", {key: value}, "has an unknown bound",
                            ", ".join(GUARD_BOUND_KEYS))
            self.guard_bounds[key] = _finite(f"guard_bounds[{key!r}]", value)
        top1 = self.guard_bounds.get("min_top1")
        if top1 is not None and not 0 <= top1 <= 1:
            raise _fail("guard_bounds['min_top1']", top1, "is out of range", "a fraction in [0, 1]")
        for name in ("target_bits_per_weight", "target_max_delta_loss"):
            value = getattr(self, name)
            if value is not None and _finite(name, value) <= 0:
                raise _fail(name, value, "is not valid", "None or a positive number")
        if self.target_bits_per_weight is not None and self.target_max_delta_loss is not None:
            raise ConfigError("QuantConfig.target_bits_per_weight and target_max_delta_loss are both "
                              "set; mixed precision meets one target: set only one of them")
        ups = _str_list("precision_upgrades", self.precision_upgrades)
        bad = [u for u in ups if u not in PRECISION_UPGRADES]
        if bad or len(set(ups)) != len(ups):
            raise _fail("precision_upgrades", ups, "is not valid",
                        f"distinct entries of {', '.join(PRECISION_UPGRADES)}")

    def guard_bound(self, name: str, scheme: str) -> float:
        """The guard's bound `name` for layers / models of `scheme`: guard_bounds, else the default."""
        return self.guard_bounds.get(name, GUARD_DEFAULTS[scheme][name])

    def _resolve_activation(self, act: str) -> str:
        if act != "w8a8":
            return act
        # w8a8 names 8-bit activations; they are fp8 only when the weights are fp8.
        return "fp8" if self.weight_dtype == "fp8" else "int8"

    def _check_fallback(self) -> None:
        if self.fallback is None:
            return
        self.fallback = _choice("fallback", self.fallback, _BACKEND_NAMES)
        if self.fallback == self.backend:
            others = ", ".join(b for b in BACKENDS if b != self.backend)
            raise _fail("fallback", self.fallback,
                        f"equals QuantConfig.backend={self.backend!r}", f"None or one of {others}")

    def _check_kv(self) -> None:
        if type(self.kv_block_size) is not int or self.kv_block_size not in KV_BLOCK_SIZES:
            raise _fail("kv_block_size", self.kv_block_size, "is not supported", "16, 32")
        self.kv_group_size = _group("kv_group_size", self.kv_group_size, allow_minus_one=False)
        layers = self.kv_high_precision_layers
        if not isinstance(layers, (list, tuple)) or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
            raise _fail("kv_high_precision_layers", layers, "must be a list of layer indices",
                        "a list of ints >= 0")
        self.kv_high_precision_layers = sorted(set(layers))

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
        if weight in ("int4", "nf4") and act != "a16":
            raise self._contradiction("W4A8 (4-bit weights, 8-bit activations) is not supported "
                                      "in this build")
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

    def _check_overrides(self) -> None:
        if not isinstance(self.overrides, dict):
            raise _fail("overrides", self.overrides, "must be a dict",
                        "{pattern: {field: value} | 'skip'}")
        checked: dict[str, Any] = {}
        for pattern, value in self.overrides.items():
            if not isinstance(pattern, str) or not pattern:
                raise _fail("overrides", pattern, "has a pattern that is not a non-empty string",
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
        self.overrides = checked

    def _layer_config(self, changes: Mapping[str, Any], where: str) -> QuantConfig:
        for key in changes:
            if key not in OVERRIDE_KEYS:
                raise ConfigError(f"QuantConfig.{where} sets unknown key {key!r}; valid keys: "
                                  f"{', '.join(OVERRIDE_KEYS)}")
        try:
            # No overrides in the per-layer config: they are what is being applied.
            return dataclasses.replace(self, overrides={}, **changes)
        except ConfigError as err:
            raise ConfigError(f"QuantConfig.{where}: {err}") from None

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

    def is_ignored(self, layer_name: str) -> bool:
        return any(layer_matches(layer_name, p) for p in self.ignore)

    def layer_settings(self, layer_name: str) -> LayerSettings | None:
        """Effective settings of one layer; None when it stays in float (ignored or 'skip')."""
        if self.is_ignored(layer_name):
            return None
        merged: dict[str, Any] = {}
        skip = False
        for pattern, value in self.overrides.items():  # later patterns win
            if layer_matches(layer_name, pattern):
                skip = value == SKIP
                if not skip:
                    merged.update(value)
        if skip:
            return None
        layer = self._layer_config(merged, f"overrides of layer {layer_name!r}") if merged else self
        return LayerSettings(layer.scheme, layer.weight_format, layer.activation_format,
                             layer.group_size, layer.per_channel, layer.symmetric,
                             layer.clip_ratio)

    def replace(self, **changes: Any) -> QuantConfig:
        """A new, validated config with `changes` applied."""
        return QuantConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)  # unsorted: override order matters

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantConfig:
        return strict_from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise ConfigError(f"QuantConfig JSON is not valid JSON: {err}") from None
        return cls.from_dict(data)
