"""SmoothQuant and AWQ on an ONNX graph: per input channel scales s, folded exactly into the norm
scale gamma (divided by s) and the consumer linears' weights (input rows multiplied by s), for
every norm -> linears group (graph.norm_groups). The scale math is the torch side's
(calibration/smoothquant.py, calibration/awq.py); only the folding is ONNX-specific.
Groups whose producer is not a norm scale (v -> o, up -> down) are not balanced here; the AWQ
clip search (QuantConfig.awq_clip) runs on every quantized linear, as on the torch side.
"""
from __future__ import annotations

import numpy as np
import torch

from ...calibration.awq import awq_search_clip, awq_search_scales
from ...calibration.smoothquant import fold_into_norm, scale_consumer_columns, smoothing_scales
from .graph import NormGroup

AWQ_ROWS = 512  # activation rows the AWQ search evaluates per group


def _fold(group: NormGroup, scales: torch.Tensor) -> None:
    gamma = torch.from_numpy(np.asarray(group.gamma.values, dtype=np.float32).copy())
    group.gamma.values = fold_into_norm(gamma, scales).numpy().astype(np.asarray(group.gamma.values).dtype)
    for lin in group.linears:
        w = torch.from_numpy(lin.weight_out_in())
        lin.set_weight_out_in(scale_consumer_columns(w, scales).numpy())


def smoothquant(groups: list[NormGroup], stats, alpha: float) -> dict:
    """s = max|X|^alpha / max|W|^(1 - alpha) per group; returns per-group statistics."""
    out = {}
    for group in groups:
        st = stats[group.linears[0].x.name]
        weights = [torch.from_numpy(lin.weight_out_in()) for lin in group.linears]
        scales = smoothing_scales(torch.from_numpy(st.absmax), weights, alpha)
        _fold(group, scales)
        out[group.linears[0].name] = {"alpha": alpha, "max_scale": float(scales.max())}
    return out


def awq(groups: list[NormGroup], stats, grid: int) -> dict:
    """AWQ's scale search (s = mean|x|^r, r on a grid, least output error after quantization)."""
    out = {}
    for group in groups:
        st = stats[group.linears[0].x.name]
        weights = [torch.from_numpy(lin.weight_out_in()) for lin in group.linears]
        result = awq_search_scales(st.sample(AWQ_ROWS), weights, group.linears[0].weight_spec, grid,
                                   x_mean_abs=torch.from_numpy(st.mean_abs).float())
        _fold(group, result.scales)
        out[group.linears[0].name] = {"ratio": result.ratio, "loss": result.loss, "rtn_loss": result.rtn_loss}
    return out


def awq_clip(linears, stats, grid: int) -> dict:
    """AWQ's weight clip search per (row, group) on every quantized linear's (balanced) input."""
    losses = {"rtn": 0.0, "clipped": 0.0}
    for lin in linears:
        clip = awq_search_clip(stats[lin.x.name].sample(AWQ_ROWS), torch.from_numpy(lin.weight_out_in()),
                               lin.weight_spec, grid=grid)
        lin.set_weight_out_in(clip.weight.numpy())
        losses["rtn"] += clip.rtn_loss
        losses["clipped"] += clip.loss
    return {"clipped_layers": len(linears), "clip_loss_rtn": losses["rtn"], "clip_loss_awq": losses["clipped"]}
