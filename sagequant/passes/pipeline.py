"""The one driver: which passes a compile runs, in which order, with which options, built as data
from a QuantConfig and a mode. Every entry point builds its pipeline here (api.compile, QAT,
the step graph of the generation engine, ONNX input models) and runs it through a PassManager,
whose instruments (print IR, dumps, timing, verify, stop-after) stay as they are.

A pass that does not apply to the config is not in the list; the pipeline says why (`omitted`),
`describe()` prints both, and `to_dict()` is what an artifact records of the compile that made it.
Options are the config fields a pass reads, taken from the config's sections (typed and
validated there); statistics are each pass's PassResult.stats, recorded in the pass history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import ConfigError, QuantConfig
from ..config.calibration import AWQ_METHODS, GPTQ_METHODS, SMOOTHQUANT_METHODS
from .manager import PASSES, Instrument, PassManager

PTQ, QAT, LAYERWISE, STEP_GRAPH, ONNX = "ptq", "qat", "layerwise", "step_graph", "onnx"
MODES = (PTQ, QAT, LAYERWISE, STEP_GRAPH, ONNX)


@dataclass(frozen=True)
class PlannedPass:
    name: str
    options: dict[str, Any]  # the config fields the pass reads, as validated


@dataclass(frozen=True)
class OmittedPass:
    name: str
    reason: str


@dataclass(frozen=True)
class Step:
    """One row of a mode's table: the pass, the config fields it reads, and why it would not
    apply (None: it always applies)."""

    name: str
    options: tuple[str, ...] = ()
    omit: Callable[[QuantConfig, dict], str | None] | None = None


def _no_budget(cfg, _):
    if cfg.target_bits_per_weight is None and cfg.target_max_delta_loss is None:
        return "no target_bits_per_weight / target_max_delta_loss"


def _method_not(methods):
    return lambda cfg, _: None if cfg.calibration in methods else f"calibration={cfg.calibration}"


def _guard_omitted(cfg, inputs):
    if cfg.guard == "off":
        return "QuantConfig.guard='off'"
    if not inputs.get("held_back"):
        return "no calibration data, so nothing was held back to measure on"
    if not inputs.get("reference"):
        return "no float model to compare with"


def _no_static_scales(cfg, _):
    """ONNX calibration computes static activation scales only."""
    if cfg.activation_scale != "static_per_tensor":
        return "QuantConfig.activation_scale='dynamic_per_token' (no static activation scales)"
    overridden = any(isinstance(o, dict) and o.get("activation_dtype", "a16") != "a16"
                     for o in cfg.overrides.values())
    if cfg.activation_format is None and not overridden:
        return f"scheme {cfg.scheme} keeps activations 16-bit (no activation scales)"


def _no_fuse(cfg, _):
    return None if cfg.fuse_qdq else "QuantConfig.fuse_qdq=False"


def _no_rotation(cfg, _):
    return "QuantConfig.rotate='off'" if cfg.rotate == "off" else None


_ROTATE = Step("rotate", ("rotate", "rotate_online", "rotate_heads", "rotate_seed"), _no_rotation)
# rotate before every pass that reads weights or activations (sensitivity, smoothing, AWQ, GPTQ,
# observers), so they all see the rotated model.
_CANONICALIZE = Step("canonicalize")
_ANNOTATE = Step("annotate", ("ignore", "overrides", "scale_precision", "activation_scale"))
_BEFORE_CONVERT = (
    _CANONICALIZE,
    _ANNOTATE,
    _ROTATE,
    Step("mixed_precision", ("target_bits_per_weight", "target_max_delta_loss", "precision_upgrades",
                             "sensitivity_samples", "sensitivity_method"), _no_budget),
    Step("smoothquant", ("smoothquant_alpha",), _method_not(SMOOTHQUANT_METHODS)),
    Step("awq", ("awq_grid", "awq_clip", "awq_duo_scaling", "awq_search_rows", "awq_sink_weight", "awq_scale_loss",
                "sink_tokens"),
         _method_not(AWQ_METHODS)),
    Step("insert_observers", ("observer",)),
    Step("calibrate"),
    Step("gptq", ("gptq_block_size", "gptq_damp", "gptq_act_order", "gptq_static_groups", "gptq_true_sequential",
                  "sink_tokens",
                  "gptq_row_energy_cap", "gptq_sink_weight", "gptq_select_blocks"),
         _method_not(GPTQ_METHODS)),
)
_FROM_CONVERT = (
    Step("convert", ("weight_observer", "nf4_double_quant")),
    Step("lower", ("backend", "priority", "fallback")),
    Step("schedule"),
)
# Last: the accuracy checks and scheduler IR see one kernel per linear; the fusion is exact.
_FUSE = Step("fuse_norm_qdq", ("fuse_ln",), _no_fuse)
_QAT_TRAINING = (Step("fake_quant", ("qat_learn_scales",)), Step("qat_train"), Step("fold_fake_quant"))

TABLES: dict[str, tuple[Step, ...]] = {
    PTQ: _BEFORE_CONVERT + _FROM_CONVERT
    + (Step("guard", ("guard", "guard_samples", "guard_bounds"), _guard_omitted), _FUSE),
    # The guard measures on sequences compile() holds back from calibration; QAT trains on its data.
    QAT: _BEFORE_CONVERT + _QAT_TRAINING + _FROM_CONVERT + (_FUSE,),
    # compile(device=...): the calibration and convert passes run block by block inside layerwise.
    LAYERWISE: (_CANONICALIZE, _ANNOTATE) + (
        Step("layerwise", ("calibration", "smoothquant_alpha", "awq_grid", "awq_clip", "awq_sink_weight",
                           "awq_scale_loss", "gptq_block_size",
                           "gptq_damp", "gptq_act_order", "gptq_static_groups", "gptq_true_sequential",
                           "gptq_row_energy_cap",
                           "gptq_sink_weight", "observer",
                           "weight_observer")),) + _FROM_CONVERT[1:] + (_FUSE,),
    STEP_GRAPH: (Step("kv_cache"),
                 Step("kv_cache_quant", ("kv_cache_dtype", "kv_block_size", "kv_group_size",
                                         "kv_high_precision_layers"))),
    # ONNX input models: the frontend's own steps over an onnx graph (frontends/onnx/compile.py).
    ONNX: (Step("load"), Step("annotate", ("ignore", "overrides", "scale_precision", "activation_scale")),
           Step("smoothquant", ("smoothquant_alpha",), _method_not(("smoothquant",))),
           Step("awq", ("awq_grid", "awq_clip"), _method_not(("awq",))),
           Step("calibrate", ("observer",), _no_static_scales),
           Step("quantize")),
}
# The passes a PTQ compile may run, in order (the CLI's --print-ir-after / --stop-after).
PTQ_PASSES = tuple(s.name for s in TABLES[PTQ])


@dataclass(frozen=True)
class Pipeline:
    mode: str
    passes: tuple[PlannedPass, ...]
    omitted: tuple[OmittedPass, ...] = ()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def omitted_reason(self, name: str) -> str | None:
        return next((o.reason for o in self.omitted if o.name == name), None)

    def manager(self, instruments: list[Instrument] | None = None, verify_each: bool = True,
                stop_after: str | None = None) -> PassManager:
        if self.mode == ONNX:
            raise ValueError("the ONNX pipeline's steps run in frontends/onnx/compile.py, over an onnx graph")
        if stop_after is not None and stop_after not in self.names and self.omitted_reason(stop_after):
            raise ConfigError(f"stop_after={stop_after!r}: that pass is not in this pipeline "
                             f"({self.omitted_reason(stop_after)}); passes: {', '.join(self.names)}")
        return PassManager(self.names, instruments, verify_each=verify_each, stop_after=stop_after)

    def describe(self) -> str:
        width = max([len(p.name) for p in self.passes] + [len(o.name) for o in self.omitted])
        lines = [f"pipeline ({self.mode}): {len(self.passes)} passes"]
        for i, p in enumerate(self.passes, 1):
            options = " ".join(f"{k}={v!r}" for k, v in p.options.items())
            lines.append(f"  {i:2d}. {p.name:<{width}}  {options}".rstrip())
        if self.omitted:
            lines.append("not run:")
            lines += [f"      {o.name:<{width}}  {o.reason}" for o in self.omitted]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "passes": [{"name": p.name, "options": p.options} for p in self.passes],
                "omitted": [{"name": o.name, "reason": o.reason} for o in self.omitted]}

    @classmethod
    def from_dict(cls, data: dict) -> Pipeline:
        return cls(data["mode"], tuple(PlannedPass(p["name"], dict(p["options"])) for p in data["passes"]),
                   tuple(OmittedPass(o["name"], o["reason"]) for o in data.get("omitted", ())))


def build_pipeline(config: QuantConfig, mode: str = PTQ, *, held_back: bool = False,
                   reference: bool = False) -> Pipeline:
    """The pipeline `mode` runs for `config`. held_back / reference: compile() holds sequences
    back from calibration and has the float model (the accuracy guard needs both)."""
    if mode not in TABLES:
        raise ValueError(f"unknown pipeline mode {mode!r}; modes: {', '.join(MODES)}")
    if config.rotate != "off" and mode in (LAYERWISE, ONNX):
        raise ConfigError(f"QuantConfig.rotate={config.rotate!r} is not supported in the {mode} pipeline "
                          f"(it rotates the whole traced model's weights at once); rotate runs in "
                          f"{PTQ} and {QAT} compiles (no device= layer-wise compile, no ONNX input model)")
    inputs = {"held_back": held_back, "reference": reference}
    planned, omitted = [], []
    for step in TABLES[mode]:
        if mode != ONNX and step.name not in PASSES:
            raise ValueError(f"pipeline {mode} names pass {step.name!r}, which is not registered")
        reason = step.omit(config, inputs) if step.omit else None
        if reason:
            omitted.append(OmittedPass(step.name, reason))
        else:
            planned.append(PlannedPass(step.name, {k: getattr(config, k) for k in step.options}))
    return Pipeline(mode, tuple(planned), tuple(omitted))
