"""Why a float-exact rotation makes int4 round-to-nearest worse on SmolLM2-135M (issue 19, §2e).

Each variant applies (part of) the rotate pass to the canonical graph, rounds every quantized
linear's weights to nearest (int4 g128 symmetric minmax, fp32 scales: the w4a16-rtn formula),
and measures on the first --max-tokens news tokens ppl Δ / KL / flips against the float model,
and on --calib-windows Wikipedia windows each linear's output error ‖x ΔWᵀ‖² relative to its
float output ‖x Wᵀ‖², the sink row (each window's first position) and the other rows apart.
Output norms are basis-free (every rotation is orthogonal), so the per-linear errors compare
across variants directly.

Variants (--variants; default all):
  none            no pass
  fold            the norms' γ folded into their readers, no rotation (R1 = I, no online, no heads)
  residual        fold + R1 only (no online down_proj rotation, no per-head v/o)
  online          fold + the online down_proj rotation only (R1 = I)
  heads           fold + the per-head v/o rotation only (R1 = I)
  hadamard        the full pass (R1 randomised Hadamard, online, heads); hadamard-seed1: other signs
  random          the full pass with a random orthogonal R1
  sink-excluded   the full pass with R1 leaving the residual channels that carry the sink token's
                  massive activation unrotated (a random orthogonal rotation of the others)
  inputs          no fold, no residual rotation: an online Hadamard in front of every quantized
                  linear (x -> x R, W -> W R), so the norms keep their γ

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/rotation_study.py --max-tokens 2048 \
        --variants none fold hadamard [--kinds v_proj ...] --out rotation_study.json

Rows are keyed variant:kinds and merged into --out (written after each row).
"""
import argparse
import copy
import json
import os
from contextlib import contextmanager

import torch
import torch.fx as fx

import sagequant as sq
import sagequant.passes.rotate as rotate_pass
from sagequant.calibration.datasets import tokenize_calibration
from sagequant.calibration.real_data import evaluation_text, load_smollm2, wikipedia_prose
from sagequant.calibration.rotation import online_block, random_orthogonal, residual_rotation
from sagequant.evaluation.perplexity import compare_to_float, tokenize_eval_text
from sagequant.ir.ops import apply_online
from sagequant.ir.quant_spec import dequantize, quantize, weight_qparams
from sagequant.ir.trace import trace_model
from sagequant.passes import PASSES, PassContext

# variant -> (residual rotation: None = identity, or (kind, seed) / "sink-excluded"), online, heads
VARIANTS = {
    "none": None,
    "fold": ("identity", False, False),
    "residual": (("hadamard", 0), False, False),
    "online": ("identity", True, False),
    "heads": ("identity", False, True),
    "hadamard": (("hadamard", 0), True, True),
    "hadamard-seed1": (("hadamard", 1), True, True),
    "random": (("random", 0), True, True),
    "sink-excluded": ("sink-excluded", True, True),
    "inputs": "inputs",
}


@contextmanager
def _residual(kind, sink_channels):
    """Swap the pass's residual rotation for the study's (identity / sink channels kept)."""
    original = rotate_pass.residual_rotation

    def study_rotation(n, _kind, _seed):
        if kind == "identity":
            return torch.eye(n, dtype=torch.float64)
        if kind == "sink-excluded":
            rest = [c for c in range(n) if c not in sink_channels]
            r = torch.eye(n, dtype=torch.float64)
            r[torch.tensor(rest)[:, None], torch.tensor(rest)[None, :]] = random_orthogonal(len(rest), 0)
            return r
        return residual_rotation(n, *kind)

    rotate_pass.residual_rotation = study_rotation
    try:
        yield
    finally:
        rotate_pass.residual_rotation = original


def sink_channels(model, ids: torch.Tensor, top: int) -> list[int]:
    """The residual channels with the largest |h| at the sink position (max over layers)."""
    with torch.inference_mode():
        hidden = model(input_ids=ids[:1], output_hidden_states=True, use_cache=False).hidden_states
    peak = torch.stack([h[0, 0].abs() for h in hidden[1:]]).amax(0)
    return peak.topk(top).indices.tolist()


def rotate_inputs(graph) -> None:
    """An online rotation in front of every quantized linear, its weight rotated alike."""
    blocks = {}
    for node in list(graph.annotated()):
        if not graph.annotation(node).quantized:
            continue
        width = graph.attr(node.args[1]).shape[1]
        if width not in blocks:
            name = rotate_pass.BLOCK_PREFIX + str(width)
            graph.set_attr(name, online_block(width).float())
            blocks[width] = (name, apply_online(torch.eye(width, dtype=torch.float64), online_block(width)))
        name, dense = blocks[width]
        rotate_pass._insert_online(graph, node, name)
        rotate_pass._rotate_linear(graph, node, right=dense)
    graph.recompile()


