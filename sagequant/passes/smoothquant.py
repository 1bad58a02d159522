"""smoothquant: migrate activation outliers into the weights before activation quantization.

For every balance group (ir/patterns.py: norm -> linears, up_proj -> down_proj) it measures the
per-channel |x| maxima of the group's input over the calibration data (one sequential run), picks
s = max|X|^α / max|W|^(1-α) (calibration/smoothquant.py; α from QuantConfig.smoothquant_alpha, or
searched per group when it is "auto"), and folds 1/s into the producer and s into the consumers'
columns. The graph computes the same function in float; only the ranges the quantizers see change.
It runs before the observers, so calibrated activation scales see the smoothed tensors.
"""
from __future__ import annotations

from ..calibration.datasets import CalibrationDataError
from ..calibration.smoothquant import search_alpha, smoothing_scales
from ..calibration.stats import collect_input_stats
from ..config import ConfigError
from ..ir.graph import QuantGraph
from ..ir.patterns import balance_groups
from .fold_scales import fold_group_scales
from ..ir.quant_spec import QuantSpec
from ..progress import track
from .manager import PassContext, PassResult, define_pass

SEARCH_ROWS = 512
# Weight-only schemes smoothed before AWQ search alpha against int8 per-token activations.
SEARCH_ACT_SPEC = QuantSpec("int8", "per_token", None, True, "fp32", dynamic=True)


@define_pass("smoothquant", "fold per-channel smoothing scales into norm / linear producers",
               requires=("annotate",))
def smoothquant(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    if cfg.calibration in ("smoothquant", "smoothquant+gptq") and cfg.activation_format is None:
        raise ConfigError(f"QuantConfig.calibration={cfg.calibration!r} smooths activations for activation "
                          f"quantization, but scheme {cfg.scheme} keeps 16-bit activations; use it "
                          "with W8A8-INT8 / W8A8-FP8, or calibration='awq' / 'smoothquant+awq' / 'gptq'")
    if not ctx.calibration_batches:
        raise CalibrationDataError("SmoothQuant needs calibration data for its activation maxima; "
                                   "pass calibration_data=")
    groups = balance_groups(graph)
    if not groups:
        raise ValueError("SmoothQuant found no norm -> linear or linear -> linear group to smooth in "
                         "this graph; nothing would change")
    auto = cfg.smoothquant_alpha == "auto"
    stats = collect_input_stats(graph, ctx.calibration_batches, [g.consumers[0] for g in groups],
                                keep_rows=SEARCH_ROWS if auto else 0, desc="smoothquant: statistics")
    alphas = {}
    for group in track(groups, "smoothquant: alpha search" if auto else "smoothquant: scales",
                       unit="group", note=lambda g: g.describe(graph)):
        st = stats[group.consumers[0]]
        weights = [graph.attr(c.args[1]) for c in group.consumers]
        alpha = cfg.smoothquant_alpha
        if auto:
            ann = graph.annotation(group.consumers[0])
            act_spec = ann.input_spec or SEARCH_ACT_SPEC
            alpha, _ = search_alpha(st.rows, weights, act_spec, ann.weight_spec, act_absmax=st.channel_absmax)
        fold_group_scales(graph, group, smoothing_scales(st.channel_absmax, weights, alpha))
        alphas[group.describe(graph)] = alpha
    graph.gm.recompile()
    return PassResult(graph, True, {"groups": len(groups), "alpha": alphas if auto else cfg.smoothquant_alpha})

