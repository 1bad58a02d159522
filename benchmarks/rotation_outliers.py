"""What the rotate pass does to SmolLM2-135M's activations (issue 19): on Wikipedia windows, the
float logits before vs after the pass (it must not change the function), and per linear input the
outlier ratio max|x| / rms(x) — the range an 8-bit per-token activation quantizer must cover, in
units of the typical value — before vs after, by layer kind; and the relative weight error
sum ‖Q(W) − W‖² / sum ‖W‖² of int4 g128 / int8 / fp8 per-channel RTN over the quantized linears,
before vs after. Prints one JSON object.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/rotation_outliers.py --windows 2 --seq-len 256
"""
import argparse
import copy
import json

import torch
import torch.fx as fx

import sagequant as sq
from sagequant.calibration.datasets import tokenize_calibration
from sagequant.calibration.real_data import load_smollm2, wikipedia_prose
from sagequant.ir.quant_spec import QuantSpec, dequantize, quantize
from sagequant.ir.trace import trace_model
from sagequant.passes import PASSES, PassContext


class _Inputs(fx.Interpreter):
    """Runs the graph; per annotated linear, the max over windows of max|x| / rms(x) per token row."""

    def __init__(self, graph, ratios):
        super().__init__(graph.gm)
        self.qgraph, self.ratios = graph, ratios

    def run_node(self, n):
        out = super().run_node(n)
        ann = self.qgraph.annotation(n)
        if ann is not None and ann.quantized:
            x = self.env[n.args[0]].detach().double().reshape(-1, n.args[0].meta["val"].shape[-1])
            ratio = (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt().clamp_min(1e-30)).max().item()
            self.ratios[ann.layer] = max(self.ratios.get(ann.layer, 0.0), ratio)
        return out


def _by_kind(ratios: dict) -> dict:
    kinds: dict[str, list[float]] = {}
    for layer, r in ratios.items():
        kinds.setdefault(layer.rsplit(".", 1)[-1], []).append(r)
    return {k: {"max": max(v), "median": sorted(v)[len(v) // 2]} for k, v in sorted(kinds.items())}


def _weight_error(graph, spec: QuantSpec) -> float:
    num = den = 0.0
    for node in graph.annotated():
        if graph.annotation(node).quantized:
            w = graph.attr(node.args[1]).detach().float()
            num += float((dequantize(quantize(w, spec)) - w).double().pow(2).sum())
            den += float(w.double().pow(2).sum())
    return num / den


WEIGHT_SPECS = (QuantSpec("int4", "per_group", 128, True, "fp16"),
                QuantSpec("int8", "per_channel", None, True, "fp16"),
                QuantSpec("fp8_e4m3", "per_channel", None, True, "fp16"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rotate", default="hadamard")
    args = p.parse_args()
    model, tok = load_smollm2()
    batches = tokenize_calibration(wikipedia_prose(), tok, args.windows, args.seq_len)
    graph = trace_model(model)
    ctx = PassContext(sq.QuantConfig(rotate=args.rotate))
    for name in ("canonicalize", "annotate"):
        PASSES[name](graph, ctx)
        ctx.ran.append(name)
    rotated = copy.deepcopy(graph)
    stats = PASSES["rotate"](rotated, ctx).stats
    before, after, diff, scale = {}, {}, 0.0, 0.0
    with torch.inference_mode():
        for ids in batches:
            ids = ids[None]
            ref = model(input_ids=ids, use_cache=False).logits
            got = _Inputs(rotated, after).run(ids)
            _Inputs(graph, before).run(ids)
            diff = max(diff, (got - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    print(json.dumps({"windows": f"{args.windows}x{args.seq_len}", "rotate_stats": stats,
                      "float_logits_max_abs_diff": diff, "float_logits_max_abs": scale,
                      "outlier_ratio_before": _by_kind(before), "outlier_ratio_after": _by_kind(after),
                      "weight_rel_error": {s.describe(): {"before": _weight_error(graph, s),
                                                          "after": _weight_error(rotated, s)}
                                           for s in WEIGHT_SPECS}},
                     indent=1, default=str))


if __name__ == "__main__":
    main()
