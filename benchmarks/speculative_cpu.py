"""Speculative decoding on the real SmolLM2-135M on CPU (issue 6 item 6): one QuantConfig with
draft_mode=True gives the verify model (its own scheme) and the draft (W4A16 g128 RTN + int8 KV).
For each prompt: the verify model's own greedy decode through the engine (tokens/s), then
speculative decoding with k draft tokens: equality with the verify output, acceptance rate,
tokens/s and speed-up.

    nice -n 5 python benchmarks/speculative_cpu.py --new-tokens 48 --k 2 4 --out spec.json
"""
import argparse
import json
import time
from datetime import date

import torch

import sagequant as sq
from sagequant.calibration.real_data import load_smollm2
from sagequant.runtime import GenerationEngine
from sagequant.runtime.speculative import SpeculativeDecoder

PROMPTS = ["The Prime Minister said on Tuesday that the government",
           "Australian scientists have discovered",
           "Write a short story about a robot who learns to paint."]


def verify_only(cm, prompt, n):
    engine = GenerationEngine(cm, max_batch=1, max_seq_len=len(prompt) + n + 8)
    engine.add_request(prompt, n)
    out = []
    t0 = time.perf_counter()
    while engine.has_work():
        out.extend(e.token_id for e in engine.step())
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scheme", default="w8a16", choices=["w8a16", "fp8-w8a16", "w8a8-fp8"])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="spec.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scheme = {"w8a16": dict(weight_dtype="int8", activation_dtype="a16", group_size=128),
              "fp8-w8a16": dict(weight_dtype="fp8", activation_dtype="a16", group_size=None),
              "w8a8-fp8": dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None)}[args.scheme]
    model, tok = load_smollm2()
    t0 = time.perf_counter()
    cm = sq.compile(model, sq.QuantConfig(draft_mode=True, **scheme))
    print(f"compiled verify {cm.config.scheme} + draft {cm.draft.config.scheme}/kv-"
          f"{cm.draft.kv_plan.dtype} in {time.perf_counter() - t0:.0f}s", flush=True)
    rows = []
    for text in PROMPTS:
        prompt = tok.encode(text)
        ref, t_ref = verify_only(cm, prompt, args.new_tokens)
        row = {"prompt": text, "verify_tok_s": round(len(ref) / t_ref, 2)}
        for k in args.k:
            out, st = SpeculativeDecoder(cm, k=k, max_seq_len=len(prompt) + args.new_tokens + 8).generate(
                prompt, args.new_tokens)
            row[f"k{k}"] = {"equal": out == ref, "acceptance": round(st.acceptance_rate, 3),
                            "tok_s": round(st.new_tokens / st.seconds, 2),
                            "speedup": round(t_ref / st.seconds, 2),
                            "verify_forwards": st.verify_forwards, "draft_forwards": st.draft_forwards}
        print(row, flush=True)
        rows.append(row)
    json.dump({"date": str(date.today()), "threads": args.threads, "verify": cm.config.scheme,
               "draft": f"{cm.draft.config.scheme} + {cm.draft.kv_plan.dtype} KV",
               "new_tokens": args.new_tokens, "rows": rows}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
