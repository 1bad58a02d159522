"""Weight bytes vs perplexity on the real SmolLM2-135M (issue 10): uniform W4A16 (g128, and the
finer groups g64 / g32 that spend the same extra bytes uniformly), uniform W8A16, and
mixed precision (W4A16 g128 base, W8A16 or float for the most sensitive layers) at bits-per-weight
budgets, all round-to-nearest, on the news text; calibration, the guard's held-back sequences and
the sensitivity measurement use the disjoint Wikipedia prose.

    .venv/bin/python benchmarks/mixed_precision_pareto.py --max-tokens 10000 --out pareto.json

Results accumulate in --out (one entry per row), so rows can be run in separate calls. Prints a
Markdown table at the end. Bits per weight count every quantized-or-chosen linear (all but
lm_head) with its scales; layers kept float count at fp16.

--eval dequantized (the default, for a shared CPU) scores the float model with each quantized
layer's weight replaced by the compiled model's dequantized codes and scales: for weight-only
schemes that is the CPU reference kernel's own math (F.linear(x, dequantize(W))) without
re-dequantizing every call; the largest logit difference to the compiled model on one window is
recorded with each row. --eval compiled runs the compiled model itself.
"""
import argparse
import contextlib
import json
import platform
import time
from datetime import date
from pathlib import Path

import torch

import sagequant as sq
from sagequant.calibration.datasets import tokenize_calibration
from sagequant.calibration.precision_budget import choose_precisions
from sagequant.ir.quant_spec import QuantizedTensor, QuantSpec, dequantize
from sagequant.calibration.real_data import evaluation_text, load_smollm2, wikipedia_prose
from sagequant.evaluation.perplexity import perplexity, tokenize_eval_text

W4 = dict(weight_dtype="int4", activation_dtype="a16", symmetric=True)
ROWS = {
    "w4a16-g128": dict(**W4, group_size=128),
    "w4a16-g64": dict(**W4, group_size=64),
    "w4a16-g32": dict(**W4, group_size=32),
    "w8a16-g128": dict(weight_dtype="int8", activation_dtype="a16", group_size=128),
    "mixed-4.25": dict(**W4, group_size=128, target_bits_per_weight=4.25),
    "mixed-4.5": dict(**W4, group_size=128, target_bits_per_weight=4.5),
    "mixed-5.0": dict(**W4, group_size=128, target_bits_per_weight=5.0),
    "mixed-6.0": dict(**W4, group_size=128, target_bits_per_weight=6.0),
    "mixed-dloss-0.1": dict(**W4, group_size=128, target_max_delta_loss=0.1),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["float", *ROWS], choices=["float", *ROWS])
    p.add_argument("--max-tokens", type=int, default=10000)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--sensitivity-samples", type=int, default=2)
    p.add_argument("--sensitivity-method", default="fisher", choices=["fisher", "measured"],
                   help="measured costs one forward per layer and option (420 on SmolLM2)")
    p.add_argument("--out", default="mixed_precision_pareto.json")
    p.add_argument("--eval", default="dequantized", choices=["dequantized", "compiled"])
    p.add_argument("--check-fisher", type=int, default=0, metavar="N",
                   help="also measure N layers' W4A16 sensitivity exactly (the N/2 most sensitive by "
                        "the Fisher estimate and N/2 spread over the rest) and record both")
    p.add_argument("--guard-samples", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (1 is faster on a CPU shared by many jobs)")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    eval_ids = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)
    guard_samples = args.guard_samples
    calib = tokenize_calibration(wikipedia_prose(), tok, args.calib_samples + guard_samples, args.seq_len)
    meta = {"eval_tokens": int(eval_ids.numel()), "calibration": f"{args.calib_samples}x{args.seq_len}",
            "held_back": f"{guard_samples}x{args.seq_len}",
            "sensitivity_data": f"{args.sensitivity_method}, {args.sensitivity_samples}x{args.seq_len}", "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    for name in args.rows:
        t = time.perf_counter()
        if name == "float":
            with torch.inference_mode():
                res = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, eval_ids)
            entry = {"ppl": res.ppl, "bits_per_weight": 16.0}
        else:
            # guard='report': the table must show every row's number, not stop at a bad one.
            cfg = sq.QuantConfig(**ROWS[name], calibration_samples=args.calib_samples,
                                 calibration_seq_len=args.seq_len, guard="report", guard_samples=guard_samples,
                                 sensitivity_samples=args.sensitivity_samples,
                                 sensitivity_method=args.sensitivity_method)
            measured = next((e for e in results.values() if (e.get("mixed_precision") or {}).get("ladder")), None)
            if "target_bits_per_weight" in ROWS[name] and measured is not None:
                # The sensitivity table is the expensive part (one forward per layer and option):
                # later budgets reuse the first mixed row's table and give its choice as overrides.
                cfg = cfg.replace(target_bits_per_weight=None,
                                  overrides=overrides_for(measured, ROWS[name]["target_bits_per_weight"]))
            cm = sq.compile(model, cfg, calibration_data=calib)
            compile_s = time.perf_counter() - t
            if args.eval == "compiled":
                res, parity = perplexity(cm, eval_ids), None
            else:
                with dequantized_weights(model, cm):
                    res = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, eval_ids)
                    parity = logit_parity(model, cm, eval_ids[:256])
            rep = cm.report()
            wb = rep["weight_bytes"]
            lm_head = next(n for n in cm.graph.annotated() if cm.graph.annotation(n).layer.endswith("lm_head"))
            lm_head_params = cm.graph.attr(lm_head.args[1]).numel()
            bytes_ = wb["all_linear_bytes"] - 2 * lm_head_params  # lm_head is kept at fp16 in every row
            params = wb["all_linear_fp16_bytes"] // 2 - lm_head_params
            mixed = rep.get("mixed_precision") or {}
            schemes = [b["scheme"] for b in cm.kernel_bindings.values()]
            layers = {"W4A16": schemes.count("W4A16"), "W8A16": schemes.count("W8A16"),
                      "float": len(rep["kept_in_high_precision"]) - 1}  # all kept but lm_head
            entry = {"ppl": res.ppl, "compile_s": compile_s, "config": cfg.to_dict(), "bytes": bytes_,
                     "eval": args.eval, "max_abs_logit_diff_vs_compiled": parity,
                     "layers": layers,
                     "bits_per_weight": 8 * bytes_ / params,
                     "accuracy_guard": {k: v for k, v in rep["accuracy_guard"].items() if k != "worst_layers"},
                     "mixed_precision": {k: v for k, v in mixed.items() if k != "sensitivity"},
                     "sensitivity": mixed.get("sensitivity"),
                     "passes": {h["pass"]: h.get("seconds") for h in cm.pass_history}}
        entry.update(meta, eval_s=res.seconds)
        results[name] = entry
        print(f"{name:<14} ppl {entry['ppl']:8.3f}  bits/weight {entry['bits_per_weight']:.3f}  "
              f"{time.perf_counter() - t:6.1f}s", flush=True)
        out.write_text(json.dumps(results, indent=1))
    if args.check_fisher:
        results["fisher_check"] = check_fisher(model, results, calib[:args.sensitivity_samples], args.check_fisher)
        out.write_text(json.dumps(results, indent=1))
    print(table({k: v for k, v in results.items() if k != "fisher_check"}))


