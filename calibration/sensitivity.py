"""Per-layer sensitivity: how much the model's next-token loss rises when one layer alone is
quantized (round-to-nearest with a given spec) and every other layer stays float.

Measured, not estimated: one forward pass over the sequences per (layer, option), on a QuantGraph
whose weights are still float (before `convert`). Only the weights are quantized here; quantized
activations of W8A8 schemes are not simulated. Summing the per-layer numbers to predict the
whole model's loss assumes the layers' errors add, which holds to first order for small errors.
"""
from __future__ import annotations

import torch

from ..ir.graph import QuantGraph
from ..ir.quant_spec import dequantize, quantize


def next_token_loss(gm: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token NLL (nats) of `gm` over every target of `batches`, in float64."""
    nll, targets = 0.0, 0
    with torch.inference_mode():
        for ids in batches:
            logp = torch.log_softmax(gm(ids).double()[:, :-1], -1)
            nll -= float(logp.gather(-1, ids[:, 1:, None]).sum())
            targets += ids[:, 1:].numel()
    if targets == 0:
        raise ValueError("sensitivity needs sequences of at least 2 tokens (one next-token target)")
    return nll / targets


def layer_sensitivity(graph: QuantGraph, batches: list[torch.Tensor],
                      options: dict, progress=None) -> tuple[float, list[dict]]:
    """(float loss, rows). `options` maps a linear node to {label: QuantSpec}; each row is
    {"layer", "params", "options": {label: {"delta_loss", "bytes"}}} in the order given.
    The weights are restored afterwards, also when a forward pass fails."""
    base = next_token_loss(graph.gm, batches)
    rows = []
    for node, specs in options.items():
        ann = graph.annotation(node)
        weight = graph.attr(node.args[1])
        original = weight.data
        row = {"layer": ann.layer, "params": original.numel(), "options": {}}
        try:
            for label, spec in specs.items():
                qt = quantize(original, spec, clip_ratio=ann.clip_ratio, what=f"weight of {ann.layer}")
                weight.data = dequantize(qt, original.dtype)
                row["options"][label] = {"delta_loss": next_token_loss(graph.gm, batches) - base,
                                         "bytes": qt.nbytes()}
        finally:
            weight.data = original
        rows.append(row)
        if progress is not None:
            progress(row)
    return base, rows


def format_sensitivity(rows: list[dict], top: int | None = None) -> str:
    """Table of rows, most sensitive first (largest delta loss of the cheapest option)."""
    labels = list(dict.fromkeys(label for r in rows for label in r["options"]))
    first = labels[0] if labels else None
    ordered = sorted(rows, key=lambda r: -r["options"].get(first, {}).get("delta_loss", 0.0))
    head = f"{'layer':<40}{'params':>10}" + "".join(f"{'dloss ' + label:>18}" for label in labels)
    lines = [head]
    for r in ordered[:top]:
        cells = "".join(f"{r['options'][label]['delta_loss']:>18.3e}" if label in r["options"] else f"{'-':>18}"
                        for label in labels)
        lines.append(f"{r['layer']:<40}{r['params']:>10}{cells}")
    return "\n".join(lines)

