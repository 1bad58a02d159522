"""awq: activation-aware weight quantization (calibration/awq.py holds the search math).

For every balance group (ir/patterns.py) the pass searches the per-channel scale s = mean|x|^r
(grid over r) that minimises the group's output error after quantizing W·s, folds 1/s into the
producer and s into the consumers (float-equivalent), then optionally searches a clip per weight
group that minimises the layer output error and clamps the weights to it; convert's
round-to-nearest then lands on AWQ's grid. Statistics come from one sequential run over the
calibration data, on a fixed sample of QuantConfig.awq_search_rows input rows per distinct linear input,
past each sequence's first QuantConfig.sink_tokens (attention-sink) positions (0 by default).
QuantConfig.awq_sink_weight != 1 instead keeps every sequence's first position apart, weighted in
both searches as that many positions, with the sample drawn past it.
With calibration='awq+gptq' the gptq pass then rounds the balanced (and clipped) weights.
"""
from __future__ import annotations

import torch

from ..calibration.awq import awq_search_clip, awq_search_scales
from ..calibration.datasets import CalibrationDataError
from ..calibration.stats import collect_input_stats
from ..config import ConfigError
from ..ir.graph import QuantGraph
from ..ir.patterns import balance_groups
from ..progress import track
from .awq_output import ATTENTION_SEQUENCES, SegmentRuns, output_module
from .fold_scales import fold_group_scales
from .manager import PassContext, PassResult, define_pass

ATEN = torch.ops.aten


@define_pass("awq", "activation-aware scale search folded into producers, then weight clip search",
               requires=("annotate",))
def awq(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    if cfg.activation_format is not None:
        raise ConfigError(f"QuantConfig.calibration={cfg.calibration!r}: AWQ protects salient weight "
                          f"channels for weight-only schemes (W4A16, W8A16, NF4-A16, FP8-W8A16); "
                          f"scheme {cfg.scheme} quantizes activations: use calibration='smoothquant'")
    if not ctx.calibration_batches:
        raise CalibrationDataError("AWQ needs calibration data (its search runs on layer inputs); "
                                   "pass calibration_data=")
    linears = [n for n in graph.nodes(ATEN.linear.default)
               if graph.annotation(n) is not None and graph.annotation(n).quantized]
    first_reader = {}
    for n in linears:
        first_reader.setdefault(n.args[0], n)
    runs = SegmentRuns() if cfg.awq_scale_loss == "module" else None

    def keep_inputs(runner, seg, caches):   # each segment's input, float model, first sequences
        runs.runner = runner
        runs.caches[seg] = [dict(c) for c in caches[:ATTENTION_SEQUENCES]]
    raw = collect_input_stats(graph, ctx.calibration_batches, list(first_reader.values()),
                              cfg.awq_search_rows, desc="awq: statistics", sink_tokens=cfg.sink_tokens,
                              keep_sink=cfg.awq_sink_weight != 1, before_segment=keep_inputs if runs else None)
    stats = {inp: raw[node] for inp, node in first_reader.items()}
    result = balance_and_clip(graph, balance_groups(graph), linears, stats, cfg, show_progress=True, runs=runs)
    graph.gm.recompile()
    return PassResult(graph, True, result)


def balance_and_clip(graph: QuantGraph, groups: list, linears: list, stats: dict, cfg, *,
                     show_progress: bool = False, runs: SegmentRuns | None = None) -> dict:
    """AWQ on `groups` / `linears` given `stats` (linear input node -> InputStats): search each
    group's scales, fold them (the stats are rescaled to match), then search every linear's clip
    and clamp its weight. Used by this pass over the whole graph and by layerwise per block."""
    def steps(items, desc, unit, note):
        return track(items, desc, unit=unit, note=note) if show_progress else items
    rtn_loss = awq_loss = 0.0
    duo_chosen = module_groups = segment_run_groups = 0
    for group in steps(groups, "awq: scale search", "group", lambda g: g.describe(graph)):
        st = stats[group.input_node]
        spec = graph.annotation(group.consumers[0]).weight_spec
        module = output_module(graph, group) if runs is not None else None
        run = runs.output_error(graph, group, cfg.awq_sink_weight) if runs is not None and module is None else None
        found = awq_search_scales(st.rows, [graph.attr(c.args[1]) for c in group.consumers], spec,
                                  grid=cfg.awq_grid, x_mean_abs=st.channel_mean_abs,
                                  duo=cfg.awq_duo_scaling, module=module, output_error=run, **_sink(st, cfg))
        duo_chosen += found.duo
        module_groups += module is not None
        segment_run_groups += run is not None
        fold_group_scales(graph, group, found.scales)
        stats[group.input_node] = st.scaled(found.scales)
        rtn_loss += found.rtn_loss
        awq_loss += found.loss
    clipped, clip_rtn, clip_loss = 0, 0.0, 0.0
    if cfg.awq_clip:
        for node in steps(linears, "awq: clip search", "layer", lambda n: graph.annotation(n).layer):
            target = node.args[1].target
            st = stats[node.args[0]]
            clip = awq_search_clip(st.rows, graph.attr(target), graph.annotation(node).weight_spec,
                                   grid=cfg.awq_grid, **_sink(st, cfg))
            graph.set_attr(target, clip.weight)
            clipped += 1
            clip_rtn += clip.rtn_loss
            clip_loss += clip.loss
    return {"groups": len(groups), "duo_scales_chosen": duo_chosen, "module_loss_groups": module_groups,
            "segment_run_loss_groups": segment_run_groups, "scale_loss_rtn": rtn_loss,
            "scale_loss_awq": awq_loss, "clipped_layers": clipped, "clip_loss_rtn": clip_rtn,
            "clip_loss_awq": clip_loss}


def _sink(st, cfg) -> dict:
    """The search functions' sink arguments: each sink row weighs awq_sink_weight positions, and
    each sampled row stands for positions / len(rows) of them."""
    if st.sink_rows is None:
        return {}
    return {"sink_rows": st.sink_rows, "sink_weight": cfg.awq_sink_weight * st.rows.shape[0] / st.positions}