@contextlib.contextmanager
def dequantized_weights(model, cm):
    """`model` with every lowered layer's weight set to the compiled codes x scales (restored after)."""
    saved = {}
    try:
        for node in cm.graph.annotated():
            ann = cm.graph.annotation(node)
            if ann.kernel is None:
                continue
            _, qweight, scales, zeros, _, spec, shape = node.args[:7]
            qt = QuantizedTensor(cm.graph.attr(qweight), cm.graph.attr(scales),
                                 None if zeros is None else cm.graph.attr(zeros), tuple(shape),
                                 QuantSpec.decode(spec))
            weight = model.get_submodule(ann.layer).weight
            saved[weight] = weight.data
            weight.data = dequantize(qt, weight.dtype)
        yield model
    finally:
        for weight, data in saved.items():
            weight.data = data


def logit_parity(model, cm, ids) -> float:
    with torch.inference_mode():
        return float((model(input_ids=ids[None], use_cache=False).logits - cm(ids[None])).abs().max())


def check_fisher(model, results: dict, calib: torch.Tensor, n: int) -> list[dict]:
    """Exact single-layer delta loss of n layers next to the Fisher estimate stored in results."""
    from sagequant.calibration.sensitivity import layer_sensitivity
    from sagequant.ir.trace import trace_model
    from sagequant.passes import PassContext
    from sagequant.passes.pipeline import PTQ, build_pipeline
    from sagequant.passes.mixed_precision import quantized_linears
    measured = next(e for e in results.values() if (e.get("mixed_precision") or {}).get("ladder"))
    estimate = {r["layer"]: r["options"]["W4A16"]["delta_loss"] for r in measured["sensitivity"]}
    ranked = sorted(estimate, key=estimate.get, reverse=True)
    rest = ranked[n // 2:]
    picked = ranked[:n // 2] + rest[::max(1, len(rest) // (n - n // 2))][:n - n // 2]
    cfg = sq.QuantConfig(**ROWS["w4a16-g128"])
    batches = list(calib.split(1))
    graph = build_pipeline(cfg, PTQ).manager(stop_after="annotate").run(trace_model(model),
                                                                         PassContext(cfg, batches))
    nodes = [nd for nd in quantized_linears(graph) if graph.annotation(nd).layer in picked]
    _, rows = layer_sensitivity(graph, batches, {nd: {"W4A16": graph.annotation(nd).weight_spec} for nd in nodes})
    return [{"layer": r["layer"], "fisher": estimate[r["layer"]], "measured": r["options"]["W4A16"]["delta_loss"]}
            for r in rows]


def overrides_for(measured: dict, bits: float) -> dict:
    ladder = measured["mixed_precision"]["ladder"]
    choices = choose_precisions(measured["sensitivity"], ladder, bits_per_weight=bits)
    return {c.layer: "skip" if c.label == "float" else {"weight_dtype": "int8"}
            for c in choices if c.label != ladder[0]}


def table(results: dict) -> str:
    base = results.get("float", {}).get("ppl")
    lines = ["| row | bits/weight | linear bytes (all but lm_head) | ppl | Δ% vs float | layers W4 / W8 / float "
             "| guard KL / Δloss (held-back) | compile s |", "|---|---|---|---|---|---|---|---|"]
    for name, e in sorted(results.items(), key=lambda kv: kv[1]["bits_per_weight"]):
        delta = f"{100 * (e['ppl'] / base - 1):+.2f}" if base else "n/a"
        if name == "float":
            lines.append(f"| float (fp32; counted at fp16) | 16 | - | {e['ppl']:.3f} | {delta} | - | - | - |")
            continue
        counts = " / ".join(str(v) for v in e["layers"].values())
        g = e["accuracy_guard"]
        lines.append(f"| {name} | {e['bits_per_weight']:.3f} | {e['bytes']:,} | {e['ppl']:.3f} | {delta} | "
                     f"{counts} | {g['kl']:.3f} / {g['delta_loss']:.3f} | {e['compile_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
