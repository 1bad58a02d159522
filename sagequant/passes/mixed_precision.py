"""mixed_precision: per-layer schemes chosen by measured sensitivity to meet a budget.

Runs after annotate, while the weights are still float. For every quantized linear it measures
the delta loss of quantizing that layer alone at its annotated scheme and at each entry of
QuantConfig.precision_upgrades (calibration/sensitivity.py, on the first
QuantConfig.sensitivity_samples calibration sequences), then picks one option per layer to meet
QuantConfig.target_bits_per_weight or target_max_delta_loss (calibration/precision_budget.py).
The choice is written into the annotations, so convert / lower quantize and bind each layer at
its own scheme; layers kept float carry the reason as their skip_reason, and the pass's stats
list every layer raised above its base with its numbers.
"""
from __future__ import annotations

import torch

from ..calibration.datasets import CalibrationDataError
from ..calibration.precision_budget import choose_precisions
from ..calibration.sensitivity import fisher_sensitivity, layer_sensitivity
from ..config import ConfigError, LayerSettings, QuantConfig
from ..ir.graph import QuantGraph
from .annotate import weight_spec_for
from .manager import PassContext, PassResult, define_pass

ATEN = torch.ops.aten
FLOAT = "float"
FLOAT_BYTES = 2  # a layer kept float is counted at fp16, the deployment dtype


@define_pass("mixed_precision", "choose per-layer schemes from measured sensitivity to meet a budget",
               requires=("annotate",))
