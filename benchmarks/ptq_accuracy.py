"""PTQ accuracy table on the real SmolLM2-135M (issues 4, 19): each scheme / calibration method
vs the float model on the news text, calibrated on the disjoint Wikipedia prose: perplexity Δ%,
mean KL(float ‖ quant) per token and top-1 flip rate, each with a paired standard error
(clustered by 512-token window), and the share of RTN's loss each method recovers.

The whole issue-19 table, one command (each row in its own process, --jobs at a time; rows already
in --out are kept, so a cut run resumes; a row that fails is recorded with its error):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ptq_accuracy.py --all --jobs 3 \
        --max-tokens 8192 --out ptq.json --table

Single rows in this process: --schemes float w4a16-rtn ...; `--schemes --out ptq.json --table`
prints the Markdown table of everything in --out.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

import sagequant as sq
from sagequant.calibration.datasets import tokenize_calibration
from sagequant.calibration.real_data import evaluation_text, load_smollm2, wikipedia_prose
from sagequant.evaluation.contributions import layer_contributions
from sagequant.evaluation.perplexity import compare_to_float, perplexity, tokenize_eval_text

G128 = dict(group_size=128, symmetric=True)
SCHEMES = {
    "w8a16-rtn": dict(weight_dtype="int8", activation_dtype="a16", **G128),
    "w8a8-int8-minmax": dict(weight_dtype="int8", activation_dtype="int8", group_size=None),
    "w8a8-int8-static-minmax": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                    activation_scale="static_per_tensor"),
    "w8a8-int8-static-smoothquant": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                         activation_scale="static_per_tensor", calibration="smoothquant"),
    "w8a8-int8-smoothquant": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                  calibration="smoothquant"),
    "w8a8-int8-static-mse": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                 activation_scale="static_per_tensor", observer="mse"),
    "w8a8-int8-smoothquant-auto": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                       calibration="smoothquant", smoothquant_alpha="auto"),
    "w8a8-int8-smoothquant-mse": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                      calibration="smoothquant", weight_observer="mse"),
    "w8a8-fp8-dynamic": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None),
    "w8a8-fp8-smoothquant": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                 calibration="smoothquant"),
    "w8a8-fp8-dynamic-mse": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                 weight_observer="mse"),
    # GPTQ on the 8-bit per-channel weights, alone and after SmoothQuant (llm-compressor's W8A8 recipe)
    "w8a8-int8-gptq": dict(weight_dtype="int8", activation_dtype="int8", group_size=None, calibration="gptq"),
    "w8a8-fp8-gptq": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None, calibration="gptq"),
    "w8a8-int8-smoothquant-gptq": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                       calibration="smoothquant+gptq"),
    "w8a8-fp8-smoothquant-gptq": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                      calibration="smoothquant+gptq"),
    **{f"w8a8-int8-smoothquant-a{a}": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                           calibration="smoothquant", smoothquant_alpha=a / 100)
       for a in (40, 60, 70, 80)},
    **{f"w8a8-int8-smoothquant-a{a}-gptq": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                                calibration="smoothquant+gptq", smoothquant_alpha=a / 100)
       for a in (60, 70, 80)},
    "w8a8-int8-smoothquant-auto-gptq": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                            calibration="smoothquant+gptq", smoothquant_alpha="auto"),
    "w8a8-fp8-smoothquant-auto": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                      calibration="smoothquant", smoothquant_alpha="auto"),
    "w8a8-fp8-smoothquant-auto-gptq": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                           calibration="smoothquant+gptq", smoothquant_alpha="auto"),
    # ... with the attention sink weighted x50 in the q/k/v Hessians (as for W4A16, §2g)
    "w8a8-fp8-gptq-sink50": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None, calibration="gptq",
                                 gptq_sink_weight=50.0),
    "w8a8-fp8-smoothquant-auto-gptq-sink50": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                                  calibration="smoothquant+gptq", smoothquant_alpha="auto",
                                                  gptq_sink_weight=50.0),
    "w8a8-int8-smoothquant-auto-gptq-sink50": dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                                   calibration="smoothquant+gptq", smoothquant_alpha="auto",
                                                   gptq_sink_weight=50.0),
    "w8a8-fp8-static-minmax": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                   activation_scale="static_per_tensor"),
    "w4a16-rtn": dict(weight_dtype="int4", activation_dtype="a16", **G128),
    # lm_head in int8 per channel (issue 18: 1.05 of the 4.6 GB an 8B W4A16 decode step reads),
    # with W4A16 RTN and alone (every other linear float)
    "w4a16-rtn-lmhead-int8": dict(weight_dtype="int4", activation_dtype="a16", **G128, ignore=[],
                                  overrides={"lm_head": {"weight_dtype": "int8", "group_size": None}}),
    "lmhead-int8-only": dict(weight_dtype="int8", activation_dtype="a16", group_size=None,
                             ignore=["model.layers.*"]),
    "w4a16-awq": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq", **G128),
    # AWQ's statistics without each window's first position (the attention sink's massive activations)
    "w4a16-awq-sink1": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq", sink_tokens=1, **G128),
    # the attention sink (each window's first position) weighted in AWQ's scale and clip losses
    **{f"w4a16-awq-sinkw{w}": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq",
                                  awq_sink_weight=float(w), **G128) for w in (2, 8, 20, 50, 200, 1000)},
    # the scale search measured at the module's output, as AutoAWQ: gate/up at down_proj's, q/k/v
    # at o_proj's (the attention run on 8 calibration sequences)
    "w4a16-awq-module": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq",
                             awq_scale_loss="module", **G128),
    "w4a16-awq-module-sinkw50": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq",
                                     awq_scale_loss="module", awq_sink_weight=50.0, **G128),
    "w4a16-awq-module-duo": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq",
                                 awq_scale_loss="module", awq_duo_scaling=True, **G128),
    "w4a16-awq-duo": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq",
                          awq_duo_scaling=True, **G128),
    "w4a16-gptq": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                       gptq_true_sequential=True, **G128),
    "w4a16-gptq-actorder": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                gptq_act_order=True, **G128),
    "w4a16-gptq-no-sink-one-pass": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                        sink_tokens=1, gptq_true_sequential=False, **G128),
    "w4a16-gptq-one-pass": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                gptq_true_sequential=False, **G128),
    # Hessian rows above 10x the median row energy (attention sinks) weigh as 10x rows (§2d)
    "w4a16-gptq-rowcap10": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                gptq_row_energy_cap=10.0, **G128),
    "w4a16-awq-gptq-rowcap10": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq+gptq",
                                    gptq_row_energy_cap=10.0, **G128),
    # each window's first position weighs as N rows in the q/k/v Hessians (attention sink, §2g)
    **{f"w4a16-gptq-sink{w}": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                   gptq_sink_weight=float(w), **G128) for w in (5, 10, 20, 50, 200)},
    # every q/k/v Hessian row weighted by the attention mass its position receives as a key
    "w4a16-gptq-sink-attention": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                      gptq_sink_weight="attention", **G128),
    "w4a16-gptq-sink-attention-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                          gptq_sink_weight="attention", group_size=64),
    **{f"w4a16-gptq-sink{w}-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                       gptq_sink_weight=float(w), group_size=64) for w in (10, 20, 50, 200)},
    # GPTQ sink50 with one more knob each (the llm-compressor default orders columns by
    # decreasing diag H with static groups; damping 0.1 as GPTQModel's; MSE-searched group scales)
    "w4a16-gptq-sink50-actorder": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                       gptq_sink_weight=50.0, gptq_act_order=True, **G128),
    "w4a16-gptq-sink50-damp10": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                     gptq_sink_weight=50.0, gptq_damp=0.1, **G128),
    "w4a16-gptq-sink50-mse": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                  gptq_sink_weight=50.0, weight_observer="mse", **G128),
    "w4a16-gptq-sink50-seq": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                  gptq_sink_weight=50.0, gptq_true_sequential=True, **G128),
    # ... and the last N blocks each keep GPTQ's rounding or RTN, by KL at the logits on the guard's
    # held-back windows (gptq_select_blocks)
    **{f"w4a16-gptq-sink50-mse-select{n}": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                                gptq_sink_weight=50.0, weight_observer="mse",
                                                gptq_select_blocks=n, **G128) for n in (4, 30)},
    "w4a16-rtn-mse": dict(weight_dtype="int4", activation_dtype="a16", weight_observer="mse", **G128),
    "w4a16-rtn-mse-g64": dict(weight_dtype="int4", activation_dtype="a16", weight_observer="mse", group_size=64),
    "w4a16-gptq-sink50-mse-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                      gptq_sink_weight=50.0, weight_observer="mse", group_size=64),
    "w4a16-awq-gptq-sink50-mse": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq+gptq",
                                      gptq_sink_weight=50.0, weight_observer="mse", **G128),
    "w4a16-awq-mse": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq",
                          weight_observer="mse", **G128),
    "w4a16-awq-gptq": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq+gptq", **G128),
    "w4a16-awq-gptq-sink50": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq+gptq",
                                  gptq_sink_weight=50.0, **G128),
    "w4a16-awq-gptq-sink50-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq+gptq",
                                      gptq_sink_weight=50.0, group_size=64),
    # rotate pass (QuaRot-style Hadamard residual rotation + online down_proj / per-head v/o)
    "w8a8-int8-rotate": dict(weight_dtype="int8", activation_dtype="int8", group_size=None, rotate="hadamard"),
    "w8a8-fp8-rotate": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None, rotate="hadamard"),
    "w4a16-rtn-rotate": dict(weight_dtype="int4", activation_dtype="a16", rotate="hadamard", **G128),
    # QuaRot's weight method: GPTQ in the rotated basis (§2j: RTN there loses to the folded norm scales)
    "w4a16-gptq-sink50-mse-rotate": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                         gptq_sink_weight=50.0, weight_observer="mse", rotate="hadamard", **G128),
    "w4a16-awq-rotate": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq", rotate="hadamard",
                             **G128),
    "w4a16-gptq-mse-rotate": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                  weight_observer="mse", rotate="hadamard", **G128),
    "w4a16-gptq-sink50-rotate": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                     gptq_sink_weight=50.0, rotate="hadamard", **G128),
    "nf4-g64": dict(weight_dtype="nf4", activation_dtype="a16", group_size=64),
    # group 64 divides every SmolLM2 layer: the setting llm-compressor can run (it refuses the
    # ragged 576 = 4 x 128 + 64 groups of g128), for a like-for-like comparison
    "w4a16-rtn-g64": dict(weight_dtype="int4", activation_dtype="a16", group_size=64),
    "w4a16-awq-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq", group_size=64),
    "w4a16-gptq-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                           gptq_true_sequential=True, group_size=64),
    # llm-compressor's GPTQModifier defaults (act-order "static", dampening 0.01), for the g64 peer row
    "w4a16-gptq-actorder-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                    gptq_act_order=True, group_size=64),
    "w4a16-gptq-static": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                              gptq_static_groups=True, **G128),
    "w4a16-gptq-static-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                  gptq_static_groups=True, group_size=64),
    "w4a16-gptq-one-pass-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                    gptq_true_sequential=False, group_size=64),
    "w4a16-gptq-rowcap10-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="gptq",
                                    gptq_row_energy_cap=10.0, group_size=64),
    "w4a16-awq-gptq-g64": dict(weight_dtype="int4", activation_dtype="a16", calibration="awq+gptq",
                               group_size=64),
    # W4A8 (int4 g128 weights, 8-bit dynamic per-token activations), with and without rotation
    "w4a8-int8-rtn": dict(weight_dtype="int4", activation_dtype="int8", **G128),
    "w4a8-int8-rtn-rotate": dict(weight_dtype="int4", activation_dtype="int8", rotate="hadamard", **G128),
    "w4a8-fp8-rtn-rotate": dict(weight_dtype="int4", activation_dtype="fp8", rotate="hadamard", **G128),
    "w4a8-int8-gptq-sink50-mse-rotate": dict(weight_dtype="int4", activation_dtype="int8", calibration="gptq",
                                             gptq_sink_weight=50.0, weight_observer="mse", rotate="hadamard",
                                             **G128),
    "w4a8-fp8-gptq-sink50-mse-rotate": dict(weight_dtype="int4", activation_dtype="fp8", calibration="gptq",
                                            gptq_sink_weight=50.0, weight_observer="mse", rotate="hadamard",
                                            **G128),
    # FP8 activations after rotation (their outliers spread), weights by GPTQ sink50 as in §2i
    "w8a8-fp8-gptq-sink50-rotate": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                        calibration="gptq", gptq_sink_weight=50.0, rotate="hadamard"),
    "w4a8-int8-gptq-sink50-mse": dict(weight_dtype="int4", activation_dtype="int8", calibration="gptq",
                                      gptq_sink_weight=50.0, weight_observer="mse", **G128),
}
# RTN row whose loss a method's row is measured against, by group size.
RTN_OF = {128: "w4a16-rtn", 64: "w4a16-rtn-g64"}
# The issue-19 table (--all): every scheme's rows; the slowest (GPTQ) first so --jobs overlaps them.
TABLE = ["w4a8-int8-gptq-sink50-mse-rotate", "w4a16-gptq-sink50-mse-rotate", "w4a16-gptq-sink50-mse-select30",
         "w4a8-fp8-gptq-sink50-mse-rotate", "w8a8-fp8-gptq-sink50-rotate", "w4a16-awq-rotate",
         "w8a8-fp8-smoothquant-auto-gptq-sink50",
         "w8a8-int8-smoothquant-auto-gptq-sink50", "w8a8-fp8-gptq-sink50", "w4a16-gptq-one-pass",
         "w4a16-gptq-one-pass-g64", "w4a16-awq-gptq", "w4a16-awq-gptq-g64",
         "w4a16-awq", "w4a16-awq-g64", "float", "w8a16-rtn", "w8a8-int8-minmax",
         "w8a8-int8-smoothquant", "w8a8-int8-smoothquant-auto", "w8a8-int8-smoothquant-mse",
         "w8a8-fp8-dynamic", "w8a8-fp8-smoothquant", "w8a8-fp8-dynamic-mse",
         "w8a8-int8-rotate", "w8a8-fp8-rotate", "w4a16-rtn-rotate", "w4a16-rtn", "w4a16-rtn-g64",
         "w4a8-int8-rtn", "w4a8-int8-rtn-rotate", "w4a8-fp8-rtn-rotate"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", nargs="*", choices=["float", *SCHEMES],
                   help="rows to run (with --all: instead of the TABLE rows)")
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--scale-precision", choices=["fp16", "fp32"], default="fp32",
                   help="QuantConfig.scale_precision of every row (fp32: compressed-tensors' scales "
                   "bit for bit; benchmarks/peer_numerics.py)")
    p.add_argument("--out", default="ptq_accuracy.json")
    p.add_argument("--table", action="store_true", help="print the Markdown table of --out at the end")
    p.add_argument("--all", action="store_true",
                   help="run every TABLE row (or --schemes row) missing from --out, each in its own process")
    p.add_argument("--jobs", type=int, default=1, help="--all: rows run at the same time")
    p.add_argument("--contributions", choices=["block", "linear"],
                   help="also each row's per-unit contribution table (only that unit quantized) on the "
                   "first --contribution-tokens evaluation tokens")
    p.add_argument("--contribution-tokens", type=int, default=1024)
    p.add_argument("--guard", choices=["report", "off"], default="report",
                   help="QuantConfig.guard of every row (off: no per-layer SQNR table, ~35 s less a row)")
    p.add_argument("--device", help="calibrate layer-wise on this device (compile(device=...), guard "
                   "off; e.g. cuda); evaluation stays on the CPU, so a row compares with the whole-model "
                   "CPU row of the same scheme on the calibration alone")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    if args.all:
        run_all(args, args.schemes or TABLE, out, results)
        return
    if not args.schemes:
        print(markdown_table(results))
        return
    model, tok = load_smollm2()
    eval_ids = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)
    # The accuracy guard holds back the last guard_samples sequences, so calibration itself still
    # sees exactly the first --calib-samples windows (the ones llm-compressor gets); with the guard
    # off (--guard off, --device) nothing is held back.
    guard_samples = 0 if args.device or args.guard == "off" else sq.QuantConfig().guard_samples
    calib = tokenize_calibration(wikipedia_prose(), tok, args.calib_samples + guard_samples,
                                 args.calib_seq_len)
    meta = {"eval_tokens": int(eval_ids.numel()),
            "calibration": f"{len(calib) - guard_samples}x{calib.shape[1]}",
            "date": date.today().isoformat(), "calibration_device": args.device or "cpu (whole model)",
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    float_fn = cached_logits(lambda ids: model(input_ids=ids, use_cache=False).logits)
    for name in args.schemes:
        t = time.perf_counter()
        if name == "float":
            with torch.inference_mode():
                res = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, eval_ids)
            entry = {"ppl": res.ppl, "compile_s": 0.0}
        else:
            # guard='report': the table must show a bad scheme's number, not stop at it (layer-wise
            # runs have no guard: it needs the whole float model).
            cfg = sq.QuantConfig(**SCHEMES[name], scale_precision=args.scale_precision,
                                 calibration_samples=args.calib_samples, calibration_seq_len=args.calib_seq_len,
                                 guard="off" if args.device else args.guard)
            cm = (sq.compile(model, cfg, calibration_data=calib, device=args.device) if args.device
                  else sq.compile(model, cfg, calibration_data=calib))
            compile_s = time.perf_counter() - t
            res = compare_to_float(float_fn, cm, eval_ids)
            entry = {"ppl": res["ppl_quant"], "compile_s": compile_s, "scheme": cfg.scheme, "vs_float": res,
                     "calibration": cfg.calibration, "config": SCHEMES[name],
                     "scale_precision": cfg.scale_precision,
                     "bits_per_weight": cm.weight_bytes()["bits_per_weight"],
                     "accuracy_guard": cm.report().get("accuracy_guard"),
                     "passes": {h["pass"]: h.get("seconds") for h in cm.pass_history},
                     "pass_stats": {h["pass"]: h.get("stats") for h in cm.pass_history
                                    if h["pass"] in ("smoothquant", "awq", "gptq")}}
            if args.contributions:
                batches = [w[None] for w in eval_ids[:args.contribution_tokens].split(512)]
                entry["contributions"] = layer_contributions(cm.graph, model, batches, args.contributions)
        entry.update(meta, eval_s=res.seconds if name == "float" else res["seconds"])
        results[name] = entry
        base = results.get("float", {}).get("ppl")
        delta = f"{100 * (entry['ppl'] / base - 1):+.2f}%" if base else "n/a"
        print(f"{name:<32} ppl {entry['ppl']:8.3f}  Δ {delta:>8}  compile {entry['compile_s']:6.1f}s", flush=True)
        out.write_text(json.dumps(results, indent=1))
    if args.table:
        print(markdown_table(results))


def run_all(args, rows: list[str], out: Path, results: dict) -> None:
    """Each row missing from --out as `--schemes ROW --out ROWFILE` in a child process (memory is
    freed per row; a crash costs one row), merged into --out as it finishes."""
    rows_dir = out.with_suffix(".rows")
    rows_dir.mkdir(exist_ok=True)
    for name in rows:  # rows a cut run's children finished after their parent stopped
        done = rows_dir / f"{name}.json"
        if "ppl" not in results.get(name, {}) and done.exists():
            results[name] = json.loads(done.read_text())[name]
            out.write_text(json.dumps(results, indent=1))
    todo = [r for r in rows if "ppl" not in results.get(r, {})]
    running: dict[str, subprocess.Popen] = {}
    common = ["--max-tokens", str(args.max_tokens), "--calib-samples", str(args.calib_samples),
              "--calib-seq-len", str(args.calib_seq_len), "--scale-precision", args.scale_precision,
              "--guard", args.guard]
    if args.device:
        common += ["--device", args.device]
    if args.contributions:
        common += ["--contributions", args.contributions, "--contribution-tokens", str(args.contribution_tokens)]
    while todo or running:
        while todo and len(running) < args.jobs:
            name = todo.pop(0)
            row_out = rows_dir / f"{name}.json"
            row_out.unlink(missing_ok=True)
            log = open(rows_dir / f"{name}.log", "w")
            running[name] = subprocess.Popen(
                [sys.executable, __file__, "--schemes", name, "--out", str(row_out), *common],
                stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
            print(f"started {name} (log {rows_dir / (name + '.log')})", flush=True)
        time.sleep(5)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            row_out = rows_dir / f"{name}.json"
            if proc.returncode == 0 and row_out.exists():
                results[name] = json.loads(row_out.read_text())[name]
            else:
                tail = (rows_dir / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
                results[name] = {"error": f"exit {proc.returncode}: {tail[0][-300:]}"}
            print(f"finished {name}: {results[name].get('ppl', results[name].get('error'))}", flush=True)
            out.write_text(json.dumps(results, indent=1))
    if args.table:
        print(markdown_table(results))


def cached_logits(fn):
    """fn memoised on the input ids: every row compares with the same float logits, computed once
    per process (fp32, 16 windows x 512 x 49152 = 1.6 GB at 8k tokens)."""
    cache = {}

    def cached(ids: torch.Tensor) -> torch.Tensor:
        key = ids.numpy().tobytes()
        if key not in cache:
            cache[key] = fn(ids)
        return cache[key]
    return cached


def markdown_table(results: dict) -> str:
    """One row per scheme in SCHEMES order: ppl, Δ% ± se, KL ± se, flip rate ± se, RTN loss recovered."""
    lines = ["| row | scheme | method | group | ppl | Δ% ppl ± se | KL(float‖quant) ± se | top-1 flip % ± se "
             "| RTN loss recovered | compile s |", "|---|---|---|---|---|---|---|---|---|---|"]
    float_ppl = next((r["vs_float"]["ppl_float"] for r in results.values() if "vs_float" in r), None)
    if float_ppl is not None:
        lines.append(f"| float | float | - | - | {float_ppl:.3f} | - | - | - | - | - |")
    for name in SCHEMES:
        r = results.get(name)
        if r is not None and "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | | | | | | |")
        if r is None or "vs_float" not in r:
            continue
        v, cfg = r["vs_float"], r["config"]
        group = cfg.get("group_size") or "per-channel"
        rtn = results.get(RTN_OF.get(cfg.get("group_size"), ""), {}).get("vs_float")
        recovered = "-"
        if rtn is not None and cfg.get("calibration", "minmax") != "minmax" and r["scheme"] == "W4A16":
            recovered = f"{100 * (1 - v['ppl_delta_pct'] / rtn['ppl_delta_pct']):.0f}%"
        method = cfg.get("calibration", "minmax") + ("+rotate" if cfg.get("rotate", "off") != "off" else "")
        lines.append(f"| {name} | {r['scheme']} | {method} | {group} | {v['ppl_quant']:.3f} "
                     f"| {v['ppl_delta_pct']:+.2f} ± {v['ppl_delta_pct_se']:.2f} | {v['kl']:.4f} ± {v['kl_se']:.4f} "
                     f"| {100 * v['flip_rate']:.2f} ± {100 * v['flip_rate_se']:.2f} | {recovered} "
                     f"| {r['compile_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
