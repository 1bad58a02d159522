"""KV-cache quantization accuracy on the real SmolLM2-135M (issue 6 item 4), on CPU.

Every number is computed *through the cache path*: each window is prefilled into a
GenerationEngine's paged KV pool (quantized per the plan on write) and its logits come from
attention that reads the cache back (dequantized), exactly as decode does.

  perplexity  news text, first --max-tokens tokens, 512-token windows, for KV none / int8 / fp8
              with float weights and with the --weights schemes (W4A16 RTN g128, W8A8 ...)
  drift       one --long-context window: ppl per 512-token segment and the relative logit
              error vs float KV per segment
  memory      KV bytes per token vs a bf16 cache, for this model and 7B shapes
  greedy      engine greedy tokens vs Hugging Face generate (float weights, float KV)

    nice -n 5 python benchmarks/kv_cache_accuracy.py --max-tokens 20000 --long-context 4096 \\
        --weights w4a16-rtn --out kv_accuracy.json
"""
import argparse
import json
import platform
import time
from datetime import date

import torch

import sagequant as sq
from sagequant.api import CompiledModel
from sagequant.calibration.real_data import evaluation_text, load_smollm2
from sagequant.ir.kv_plan import KVQuantPlan, build_kv_plan
from sagequant.runtime import GenerationEngine
from sagequant.runtime.kv_pool import PagedKVPool
from sagequant.evaluation.perplexity import delta_pct, perplexity, tokenize_eval_text

KV = ("none", "int8", "fp8")
WEIGHTS = {
    "float": dict(ignore=["*"]),
    "w4a16-rtn": dict(weight_dtype="int4", activation_dtype="a16", group_size=128),
    "w8a16-rtn": dict(weight_dtype="int8", activation_dtype="a16", group_size=128),
    "w8a8-fp8": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None),
    "w8a8-int8": dict(weight_dtype="int8", activation_dtype="int8", group_size=None),
}


def with_kv(cm: CompiledModel, kv: str) -> CompiledModel:
    """The same compiled weights with another KV cache config (the graph is shared)."""
    cfg = cm.config.replace(kv_cache_dtype=kv)
    return CompiledModel(cm.graph, cfg, build_kv_plan(cfg), cm.pass_history)


def cached_logits(engine: GenerationEngine, ids: torch.Tensor) -> torch.Tensor:
    """[rows, L, vocab] logits of ids [rows, L], each row prefilled into a fresh sequence."""
    out = []
    for row in ids:
        engine.pool.open(0, row.numel())
        try:
            out.append(engine.forward([0], row[None])[0])
        finally:
            engine.pool.free(0)
    return torch.stack(out)


