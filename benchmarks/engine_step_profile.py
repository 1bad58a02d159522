"""Per-kernel breakdown of one CUDA-graph decode step of the GenerationEngine (issue 18): for each
scheme, the exported ATen step (fused_step=False) next to the fused step (runtime/fuse_step.py),
at Llama-3-8B width and a few layers (the per-layer kernels repeat; the lm_head is its own row).

    python3 benchmarks/engine_step_profile.py --out $OUT/profile.json     # one H100, ~2 min

For each (scheme, step): the graph replay time (CUDA events, median of 3 x 20 replays), and a
torch.profiler trace of 10 replays summed per kernel name and per category (GEMM, attention,
norm, rotary + cache write, SiLU-mul, other), as µs per step and kernels per step. Also checks
that the fused step's logits (one prefill, one graph decode step) match the unfused step's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import e2e_generation as e2e  # noqa: E402

CATEGORIES = [  # first match wins; names as CUPTI reports them
    ("attention", ("_decode_partial", "_combine", "attention", "flash")),
    ("norm", ("rms_norm",)),
    ("rotary+cache", ("_rope", "_rotary", "index", "scatter", "cat", "neg")),
    ("silu_mul", ("silu",)),
    ("gemm", ("gemm", "gemv", "_mma", "cutlass", "xmma", "nvjet", "splitk", "dequant", "_fp8",
              "cublas", "sm90", "scaled_mm", "int8", "act_quant")),
]


def category(name: str) -> str:
    low = name.lower()
    return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def profile_graph(graph, reps: int = 10) -> dict:
    from torch.profiler import ProfilerActivity, profile
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    kernels: dict[str, list] = {}
    for avg in prof.key_averages():   # kernels (and memcpy/memset) carry self device time
        us = getattr(avg, "self_device_time_total", None)
        us = getattr(avg, "self_cuda_time_total", 0) if us is None else us
        if us > 0:
            kernels[avg.key] = [us / reps, avg.count / reps]
    cats: dict[str, list] = {}
    for name, (us, n) in kernels.items():
        c = cats.setdefault(category(name), [0.0, 0.0])
        c[0] += us
        c[1] += n
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:14]
    return {"kernel_us": sum(v[0] for v in kernels.values()),
            "kernels_per_step": round(sum(v[1] for v in kernels.values()), 1),
            "by_category": {c: {"us": round(v[0], 1), "kernels": round(v[1], 1)} for c, v in cats.items()},
            "top": [{"name": n[:90], "us": round(v[0], 1), "calls": round(v[1], 1)} for n, v in top]}


def step_row(cm, fused: bool, batch: int, prompt_len: int, vocab: int) -> dict:
    dev = torch.device("cuda")
    engine = e2e.new_engine(cm, batch, prompt_len + 64, dev, cuda_graphs=True, fused_step=fused)
    prompts = e2e.prompts(batch, prompt_len, vocab, 3)
    # Logits of one prefill (M = prompt_len) and one graph decode step, for the fused/unfused check.
    engine.pool.open(0, prompt_len + 2)
    pre = engine.forward([0], torch.tensor(prompts[:1], device=dev))[0, -1]
    dec = engine.graphs.decode([0], pre.argmax().view(1, 1))[0, -1]
    engine.pool.free(0)
    rids = [engine.add_request(p, 16) for p in prompts]
    for _ in range(4):
        engine.step()
    bucket = engine.graphs.buckets[next(s for s in engine.graphs.sizes if s >= batch)]
    row = {"fused": fused, "fusions": engine.graph.model_info.get("step_fusions"),
           "graph_nodes": sum(n.op == "call_function" for n in engine.graph.graph.nodes),
           "replay_ms": e2e.replay_ms(bucket.graph),
           "logits": torch.stack([pre, dec]).float().cpu()}
    try:
        row.update(profile_graph(bucket.graph))
    except Exception as err:  # the replay time above still stands
        row.update(profile_error=e2e.lib.short_error(err), by_category={}, kernel_us=0, kernels_per_step=0)
    for rid in rids:
        engine.abort(rid)
    del engine
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--schemes", nargs="*", default=["bf16", "W4A16"], choices=list(e2e.SCHEMES))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--out", default="engine_step_profile.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    sq = e2e.import_sagequant()
    model = e2e.build_model("llama3-8b", args.layers, args.vocab, args.prompt_len + 128, torch.bfloat16)
    rows = []
    for scheme in args.schemes:
        cm = e2e.compile_scheme(sq, model, scheme, "cuda")
        for fused in (False, True):
            rows.append({"scheme": scheme, **step_row(cm, fused, args.batch, args.prompt_len, args.vocab)})
        ref, got = rows[-2].pop("logits"), rows[-1].pop("logits")
        err = [e2e.lib.rel_errors(got[i], ref[i])["rel_fro"] for i in range(2)]
        rows[-1]["logits_rel_vs_unfused"] = {"prefill": err[0], "decode": err[1]}
        rows[-1]["matches_unfused"] = max(err) <= e2e.DEFAULT_TOL
        for r in rows[-2:]:
            print(json.dumps(r), flush=True)
        del cm
    Path(args.out).write_text(json.dumps({"env": e2e.lib.environment(), "settings": vars(args),
                                          "rows": rows}, indent=1))
    cats = [c for c, _ in CATEGORIES] + ["other"]
    print(f"\nLlama-3-8B width, {args.layers} layers, vocab {args.vocab}, batch {args.batch}, "
          f"{args.prompt_len}-token context; µs per decode step (kernels per step)")
    print("| scheme | step | replay µs | kernel µs | kernels | " + " | ".join(cats) + " |")
    print("|---" * (5 + len(cats)) + "|")
    for r in rows:
        cells = [f"{r['by_category'].get(c, {}).get('us', 0):.0f} ({r['by_category'].get(c, {}).get('kernels', 0):.0f})"
                 for c in cats]
        tag = (f"fused (logits rel {max(r['logits_rel_vs_unfused'].values()):.1e}"
               f"{'' if r['matches_unfused'] else ' MISMATCH'})") if r["fused"] else "unfused"
        print(f"| {r['scheme']} | {tag} | {1e3 * r['replay_ms']:.0f} | {r['kernel_us']:.0f} | "
              f"{r['kernels_per_step']:.0f} | " + " | ".join(cells) + " |")
    return 0 if all(r.get("matches_unfused", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
