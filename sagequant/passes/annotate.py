"""annotate: decide, per linear node, whether and how it is quantized (the only pass that reads the
per-layer rules of QuantConfig); later passes act on the NodeAnnotation it writes."""
from __future__ import annotations

import torch

from ..config import ConfigError, LayerSettings, QuantConfig, layer_matches
from ..ir.annotations import META_KEY, NodeAnnotation
from ..ir.graph import QuantGraph
from ..ir.quant_spec import QuantSpec
from ..ir.trace import layer_name
from .manager import PassContext, PassResult, define_pass

ATEN = torch.ops.aten


@define_pass("annotate", "attach QuantSpecs to linear nodes from QuantConfig and ignore/override rules",
               requires=("canonicalize",))
def annotate(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    linears = graph.nodes(ATEN.linear.default)
    names = [layer_name(n) or n.name for n in linears]
    check_patterns_match(cfg, names)
    quantized = skipped = 0
    for node, name in zip(linears, names):
        ann = _annotation_for(graph, node, name, cfg)
        node.meta[META_KEY] = ann
        quantized += ann.quantized
        skipped += not ann.quantized
    return PassResult(graph, bool(linears), {"quantized": quantized, "kept_float": skipped})


def _annotation_for(graph: QuantGraph, node, name: str, cfg: QuantConfig) -> NodeAnnotation:
    weight = node.args[1]
    if getattr(weight, "op", None) != "get_attr":
        return NodeAnnotation(name, skip_reason="weight is computed in the graph, not a parameter")
    specs = layer_specs(cfg, name)
    if specs is None:
        reason = "QuantConfig.ignore" if cfg.is_ignored(name) else "QuantConfig.overrides: skip"
        return NodeAnnotation(name, skip_reason=reason)
    settings, weight_spec, input_spec = specs
    return NodeAnnotation(name, scheme=settings.scheme, weight_spec=weight_spec,
                          input_spec=input_spec, clip_ratio=settings.clip_ratio)


def layer_specs(cfg: QuantConfig, name: str) -> tuple[LayerSettings, QuantSpec, QuantSpec | None] | None:
    """(settings, weight spec, input activation spec or None) of layer `name`; None when it stays
    float. The one decision, shared by the torch pass and the ONNX frontend."""
    settings = cfg.layer_settings(name)
    if settings is None:
        return None
    input_spec = None
    if settings.activation_format:
        dynamic = cfg.activation_scale == "dynamic_per_token"
        input_spec = QuantSpec(settings.activation_format, "per_token" if dynamic else "per_tensor",
                               None, True, "fp32", dynamic=dynamic)
    return settings, weight_spec_for(settings, cfg.scale_precision), input_spec


def weight_spec_for(settings: LayerSettings, scale_precision: str) -> QuantSpec:
    if settings.group_size:
        granularity, group = "per_group", settings.group_size
    else:
        granularity, group = ("per_channel" if settings.per_channel else "per_tensor"), None
    return QuantSpec(settings.weight_format, granularity, group, settings.symmetric, scale_precision)


def check_patterns_match(cfg: QuantConfig, names: list[str]) -> None:
    """A pattern that matches no layer is almost always a typo; saying so beats ignoring it."""
    for field, patterns in (("ignore", cfg.ignore), ("overrides", list(cfg.overrides))):
        for pat in patterns:
            if not any(layer_matches(n, pat) for n in names):
                sample = ", ".join(names[:4] + (["..."] if len(names) > 4 else []))
                raise ConfigError(f"QuantConfig.{field} pattern {pat!r} matches no linear layer of "
                                  f"this model ({len(names)} layers, e.g. {sample})")