def kv_bytes() -> dict:
    """Bytes per token of K+V, all layers: SmolLM2 (30 x 3 kv heads x 64) and 7B shapes (Llama-2-7B
    32 x 32 x 128; Qwen2-7B 28 x 4 x 128), bf16 vs int8 / fp8 with fp16 scales, group None."""
    shapes = {"SmolLM2-135M": (30, 3, 64), "Llama-2-7B": (32, 32, 128), "Qwen2-7B": (28, 4, 128)}
    out = {}
    for name, (layers, heads, dim) in shapes.items():
        row = {}
        for kv in ("none", "int8", "fp8"):
            for bs in (16, 32):
                plan = KVQuantPlan(dtype=kv, block_size=bs)
                pool = PagedKVPool(plan, [kv] * layers, heads, dim, 1, 1, torch.bfloat16, torch.device("meta"))
                row[f"{kv}/b{bs}"] = pool.bytes_per_token()
        row["ratio_int8_b16"] = row["int8/b16"] / row["none/b16"]
        out[name] = row
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=20000)
    ap.add_argument("--long-context", type=int, default=4096)
    ap.add_argument("--weights", nargs="*", default=[], choices=[w for w in WEIGHTS if w != "float"])
    ap.add_argument("--weights-max-tokens", type=int, default=None,
                    help="tokens for the weight+KV combinations (default: --max-tokens)")
    ap.add_argument("--greedy-tokens", type=int, default=16)
    ap.add_argument("--fp8-high-precision-layers", type=int, nargs="*", default=None,
                    help="also measure fp8 KV with these layers' KV kept 16-bit (float weights)")
    ap.add_argument("--skip-float", action="store_true", help="only the --weights rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="kv_accuracy.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
               f"{args.threads} threads (shared 2-core CPU)", "torch": torch.__version__,
               "memory": kv_bytes()}
    print(json.dumps(results["memory"], indent=1))
    model, tok = load_smollm2()
    ids = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)
    long_ids = tokenize_eval_text(tok, evaluation_text(), args.long_context)

    ppl = {}
    for wname in ([] if args.skip_float else ["float"]) + args.weights:
        t0 = time.perf_counter()
        # Round-to-nearest weights with dynamic activation scales: no calibration data needed.
        cm = sq.compile(model, sq.QuantConfig(**WEIGHTS[wname]))
        print(f"compiled {wname} in {time.perf_counter() - t0:.0f}s", flush=True)
        n = args.max_tokens if wname == "float" else (args.weights_max_tokens or args.max_tokens)
        for kv in KV:
            engine = GenerationEngine(with_kv(cm, kv), max_batch=1, max_seq_len=args.long_context)
            r = perplexity(lambda x: cached_logits(engine, x), ids, window=512, stride=512, max_tokens=n)
            ppl[f"{wname}/kv-{kv}"] = {"ppl": r.ppl, "tokens": r.max_tokens, "seconds": round(r.seconds, 1)}
            base = ppl[f"{wname}/kv-none"]["ppl"]
            print(f"{wname:10s} kv={kv:5s} ppl {r.ppl:.4f} ({delta_pct(base, r.ppl):+.3f}% vs float KV) "
                  f"{r.seconds:.0f}s", flush=True)
            results["perplexity"] = ppl
            save(results, args.out)
        if wname == "float" and args.fp8_high_precision_layers is not None:
            cfg = cm.config.replace(kv_cache_dtype="fp8", kv_high_precision_layers=args.fp8_high_precision_layers)
            engine = GenerationEngine(CompiledModel(cm.graph, cfg, build_kv_plan(cfg), cm.pass_history),
                                      max_batch=1, max_seq_len=args.long_context)
            r = perplexity(lambda x: cached_logits(engine, x), ids, window=512, stride=512, max_tokens=n)
            ppl[f"float/kv-fp8-hp{args.fp8_high_precision_layers}"] = {
                "ppl": r.ppl, "tokens": r.max_tokens, "seconds": round(r.seconds, 1),
                "kv_bytes_per_token": engine.stats()["kv_bytes_per_token"]}
            print(f"fp8 KV, layers {args.fp8_high_precision_layers} 16-bit: ppl {r.ppl:.4f}", flush=True)
            save(results, args.out)
        if wname == "float":
            results["greedy_vs_hf"] = greedy_vs_hf(model, cm, tok, args.greedy_tokens)
            save(results, args.out)
            results["drift"] = drift(cm, long_ids)
            save(results, args.out)
    print(json.dumps({k: v for k, v in results.items() if k != "memory"}, indent=1))


def save(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def drift(cm: CompiledModel, ids: torch.Tensor, segment: int = 512) -> dict:
    """Per 512-token segment of one long window: ppl with each KV dtype and the relative L2
    error of the logits vs float KV."""
    logits = {kv: cached_logits(GenerationEngine(with_kv(cm, kv), max_batch=1, max_seq_len=ids.numel()),
                                ids[None])[0] for kv in KV}
    nll = {kv: -torch.log_softmax(lg[:-1].double(), -1).gather(-1, ids[1:, None])[:, 0]
           for kv, lg in logits.items()}
    out = []
    for s in range(0, ids.numel() - 1, segment):
        row = {"tokens": f"{s}-{min(s + segment, ids.numel() - 1)}"}
        for kv in KV:
            row[f"ppl_{kv}"] = float(torch.exp(nll[kv][s:s + segment].mean()))
            if kv != "none":
                ref, q = logits["none"][s:s + segment], logits[kv][s:s + segment]
                row[f"rel_err_{kv}"] = float((q - ref).norm() / ref.norm())
                row[f"top1_agree_{kv}"] = float((q.argmax(-1) == ref.argmax(-1)).float().mean())
        out.append(row)
        print(row, flush=True)
    return {"context": ids.numel(), "segments": out}


def greedy_vs_hf(model, cm: CompiledModel, tok, n: int) -> dict:
    prompts = ["The Prime Minister said on Tuesday that", "Scientists have found a new way to"]
    out = {}
    for p in prompts:
        ids = torch.tensor([tok.encode(p)])
        hf = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id,
                            eos_token_id=None)[0, ids.shape[1]:].tolist()
        ours = cm.generate(ids, max_new_tokens=n)[0, ids.shape[1]:].tolist()
        out[p] = {"equal": hf == ours, "text": tok.decode(ours)}
        print(p, out[p], flush=True)
    return out


if __name__ == "__main__":
    main()
