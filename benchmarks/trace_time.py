"""Trace time of a layer-wise compile vs depth: the full torch.export trace against the two-block
trace grown to full depth (ir/replicate.py), on a meta-device Llama (weights never allocated).

  python benchmarks/trace_time.py --layers 32 80 --full 32 80 --out benchmarks/results/trace_time_cpu.json

The width hardly matters (export's cost is per op, not per FLOP); the default is scale_compile's
smoke width with the Llama-3 vocabulary. Where both traces run, their call_function sequences
and get_attr targets must be equal (checked, recorded).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scale_compile import llama_config  # noqa: E402

from sagequant.calibration.onload import _parameters_on_meta  # noqa: E402
from sagequant.ir.replicate import trace_reusing_blocks  # noqa: E402
from sagequant.ir.trace import trace_model  # noqa: E402

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=128256)


def meta_llama(layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(llama_config(SHAPE, layers)).eval()


def timed(fn, model, repeat: int):
    """Fastest of `repeat` runs (the machine is shared) and the last graph."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        graph = fn(model)
        best = min(best, time.perf_counter() - start)
    return best, graph


def signature(graph) -> tuple[list, list]:
    nodes = graph.graph.nodes
    return ([str(n.target) for n in nodes if n.op == "call_function"],
            [n.target for n in nodes if n.op == "get_attr"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[32, 80])
    ap.add_argument("--full", type=int, nargs="*", default=[32], help="depths that also get the full trace")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    records = []
    for layers in args.layers:
        model = meta_llama(layers)
        rec = {"layers": layers, "repeat": args.repeat}
        rec["replicated_s"], graph = timed(trace_reusing_blocks, model, args.repeat)
        rec["trace"] = graph.model_info["trace"]
        if layers in args.full:
            rec["full_s"], full = timed(trace_model, model, args.repeat)
            rec["same_ops_and_attrs"] = signature(graph) == signature(full)
        records.append(rec)
        print(json.dumps(rec), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
                                        "threads": torch.get_num_threads(), "shape": SHAPE,
                                        "runs": records}, indent=1))


if __name__ == "__main__":
    main()