def round_weights(graph, kinds=None) -> dict:
    """RTN every quantized linear (of `kinds`, e.g. v_proj, when given) in place; returns
    {node name: (layer, ΔW, W) (float64)}."""
    deltas = {}
    for node in graph.annotated():
        ann = graph.annotation(node)
        if not ann.quantized or (kinds and ann.layer.rsplit(".", 1)[-1] not in kinds):
            continue
        w = graph.attr(node.args[1]).detach()
        scale, zp = weight_qparams(w, ann.weight_spec, ann.clip_ratio)
        q = dequantize(quantize(w, ann.weight_spec, scale, zp)).to(w.dtype)
        deltas[node.name] = (ann.layer, (q - w).double(), w.double())
        graph.set_attr(node.args[1].target, q)
    return deltas


class _Errors(fx.Interpreter):
    """Runs the float graph; per linear, Σ‖x ΔWᵀ‖² and Σ‖x Wᵀ‖² on sink rows and other rows."""

    def __init__(self, graph, deltas, sums):
        super().__init__(graph.gm)
        self.deltas, self.sums = deltas, sums

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.deltas:
            layer, dw, w = self.deltas[n.name]
            x = self.env[n.args[0]].detach().double()
            x = x.reshape(-1, x.shape[-2], x.shape[-1])
            for part, rows in (("sink", x[:, :1]), ("other", x[:, 1:])):
                err, sig = (rows @ dw.t()).pow(2).sum().item(), (rows @ w.t()).pow(2).sum().item()
                s = self.sums.setdefault(layer, {}).setdefault(part, [0.0, 0.0])
                s[0] += err
                s[1] += sig
        return out


def _by_kind(sums: dict) -> dict:
    kinds: dict = {}
    for layer, parts in sums.items():
        k = kinds.setdefault(layer.rsplit(".", 1)[-1], {"sink": [0.0, 0.0], "other": [0.0, 0.0]})
        for part, (e, s) in parts.items():
            k[part][0] += e
            k[part][1] += s
    return {k: {p: v[p][0] / v[p][1] for p in v} for k, v in sorted(kinds.items())}


def _config(**rotation) -> sq.QuantConfig:
    return sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=128, symmetric=True,
                          scale_precision="fp32", rotate="hadamard", **rotation)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--calib-windows", type=int, default=2)
    p.add_argument("--sink-channels", type=int, default=4)
    p.add_argument("--kinds", nargs="+", help="round only these linears (e.g. v_proj o_proj); default all")
    p.add_argument("--out")
    args = p.parse_args()
    model, tok = load_smollm2()
    calib = tokenize_calibration(wikipedia_prose(), tok, args.calib_windows, 512)
    ids = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)
    sinks = sink_channels(model, calib, args.sink_channels)
    base = trace_model(model)
    ctx = PassContext(_config())
    for name in ("canonicalize", "annotate"):
        PASSES[name](base, ctx)
        ctx.ran.append(name)

    def float_fn(x):
        return model(input_ids=x, use_cache=False).logits

    results = {"sink_channels": sinks, "max_tokens": args.max_tokens, "calib_windows": args.calib_windows,
               "rows": {}}
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            results["rows"] = json.load(f)["rows"]
    rounded = "+".join(args.kinds) if args.kinds else "all"
    for variant in args.variants:
        graph = copy.deepcopy(base)
        spec = VARIANTS[variant]
        if spec == "inputs":
            rotate_inputs(graph)
        elif spec is not None:
            residual, online, heads = spec
            vctx = PassContext(_config(rotate_online=online, rotate_heads=heads))
            vctx.ran.extend(ctx.ran)
            with _residual(residual, sinks):
                PASSES["rotate"](graph, vctx)
        float_graph = copy.deepcopy(graph)
        deltas = round_weights(graph, args.kinds)
        sums: dict = {}
        with torch.inference_mode():
            for w in calib:
                _Errors(float_graph, deltas, sums).run(w[None])
        metrics = compare_to_float(float_fn, lambda x: graph.gm(x), ids)
        rel_w = (sum(d.pow(2).sum().item() for _, d, _ in deltas.values())
                 / sum(w.pow(2).sum().item() for _, _, w in deltas.values()))
        row = {k: metrics[k] for k in ("ppl_quant", "ppl_delta_pct", "ppl_delta_pct_se", "kl", "kl_se",
                                       "flip_rate", "flip_rate_se")}
        row.update({"weight_rel_error": rel_w, "output_rel_error_by_kind": _by_kind(sums),
                    "output_rel_error_by_layer": {l: {pt: e / s for pt, (e, s) in v.items()}
                                                  for l, v in sums.items()}})
        key = f"{variant}:{rounded}"
        results["rows"][key] = row
        print(json.dumps({key: {k: v for k, v in row.items() if k != "output_rel_error_by_layer"}}), flush=True)
        if args.out:  # after every row, so a cut run keeps what it measured
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
