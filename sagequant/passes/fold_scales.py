"""Folding a balance group's per-channel scales into its weights (shared by the smoothquant and
awq passes): the producer's output channels are divided by s, every consumer's weight columns
multiplied by s, so the group's outputs are unchanged up to rounding. The tensor math is
calibration/smoothquant.py's; this module applies it to the graph's parameters."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..calibration.smoothquant import fold_into_linear_rows, fold_into_norm, scale_consumer_columns
from ..ir.graph import QuantGraph
from ..ir.patterns import LAYER_NORM, RMS_NORM, BalanceGroup


def _readers(graph: QuantGraph, target: str) -> int:
    return sum(len(n.users) for n in graph.graph.nodes if n.op == "get_attr" and n.target == target)


def _attr_target(node, what: str) -> str:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        raise ValueError(f"{what} is not a parameter of the graph; cannot fold a scale into it")
    return node.target


def fold_group_scales(graph: QuantGraph, group: BalanceGroup, scales: torch.Tensor) -> None:
    """Divide the producer's output channels by `scales` and multiply every consumer's columns by
    them: float-equivalent (up to rounding), so the group's outputs are unchanged."""
    where = group.describe(graph)
    p = group.producer
    if group.kind == RMS_NORM:
        w = _attr_target(p.args[1], f"norm weight of {where}")
        _check_private(graph, w, where)
        graph.set_attr(w, fold_into_norm(graph.attr(w), scales, float(p.args[3])))
    else:
        w_arg, b_arg = (p.args[2], p.args[3]) if group.kind == LAYER_NORM else (
            p.args[1], p.args[2] if len(p.args) > 2 else None)
        w = _attr_target(w_arg, f"producer weight of {where}")
        b = _attr_target(b_arg, f"producer bias of {where}") if b_arg is not None else None
        for t in (w, b):
            if t is not None:
                _check_private(graph, t, where)
        new_w, new_b = fold_into_linear_rows(graph.attr(w), graph.attr(b) if b else None, scales)
        graph.set_attr(w, new_w)
        if b is not None:
            graph.set_attr(b, new_b)
        _record_scale(graph, p, "output_scale", scales)
    for c in group.consumers:
        t = _attr_target(c.args[1], f"weight of {graph.annotation(c).layer}")
        _check_private(graph, t, where)
        graph.set_attr(t, scale_consumer_columns(graph.attr(t), scales))
        _record_scale(graph, c, "input_scale", scales)


def _record_scale(graph: QuantGraph, node: fx.Node, name: str, scales: torch.Tensor) -> None:
    """Compose a fold's per-channel scales into the annotation (see NodeAnnotation.input_scale)."""
    ann = graph.annotation(node)
    if ann is not None:
        previous = getattr(ann, name)
        graph.update_annotation(node, **{name: scales.detach().clone() if previous is None
                                         else previous * scales})


def _check_private(graph: QuantGraph, target: str, where: str) -> None:
    if _readers(graph, target) != 1:
        raise ValueError(f"cannot fold scales of {where}: tensor {target} is read by "
                         f"{_readers(graph, target)} ops (shared or tied weight)")
