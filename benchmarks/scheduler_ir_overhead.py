"""What Scheduler IR costs a scheduler (issue 5 item 4; the seed's bound: <= 5% of a step):

    nice -n 5 python benchmarks/scheduler_ir_overhead.py [--batch 8] [--steps 10]

Compiles the real SmolLM2-135M as W4A16 (RTN, group 128, CPU reference kernels), starts
`batch` requests in a GenerationEngine and, once every request is decoding, times on this CPU:
  step     GenerationEngine.step(): one decode forward for the whole batch (the scheduling step)
  read     what a cost-aware scheduler does once per step: read every lowered node's Scheduler IR
           (dtype, kernel, weight bytes, bytes and FLOPs per token) from the graph annotations
           and price the step's tokens (weight bytes + bytes/FLOPs x tokens)
  compute  the schedule pass that fills those fields, re-run as if every step recomputed them
           (it runs once per compile, so this is an upper bound)
Prints medians and their ratio to the step; writes --json when given.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from sagequant.api import compile as sq_compile
from sagequant.calibration.datasets import tokenize_calibration
from sagequant.calibration.real_data import load_smollm2, wikipedia_prose
from sagequant.config import QuantConfig
from sagequant.passes.manager import PassContext
from sagequant.passes.schedule import schedule
from sagequant.runtime.engine import GenerationEngine


def read_and_price(graph, tokens: int) -> tuple[int, int]:
    """Bytes and FLOPs of one step of `tokens` rows, from the Scheduler IR on the graph."""
    moved = flops = 0
    for node in graph.annotated():
        ir = graph.annotation(node).scheduler
        if ir is not None and ir.dtype and ir.kernel:
            moved += ir.weight_bytes + ir.bytes_per_token * tokens
            flops += ir.flops_per_token * tokens
    return moved, flops


def median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_smollm2()
    calib = tokenize_calibration(wikipedia_prose(), tok, 4, 128)
    cfg = QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=128,
                      symmetric=True, calibration_samples=4, calibration_seq_len=128)
    t0 = time.perf_counter()
    cm = sq_compile(model, cfg, calibration_data=calib)
    print(f"compiled in {time.perf_counter() - t0:.0f}s", flush=True)
    graph = cm.graph
    nodes = sum(1 for n in graph.annotated() if graph.annotation(n).scheduler is not None)
    engine = GenerationEngine(cm, max_batch=args.batch)
    for i in range(args.batch):
        engine.add_request(calib[i % len(calib), :32].tolist(), max_new_tokens=args.steps + 8)
    engine.step()  # admits (prefills) every request; the timed steps are pure decode
    print("prefilled; timing decode steps", flush=True)
    step = median_s(engine.step, args.steps)
    read = median_s(lambda: read_and_price(graph, args.batch), 200)
    ctx = PassContext(config=cfg)
    compute = median_s(lambda: schedule(graph, ctx), 50)
    res = {"model": "SmolLM2-135M W4A16 RTN g128 (CPU reference kernels)", "batch": args.batch,
           "lowered_nodes": nodes, "step_ms": step * 1e3, "read_ms": read * 1e3,
           "compute_ms": compute * 1e3, "read_pct_of_step": 100 * read / step,
           "compute_pct_of_step": 100 * compute / step, "torch_threads": torch.get_num_threads()}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
