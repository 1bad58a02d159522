"""Host time of the engine's eager prefill and of a static decode step, on CPU (issue 18).

A deep Llama of tiny widths (default 32 layers, hidden 64) makes every kernel nearly free, so the
wall time is what the host spends per layer: the Python, dispatcher and attribute work that an
H100 waits on when a prefill is host-bound (BENCHMARKS §13d). The decode row times the padded
static step run eagerly (cuda_graphs=True on CPU). Medians of interleaved repetitions.

    PYTHONPATH=. python benchmarks/engine_host_cpu.py --layers 32 --prompt 8 --out host.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_engine(layers: int, hidden: int):
    import transformers as tf

    import sagequant as sq
    from sagequant.runtime import GenerationEngine
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096)
    cm = sq.compile(tf.LlamaForCausalLM(cfg).eval(), sq.QuantConfig(ignore=["*"], guard="off"))
    return GenerationEngine(cm, max_batch=2, max_seq_len=2048, cuda_graphs=True)


def prefill_ms(engine, prompt: int) -> float:
    engine.add_request([i % 250 + 1 for i in range(prompt)], 1)
    t0 = time.perf_counter()
    engine.step()
    return (time.perf_counter() - t0) * 1e3


def decode_ms(engine, steps: int) -> float:
    """Median of `steps` steady decode steps of one request (its prefill not counted)."""
    engine.add_request([1, 2, 3], steps + 3)
    engine.step()
    engine.step()
    times = []
    while engine.has_work():
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[:-1])


def compare_nested(flat, args) -> int:
    import sagequant.runtime.step_graph as sg
    keep = sg._flatten_attrs
    sg._flatten_attrs = lambda graph: None
    try:
        nested = build_engine(args.layers, args.hidden)
    finally:
        sg._flatten_attrs = keep
    times = {"root_attributes": [], "module_tree": []}
    for name, e in (("root_attributes", flat), ("module_tree", nested)):
        for _ in range(3):
            prefill_ms(e, args.prompt)
    for _ in range(args.reps):
        for name, e in (("root_attributes", flat), ("module_tree", nested)):
            times[name].append(prefill_ms(e, args.prompt))
    row = {k: {"median_ms": statistics.median(v), "min_ms": min(v)} for k, v in times.items()}
    row.update(layers=args.layers, prompt=args.prompt, reps=args.reps)
    print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--compare-nested", action="store_true",
                    help="also an engine whose step graph keeps its weights in the module tree "
                         "(step_graph._flatten_attrs off), prefills interleaved with the default's")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    engine = build_engine(args.layers, args.hidden)
    if args.compare_nested:
        return compare_nested(engine, args)
    for _ in range(3):
        prefill_ms(engine, args.prompt)
    pre = [prefill_ms(engine, args.prompt) for _ in range(args.reps)]
    dec = [decode_ms(engine, 10) for _ in range(max(3, args.reps // 10))]
    row = {"layers": args.layers, "hidden": args.hidden, "prompt": args.prompt,
           "prefill_ms": statistics.median(pre), "prefill_ms_min": min(pre),
           "prefill_us_per_layer": 1e3 * statistics.median(pre) / args.layers,
           "decode_step_ms": statistics.median(dec), "torch": torch.__version__}
    print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
