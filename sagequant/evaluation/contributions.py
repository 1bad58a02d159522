"""Per-layer contribution table: how much of a compiled model's accuracy loss each block (or each
linear) causes on its own. For every unit, the compiled graph runs with only that unit's
quantized layers quantized — every other quantized layer computes the float model's layer on the
same input instead — and its next-token distributions are compared with the float model's:

  kl          mean KL(float ‖ only-this-unit-quantized) per position, nats
  delta_nll   mean next-token NLL change on the observed targets, nats (exp(delta_nll) - 1 is the
              unit's own perplexity change)
  share       the unit's kl over the sum of every unit's kl (what to fix first)
  worst_local_sqnr_db  the error report's lowest local SQNR among the unit's layers

Whatever the compile did to the quantized layers (SmoothQuant / AWQ folds, GPTQ weights, W8A8
activation quantizers) is kept: the float stand-ins are the reference model's modules of the same
names, taken through each fold's recorded input / output scales (error_report.float_layer_output).
Cost: one forward of the batches per unit plus one for the float model and one for the whole
quantized model (whose KL is reported next to the sum, to show how far the units' losses add).
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from ..ir.annotations import META_KEY
from ..progress import track
from .error_report import _unfused, float_layer_output, layer_errors
from .metrics import PairedAccumulator

UNITS = ("block", "linear")
_BLOCK = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj" -> "model.layers.3"


def unit_of(layer: str, unit: str) -> str:
    """The block a layer belongs to (its name up to the first numeric index) or the layer itself;
    a layer outside any indexed block (e.g. a quantized lm_head) is its own unit."""
    if unit == "linear":
        return layer
    m = _BLOCK.match(layer)
    return m.group(1) if m else layer


class _OnlySome(fx.Interpreter):
    """Runs the quantized graph with the quantized layers outside `keep` replaced by the float
    model's layer of the same name on the same input."""

    def __init__(self, gm, reference: torch.nn.Module, keep: set[str]):
        super().__init__(gm)
        self.reference, self.keep = reference, keep

    def run_node(self, n):
        ann = n.meta.get(META_KEY) if n.op == "call_function" else None
        if ann is not None and ann.quantized and ann.layer not in self.keep:
            x = self.env[n.args[0]]
            return float_layer_output(self.reference, ann, x).to(x.dtype)
        return super().run_node(n)


def layer_contributions(graph, reference: torch.nn.Module, batches: list[torch.Tensor],
                        unit: str = "block") -> dict:
    """{"unit", "rows" (most harmful first), "whole" (every layer quantized), "sum_kl"} over
    `batches` of ids ([1, L] or [b, L]); see the module docstring for the row fields."""
    if unit not in UNITS:
        raise ValueError(f"contribution unit {unit!r}; valid: {', '.join(UNITS)}")
    layers = [a.layer for a in (graph.annotation(n) for n in graph.annotated()) if a.quantized]
    if not layers:
        raise ValueError("the compiled model has no quantized layer to attribute loss to")
    units: dict[str, set[str]] = {}
    for layer in layers:
        units.setdefault(unit_of(layer, unit), set()).add(layer)
    gm = _unfused(graph)
    with torch.inference_mode():
        float_logits = [reference(input_ids=ids, use_cache=False).logits for ids in batches]

    def compare(keep: set[str]) -> dict:
        acc = PairedAccumulator()
        with torch.inference_mode():
            for ids, ref in zip(batches, float_logits):
                got = _OnlySome(gm, reference, keep).run(ids)
                acc.add(ref[:, :-1], got[:, :-1], ids[:, 1:])
        s = acc.summary()
        per = acc.per_position()
        return {"kl": s["kl"], "kl_se": s["kl_se"], "flip_rate": s["flip_rate"],
                "delta_nll": float((per["nll_quant"] - per["nll_float"]).double().mean())}

    whole = compare(set(layers))
    worst = {}
    for r in layer_errors(graph, reference, batches, desc="per-layer error"):
        key = unit_of(r["layer"], unit)
        worst[key] = min(worst.get(key, float("inf")), r["local_sqnr_db"])
    rows = []
    for name, members in track(list(units.items()), "contributions", unit=unit):
        rows.append({"unit": name, "layers": len(members), **compare(members),
                     "worst_local_sqnr_db": worst[name]})
    total = sum(r["kl"] for r in rows)
    for r in rows:
        r["share"] = r["kl"] / total if total > 0 else 0.0
    rows.sort(key=lambda r: -r["kl"])
    return {"unit": unit, "rows": rows, "whole": whole, "sum_kl": total}


def format_contributions(result: dict, top: int | None = None) -> str:
    w = result["whole"]
    lines = [f"per-{result['unit']} contribution (only that {result['unit']} quantized; "
             f"whole model KL {w['kl']:.5f}, sum of units {result['sum_kl']:.5f})",
             f"{'unit':<34}{'layers':>7}{'KL nats':>11}{'± se':>9}{'share':>8}{'Δ NLL':>10}"
             f"{'flips %':>9}{'worst SQNR dB':>15}"]
    for r in result["rows"][:top]:
        lines.append(f"{r['unit']:<34}{r['layers']:>7}{r['kl']:>11.5f}{r['kl_se']:>9.5f}"
                     f"{100 * r['share']:>7.1f}%{r['delta_nll']:>+10.4f}{100 * r['flip_rate']:>9.2f}"
                     f"{r['worst_local_sqnr_db']:>15.2f}")
    return "\n".join(lines)
