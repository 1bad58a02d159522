"""Per-layer error report: every quantized node's output vs the float model's same layer, on the
same input ids, worst first — how a user finds the layer that broke accuracy.

Two errors per layer, both SQNR in dB (10·log10 of signal over error energy):
  local        the float module of the same name applied to the SAME input the quantized layer
               saw, vs the quantized layer's output: this layer's own damage, what the table
               sorts by, so the layer that broke accuracy comes first;
  accumulated  vs the float model's output of that layer on the same ids: the damage of this and
               every earlier layer, as in deployment.
Quantized outputs and inputs come from running the compiled graph with an fx Interpreter; float
outputs from forward hooks on the reference model's modules of the same names. Layers a
SmoothQuant / AWQ fold rescaled, or the rotate pass rotated, are compared in the graph's space
through the fold's scales and rotations, which the compile that folded them records (an artifact
loaded from disk does not carry them).
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..ir.annotations import META_KEY
from ..progress import track


class _Capture(fx.Interpreter):
    """Runs the quantized graph and, at each quantized layer, adds its error energies to `sums`:
    the float layer on the same input (local) and the float model's output (accumulated)."""

    def __init__(self, gm, reference: torch.nn.Module, float_out: dict, sums: dict):
        super().__init__(gm)
        self.reference, self.float_out, self.sums = reference, float_out, sums

    def run_node(self, n):
        out = super().run_node(n)
        ann = n.meta.get(META_KEY)
        if ann is not None and ann.layer in self.sums:
            got = out.detach().double()
            acc_ref = self.float_out.pop(ann.layer).double().reshape(got.shape)
            local_ref = float_layer_output(self.reference, ann, self.env[n.args[0]]).double().reshape(got.shape)
            self.float_out.pop(ann.layer)  # what the hook caught of the local call above
            if ann.output_rotation is not None:  # into the graph's (rotated) output space
                acc_ref = ann.output_rotation.apply(acc_ref)
            if ann.output_scale is not None:  # into the graph's (smoothed) output space
                acc_ref = acc_ref / ann.output_scale.double()
            s = self.sums[ann.layer]
            s["signal"] += float(local_ref.pow(2).sum())
            s["noise"] += float((local_ref - got).pow(2).sum())
            s["acc_signal"] += float(acc_ref.pow(2).sum())
            s["acc_noise"] += float((acc_ref - got).pow(2).sum())
            s["max_abs_err"] = max(s["max_abs_err"], float((local_ref - got).abs().max()))
        return out


def float_layer_output(reference: torch.nn.Module, ann, x: torch.Tensor) -> torch.Tensor:
    """The float model's layer `ann.layer` on the quantized graph's input `x` of that layer, in the
    graph's space: x is taken back through a SmoothQuant / AWQ fold's input scale and the rotate
    pass's input rotation, the output into the rotated, folded (output-scaled) space of the
    layer's consumers."""
    x = x.detach()
    if ann.input_scale is not None:
        x = x * ann.input_scale.to(x.dtype)
    if ann.input_rotation is not None:
        x = ann.input_rotation.apply(x)
    y = reference.get_submodule(ann.layer)(x)
    if ann.output_rotation is not None:
        y = ann.output_rotation.apply(y)
    return y / ann.output_scale.to(y.dtype) if ann.output_scale is not None else y


def layer_errors(graph, reference: torch.nn.Module, batches: list[torch.Tensor],
                 on_logits=None, desc: str = "per-layer error") -> list[dict]:
    """Error rows of every quantized layer of `graph` (a QuantGraph) over `batches` of ids, worst
    first. Energies are summed over the batches, so one layer's outputs are held at a time (a
    real model's 210 layer outputs at 512 tokens would not fit in double). `on_logits(ids,
    float_logits, quantized_logits)` is called per batch for callers that also compare logits."""
    layers = {a.layer: a for a in (graph.annotation(n) for n in graph.annotated()) if a.quantized}
    for name in layers:
        try:
            reference.get_submodule(name)
        except AttributeError:
            raise ValueError(f"reference model has no module {name!r}: is it the model this artifact "
                             "was compiled from?") from None
    sums = {name: dict.fromkeys(("signal", "noise", "acc_signal", "acc_noise", "max_abs_err"), 0.0)
            for name in layers}
    float_out: dict[str, torch.Tensor] = {}
    gm = _unfused(graph)
    handles = [reference.get_submodule(name).register_forward_hook(
        lambda mod, args, out, name=name: float_out.__setitem__(name, out.detach()))
        for name in layers]
    try:
        with torch.inference_mode():
            for ids in track(batches, desc, unit="sequence"):
                float_logits = reference(input_ids=ids, use_cache=False).logits
                quant_logits = _Capture(gm, reference, float_out, sums).run(ids)
                if on_logits is not None:
                    on_logits(ids, float_logits, quant_logits)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, ann in layers.items():
        s = sums[name]
        rows.append({"layer": name, "scheme": ann.scheme, "weight": ann.weight_spec.describe(),
                     "local_sqnr_db": _db(s["signal"], s["noise"]),
                     "rel_mse": s["noise"] / max(s["signal"], 1e-300),
                     "accumulated_sqnr_db": _db(s["acc_signal"], s["acc_noise"]),
                     "max_abs_err": s["max_abs_err"]})
    rows.sort(key=lambda r: r["local_sqnr_db"])
    return rows


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def format_errors(rows: list[dict], top: int | None = None) -> str:
    lines = [f"{'layer':<40}{'scheme':<11}{'weight':<22}{'local SQNR dB':>14}{'rel MSE':>11}"
             f"{'accum. SQNR dB':>16}{'max |err|':>11}"]
    for r in rows[:top]:
        lines.append(f"{r['layer']:<40}{r['scheme']:<11}{r['weight']:<22}{r['local_sqnr_db']:>14.2f}"
                     f"{r['rel_mse']:>11.2e}{r['accumulated_sqnr_db']:>16.2f}{r['max_abs_err']:>11.3g}")
    return "\n".join(lines)


def _unfused(graph) -> fx.GraphModule:
    """The graph with fuse_norm_qdq undone (weights shared): each quantized layer's first argument
    is then its float input, which the local error feeds to the float layer. Exact: the fusion
    changes no value."""
    from ..lowering.unfuse import unfuse_norm_qdq
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph.graph, {}))
    if not unfuse_norm_qdq(copy):
        return graph.gm
    return fx.GraphModule(graph.gm, copy)
