"""Per-layer error report: every quantized node's output vs the float model's same layer, on the
same input ids, worst first — how a user finds the layer that broke accuracy.

Two errors per layer, both SQNR in dB (10·log10 of signal over error energy):
  local        the float module of the same name applied to the SAME input the quantized layer
               saw, vs the quantized layer's output: this layer's own damage, what the table
               sorts by, so the layer that broke accuracy comes first;
  accumulated  vs the float model's output of that layer on the same ids: the damage of this and
               every earlier layer, as in deployment.
Quantized outputs and inputs come from running the compiled graph with an fx Interpreter; float
outputs from forward hooks on the reference model's modules of the same names.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..ir.annotations import META_KEY


class _Capture(fx.Interpreter):
    def __init__(self, gm, layers: set[str]):
        super().__init__(gm)
        self.layers = layers
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        ann = n.meta.get(META_KEY)
        if ann is not None and ann.layer in self.layers:
            self.outputs[ann.layer] = out.detach().double()
            self.inputs[ann.layer] = self.env[n.args[0]].detach()
        return out


def layer_errors(compiled, reference: torch.nn.Module, input_ids: torch.Tensor) -> list[dict]:
    anns = [compiled.graph.annotation(n) for n in compiled.graph.annotated()]
    layers = {a.layer: a for a in anns if a.quantized}
    float_out: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        try:
            module = reference.get_submodule(name)
        except AttributeError:
            raise ValueError(f"reference model has no module {name!r}: is it the model this artifact "
                             "was compiled from?") from None
        handles.append(module.register_forward_hook(
            lambda mod, args, out, name=name: float_out.__setitem__(name, out.detach().double())))
    try:
        with torch.inference_mode():
            reference(input_ids=input_ids, use_cache=False)
            cap = _Capture(compiled.graph.gm, set(layers))
            cap.run(input_ids)
    finally:
        for h in handles:
            h.remove()
    rows = []
    with torch.inference_mode():
        for name, ann in layers.items():
            got = cap.outputs[name]
            local_ref = reference.get_submodule(name)(cap.inputs[name]).double().reshape(got.shape)
            acc_ref = float_out[name].reshape(got.shape)
            local_db, rel_mse = _sqnr(local_ref, got)
            rows.append({"layer": name, "scheme": ann.scheme, "weight": ann.weight_spec.describe(),
                         "local_sqnr_db": local_db, "rel_mse": rel_mse,
                         "accumulated_sqnr_db": _sqnr(acc_ref, got)[0],
                         "max_abs_err": float((local_ref - got).abs().max())})
    rows.sort(key=lambda r: r["local_sqnr_db"])
    return rows


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(SQNR dB, relative MSE) of got against ref."""
    signal, noise = float(ref.pow(2).sum()), float((ref - got).pow(2).sum())
    if noise == 0:
        return math.inf, 0.0
    return (10 * math.log10(signal / noise) if signal > 0 else -math.inf), noise / max(signal, 1e-300)


def format_errors(rows: list[dict], top: int | None = None) -> str:
    lines = [f"{'layer':<40}{'scheme':<11}{'weight':<22}{'local SQNR dB':>14}{'rel MSE':>11}"
             f"{'accum. SQNR dB':>16}{'max |err|':>11}"]
    for r in rows[:top]:
        lines.append(f"{r['layer']:<40}{r['scheme']:<11}{r['weight']:<22}{r['local_sqnr_db']:>14.2f}"
                     f"{r['rel_mse']:>11.2e}{r['accumulated_sqnr_db']:>16.2f}{r['max_abs_err']:>11.3g}")
    return "\n".join(lines)
