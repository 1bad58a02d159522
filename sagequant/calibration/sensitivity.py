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
from ..progress import track


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
                      options: dict) -> tuple[float, list[dict]]:
    """(float loss, rows). `options` maps a linear node to {label: QuantSpec}; each row is
    {"layer", "params", "options": {label: {"delta_loss", "bytes"}}} in the order given.
    The weights are restored afterwards, also when a forward pass fails."""
    base = next_token_loss(graph.gm, batches)
    rows = []
    for node, specs in track(list(options.items()), "sensitivity", unit="layer",
                             note=lambda item: graph.annotation(item[0]).layer):
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
    return base, rows


def fisher_sensitivity(model: torch.nn.Module, graph: QuantGraph, batches: list[torch.Tensor],
                       options: dict) -> tuple[float, list[dict]]:
    """The same table estimated from one backward pass per sequence through the float `model`
    (the module `graph` was traced from; layers found by name), to second order:
        delta_loss ~= g . d + 1/2 sum_i F_ii d_i^2,   d = dequant(quant(W)) - W,
    g the gradient of the mean loss and F the diagonal empirical Fisher. A sequence's gradient
    g_n averages the gradients of its T_n tokens, which shrinks their square by 1/T_n, so each
    sequence contributes T_n * g_n^2 as its per-token Fisher estimate."""
    names = [graph.annotation(n).layer for n in options]
    weights = [_module_weight(model, name) for name in names]
    grad = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    fisher = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    saved = {p: p.requires_grad for p in model.parameters()}
    nll, targets = 0.0, 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            for ids in track(batches, "sensitivity (fisher)", unit="sequence"):
                logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
                loss = -logp.gather(-1, ids[:, 1:, None]).mean()
                tokens = ids[:, 1:].numel()
                for acc_g, acc_f, g in zip(grad, fisher, torch.autograd.grad(loss, weights)):
                    acc_g += tokens * g.double()
                    acc_f += tokens * tokens * g.double().pow(2)
                nll += float(loss.detach()) * tokens
                targets += tokens
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
    rows = []
    for node, specs, w, g, f in zip(options, options.values(), weights, grad, fisher):
        ann = graph.annotation(node)
        original = graph.attr(node.args[1]).detach()
        g = _as_graph_layout(g / targets, original, w, ann.layer)
        f = _as_graph_layout(f / targets, original, w, ann.layer)
        row = {"layer": ann.layer, "params": original.numel(), "options": {}}
        for label, spec in specs.items():
            qt = quantize(original, spec, clip_ratio=ann.clip_ratio, what=f"weight of {ann.layer}")
            d = dequantize(qt, torch.float64) - original.double()
            row["options"][label] = {"delta_loss": float((g * d).sum() + 0.5 * (f * d * d).sum()),
                                     "bytes": qt.nbytes()}
        rows.append(row)
    return nll / targets, rows


def _module_weight(model: torch.nn.Module, name: str) -> torch.nn.Parameter:
    try:
        return model.get_submodule(name).weight
    except AttributeError:
        raise ValueError(f"float model has no module {name!r} with a weight: is it the model the "
                         "graph was traced from?") from None


def _as_graph_layout(t: torch.Tensor, graph_weight: torch.Tensor, module_weight: torch.Tensor,
                     layer: str) -> torch.Tensor:
    """A per-weight tensor of the module laid out like the graph's weight (canonicalize stores
    Conv1D-style [in, out] weights transposed); decided by comparing the values, not the type."""
    if module_weight.shape == graph_weight.shape and torch.equal(module_weight.detach(), graph_weight):
        return t
    if module_weight.t().shape == graph_weight.shape and torch.equal(module_weight.detach().t(), graph_weight):
        return t.t()
    raise ValueError(f"{layer}: the float model's weight differs from the graph's; the Fisher "
                     "estimate needs the graph before any pass changed its weights")


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

