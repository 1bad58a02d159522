"""Peers for the e2e table (issue 18): Hugging Face `generate` with a static cache (which compiles
the decode step with CUDA graphs), bf16 and torchao int4 weight-only (group 128, tinygemm
layout), on the same random-weight Llama-3-8B-shaped model e2e_generation.py builds; and the
same two models' one-token forward under torch.compile(mode="max-autotune") in a plain greedy
loop over a static cache, gpt-fast style ("bf16-compiled", "torchao-int4-compiled").

    PYTHONPATH=/tmp/site python3 benchmarks/peer_generate.py --layers 32 --vocab 128256 --out $OUT/peers.json

Per peer and batch: prefill ms (prompt to first token) and decode tokens/s over the steps after
the first two, from per-step timestamps a logits processor records (generate synchronises each
step for its stopping check, so the stamps are step boundaries). The first generate call per
batch size compiles and is not timed. A peer that cannot run records why.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import e2e_generation as e2e  # noqa: E402


class StepClock:
    """A logits processor that stamps the time each decode step reaches sampling."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def timed_generate(model, ids: torch.Tensor, new_tokens: int) -> dict:
    from transformers import LogitsProcessorList
    clock = StepClock()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   logits_processor=LogitsProcessorList([clock]), pad_token_id=0)
    torch.cuda.synchronize()
    s = clock.stamps
    steps = len(s) - 3
    return {"prefill_ms": 1e3 * (s[0] - t0),
            "tok_s": ids.shape[0] * steps / (s[-1] - s[2]) if steps > 0 else None,
            "ms_per_step": 1e3 * (s[-1] - s[2]) / max(steps, 1)}


PEERS = ("hf-bf16", "torchao-int4", "bf16-compiled", "torchao-int4-compiled")


def run_peer(name: str, model, args) -> dict:
    row: dict = {"peer": name}
    model.generation_config.cache_implementation = "static"
    for b in args.batches:
        ids = torch.tensor(e2e.prompts(b, args.prompt_len, args.vocab, b), device="cuda")
        t = time.perf_counter()
        timed_generate(model, ids, 8)   # compiles the decode step for this batch size
        row[f"compile_s_b{b}"] = time.perf_counter() - t
        runs = [timed_generate(model, ids, args.new_tokens) for _ in range(2)]
        row[f"decode_b{b}"] = {"tok_s": max(r["tok_s"] for r in runs),
                               "prefill_ms": statistics.median(r["prefill_ms"] for r in runs)}
        print(json.dumps(row), flush=True)
    return row


def compiled_decode(model, ids: torch.Tensor, new_tokens: int, step) -> dict:
    """gpt-fast style: prefill eagerly into a static cache, then greedy decode steps through
    `step` (the model's one-token forward under torch.compile) with no generate() around it;
    decode tok/s over the steps after the first two, timed with a synchronize at both ends."""
    from transformers import StaticCache
    b, n = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=n + new_tokens + 8)
    device = ids.device
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, cache_position=torch.arange(n, device=device),
                       use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t0
        stamps = []
        for i in range(new_tokens - 1):
            pos = torch.tensor([n + i], device=device)
            tok = step(tok, pos, cache).clone()
            if i in (1, new_tokens - 2):
                torch.cuda.synchronize()
                stamps.append(time.perf_counter())
    steps = new_tokens - 4
    return {"prefill_ms": 1e3 * prefill, "tok_s": b * steps / (stamps[1] - stamps[0]),
            "ms_per_step": 1e3 * (stamps[1] - stamps[0]) / steps}


def run_compiled(name: str, model, args) -> dict:
    """The peer as the issue names it: torch.compile(mode="max-autotune") of the decode step (CUDA
    graphs included), called in a plain loop (compiled_decode)."""
    row: dict = {"peer": name, "compile_mode": "max-autotune"}

    def one_token(tok, pos, cache):
        out = model(tok, past_key_values=cache, cache_position=pos, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    step = torch.compile(one_token, mode="max-autotune", fullgraph=True)
    for b in args.batches:
        ids = torch.tensor(e2e.prompts(b, args.prompt_len, args.vocab, b), device="cuda")
        t = time.perf_counter()
        compiled_decode(model, ids, 8, step)   # compiles (and autotunes) for this batch size
        row[f"compile_s_b{b}"] = time.perf_counter() - t
        runs = [compiled_decode(model, ids, args.new_tokens, step) for _ in range(2)]
        row[f"decode_b{b}"] = {"tok_s": max(r["tok_s"] for r in runs),
                               "prefill_ms": statistics.median(r["prefill_ms"] for r in runs)}
        print(json.dumps(row), flush=True)
    return row


def torchao_int4(model):
    from torchao.quantization import Int4WeightOnlyConfig, quantize_
    quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--peers", nargs="*", default=["hf-bf16", "torchao-int4"],
                    choices=PEERS)
    ap.add_argument("--out", default="peers.json")
    args = ap.parse_args(argv)
    import transformers
    result = {"settings": vars(args), "transformers": transformers.__version__, "rows": []}
    try:
        import torchao
        result["torchao"] = torchao.__version__
    except Exception as err:  # recorded: the torchao row then says why it did not run
        result["torchao"] = f"not importable: {e2e.lib.short_error(err)}"
    for peer in args.peers:
        model = e2e.build_model("llama3-8b", args.layers, args.vocab,
                                args.prompt_len + args.new_tokens + 64, torch.bfloat16, device="cuda")
        try:
            if peer.startswith("torchao-int4"):
                model = torchao_int4(model)
            run = run_compiled if peer.endswith("-compiled") else run_peer
            row = run(peer, model, args)
        except Exception as err:  # a peer that cannot run records why; the others still run
            row = {"peer": peer, "status": f"error: {e2e.lib.short_error(err)}"}
            print(row, flush=True)
        result["rows"].append(row)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"\n{args.layers} layers, vocab {args.vocab}, {args.prompt_len}-token prompts")
    print("| peer | " + " | ".join(f"b{b} tok/s | b{b} prefill ms" for b in args.batches) + " |")
    for r in result["rows"]:
        cells = []
        for b in args.batches:
            d = r.get(f"decode_b{b}", {})
            cells += [f"{d.get('tok_s', 0) or 0:.1f}", f"{d.get('prefill_ms', 0) or 0:.1f}"]
        print(f"| {r['peer']} | " + " | ".join(cells) + f" | {r.get('status', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