def mixed_precision(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    target = _target(cfg)
    if target is None:
        raise ConfigError("mixed_precision needs QuantConfig.target_bits_per_weight or "
                          "target_max_delta_loss (passes/pipeline.py leaves the pass out without one)")
    if not ctx.calibration_batches:
        raise CalibrationDataError("mixed precision measures per-layer sensitivity on calibration data; "
                                   "pass calibration_data=")
    nodes = quantized_linears(graph)
    if not nodes:
        raise ConfigError("mixed precision has no quantized linear layer to choose precisions for "
                          "(every layer is ignored or skipped)")
    upgrades = upgrade_settings(cfg)
    base_label = cfg.scheme
    batches = ctx.calibration_batches[:cfg.sensitivity_samples]
    base_loss, rows = sensitivity(graph, batches, layer_options(graph, nodes, cfg, upgrades), cfg,
                                  ctx.reference_model)
    for r in rows:
        r["options"][FLOAT] = {"delta_loss": 0.0, "bytes": r["params"] * FLOAT_BYTES}
    ladder = [base_label, *upgrades]
    choices = choose_precisions(rows, ladder, **target)
    upgraded = []
    ranks = {r["layer"]: i + 1 for i, r in enumerate(
        sorted(rows, key=lambda r: -r["options"][base_label]["delta_loss"]))}
    for node, choice in zip(nodes, choices):
        if choice.label == base_label:
            continue
        why = (f"mixed_precision: delta loss {choice.base_delta_loss:.3e} nats alone at {base_label} "
               f"(sensitivity rank {ranks[choice.layer]}/{len(rows)}), {choice.delta_loss:.3e} at "
               f"{choice.label}; raised to meet {_describe_target(target)}")
        _apply(graph, node, choice.label, upgrades, cfg, why)
        upgraded.append({"layer": choice.layer, "to": choice.label, "why": why,
                         "base_delta_loss": choice.base_delta_loss, "delta_loss": choice.delta_loss})
    params = sum(r["params"] for r in rows)
    total = sum(c.bytes for c in choices)
    counts = {label: sum(c.label == label for c in choices) for label in ladder}
    return PassResult(graph, bool(upgraded), {
        "target": target, "base_scheme": base_label, "ladder": ladder,
        "sensitivity_method": cfg.sensitivity_method, "sensitivity_sequences": len(batches),
        "float_loss": base_loss,
        "predicted_delta_loss": sum(c.delta_loss for c in choices),
        "bits_per_weight": 8 * total / params, "bytes": total, "layers_per_option": counts,
        "upgraded": upgraded,
        "sensitivity": rows})


def sensitivity(graph: QuantGraph, batches: list, options: dict, cfg: QuantConfig, model):
    """(float loss, rows) by QuantConfig.sensitivity_method."""
    if cfg.sensitivity_method == "measured":
        return layer_sensitivity(graph, batches, options)
    if model is None:
        raise ConfigError("QuantConfig.sensitivity_method='fisher' needs the float model (compile a "
                          "torch module, not a saved graph), or use sensitivity_method='measured'")
    return fisher_sensitivity(model, graph, batches, options)


def _target(cfg: QuantConfig) -> dict | None:
    if cfg.target_bits_per_weight is not None:
        return {"bits_per_weight": cfg.target_bits_per_weight}
    if cfg.target_max_delta_loss is not None:
        return {"max_delta_loss": cfg.target_max_delta_loss}
    return None


def _describe_target(target: dict) -> str:
    (key, value), = target.items()
    return f"QuantConfig.target_{key}={value:g}"


def quantized_linears(graph: QuantGraph) -> list:
    return [n for n in graph.annotated()
            if graph.annotation(n).quantized and n.target == ATEN.linear.default]


def upgrade_settings(cfg: QuantConfig) -> dict[str, LayerSettings | None]:
    """{label: settings} of each precision_upgrades entry, cheapest first; float is None."""
    out: dict[str, LayerSettings | None] = {}
    for up in cfg.precision_upgrades:
        if up == FLOAT:
            out[FLOAT] = None
            continue
        try:
            up_cfg = cfg.replace(weight_dtype=up, overrides={})
        except ConfigError as err:
            raise ConfigError(f"QuantConfig.precision_upgrades entry {up!r} cannot apply to scheme "
                              f"{cfg.scheme}: {err}") from None
        if up_cfg.scheme == cfg.scheme:
            raise ConfigError(f"QuantConfig.precision_upgrades entry {up!r} gives the base scheme "
                              f"{cfg.scheme} again; list only higher precisions")
        out[up_cfg.scheme] = LayerSettings(up_cfg.scheme, up_cfg.weight_format, up_cfg.activation_format,
                                           up_cfg.group_size, up_cfg.per_channel, up_cfg.symmetric,
                                           up_cfg.clip_ratio)
    if FLOAT in out:  # float is the most expensive rung
        out[FLOAT] = out.pop(FLOAT)
    return out


def layer_options(graph: QuantGraph, nodes: list, cfg: QuantConfig, upgrades: dict) -> dict:
    """{node: {label: weight QuantSpec}}: the annotated spec and each quantized upgrade."""
    options = {}
    for node in nodes:
        ann = graph.annotation(node)
        if ann.scheme != cfg.scheme:
            raise ConfigError(f"mixed precision chooses from base scheme {cfg.scheme}, but layer "
                              f"{ann.layer} is {ann.scheme} through QuantConfig.overrides; drop the "
                              "override or the target")
        specs = {cfg.scheme: ann.weight_spec}
        specs.update({label: weight_spec_for(s, cfg.scale_precision)
                      for label, s in upgrades.items() if s is not None})
        options[node] = specs
    return options


def _apply(graph: QuantGraph, node, label: str, upgrades: dict, cfg: QuantConfig, why: str) -> None:
    if label == FLOAT:
        graph.update_annotation(node, scheme=None, weight_spec=None, input_spec=None, skip_reason=why)
        return
    settings = upgrades[label]
    graph.update_annotation(node, scheme=settings.scheme,
                            weight_spec=weight_spec_for(settings, cfg.scale_precision))


def model_sensitivity(model, cfg: QuantConfig, batches: list) -> tuple[float, list[dict]]:
    """The sensitivity table of a float model under `cfg` (its scheme and precision_upgrades):
    trace, canonicalize and annotate it, then measure every quantized linear alone."""
    from ..ir.trace import trace_model
    from .pipeline import PTQ, build_pipeline
    graph = trace_model(model)
    graph = build_pipeline(cfg, PTQ).manager(stop_after="annotate").run(graph, PassContext(cfg, batches))
    nodes = quantized_linears(graph)
    return sensitivity(graph, batches, layer_options(graph, nodes, cfg, upgrade_settings(cfg)), cfg, model)
