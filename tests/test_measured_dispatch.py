"""Weight-only path choice by measured cost (backends/cuda/measured_dispatch.py): which paths are
candidates at each M, how installed measurements route an M (the next measured bucket up, tiles
re-planned for the actual M), and the engine's M buckets. The timing itself needs a GPU (CUDA
graphs); the kernels it times are checked in Triton's interpreter (test_cuda_kernels.py)."""
import importlib.util
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sagequant.backends.cuda import layout, measured_dispatch as md
from sagequant.ir.quant_spec import QuantSpec
from sagequant.runtime.measure_linears import m_buckets

ROOT = Path(__file__).resolve().parents[1]
INT4 = QuantSpec("int4", "per_group", 128, True, "fp16")


@pytest.fixture(autouse=True)
def _empty_table():
    md.clear()
    yield
    md.clear()


def test_candidates_cover_the_thresholds_and_dequantize():
    n, k = 28672, 4096
    at1 = md.candidates(1, n, k, "int4", 128)  # M=1: the GEMV and its word-kernel variants
    assert at1[0] == layout.choose(1, n, k, bits=4, group=128, fmt="int4") and at1[0].split_k > 1
    h2 = layout.plan_for("gemv4h", 1, n, k, bits=4, group=128, fmt="int4")  # packed fp16
    assert at1[1:] == [replace(at1[0], prefetch=True), replace(at1[0], launch_reduce=True),
                       replace(at1[0], num_warps=at1[0].num_warps // 2),
                       h2, replace(h2, prefetch=True), replace(h2, pair_runs=True),
                       replace(h2, launch_reduce=True), replace(h2, prefetch=True, pair_runs=True)]
    nf4 = layout.choose(1, 4096, 128, bits=4, group=128, fmt="nf4")   # no split
    assert md.candidates(1, 4096, 128, "nf4", 128)[1:] == [replace(nf4, prefetch=True)]
    at32 = md.candidates(32, n, k, "int4", 128)
    assert at32[0] == layout.choose(32, n, k, bits=4, group=128, fmt="int4")  # thresholds first
    assert {p.path for p in at32} == {"mma4", "dequant4_mm", "tiled", "splitk"}  # int32 words
    mma = [p for p in at32 if p.path == "mma4"]   # BLOCK_M 32: no in-place planes
    assert mma == [mma[0], replace(mma[0], launch_reduce=True)]
    at8 = [p for p in md.candidates(8, n, k, "int4", 128) if p.path == "mma4"]
    assert at8 == [at8[0], replace(at8[0], in_place=True), replace(at8[0], launch_reduce=True)]
    assert not any(p.in_place for p in md.candidates(8, n, k, "nf4", 128))  # code book planes
    assert any(p.swap_ab and p.block_m == 32 for p in at32 if p.path == "splitk")
    chunks = {(p.chunk_n, p.overlap) for p in at32 if p.path == "dequant4_mm"}
    assert chunks == {(0, False), (layout.dequant_chunk_rows(n, k, layout.DEQUANT_CHUNK_BYTES), False),
                      (2048, True)}  # 16 MB of bf16 rows of K = 4096
    assert {p.path for p in md.candidates(2048, 4096, 4100, "int4", 128)} >= {"dequant_mm"}
    big = md.candidates(2048, n, k, "int4", 128)
    assert "mma4" not in {p.path for p in big} and len(big) == len(set(big))
    assert {p.path for p in md.candidates(512, 4096, 4096, "nf4", 128)} == {"dequant4_mm"}
    assert {p.path for p in md.candidates(8, 4096, 4096, "int8", layout.BIG_GROUP)} == {
        "splitk", "dequant_mm"}
    assert "splitk" not in {p.path for p in md.candidates(128, 4096, 4096, "int8", 128)}


def test_installed_rows_route_each_m_to_the_next_bucket_up():
    n, k = 6144, 4096
    key = md.key(torch.device("cuda", 0), INT4, [n, k], False, torch.bfloat16)
    args = dict(bits=4, group=128, sm_count=132, fmt="int4")
    assert md.plan_for(key, 8, n, k, **args) is None   # nothing measured: thresholds decide
    md.install(key, [{"m": 32, "path": "mma4", "chunk_n": 0},
                     {"m": 1, "path": "gemv4", "chunk_n": 0,
                      "word_fields": {"prefetch": True, "num_warps": 2}},
                     {"m": 512, "path": "dequant_mm", "chunk_n": 0},
                     {"m": 2048, "path": "dequant4_mm", "chunk_n": 1024, "overlap": True}])
    assert md.plan_for(key, 1, n, k, **args) == replace(  # the variant is kept
        layout.plan_for("gemv4", 1, n, k, **args), prefetch=True, num_warps=2)
    got = md.plan_for(key, 20, n, k, **args)   # bucket 32, tiles planned for M = 20
    assert got == layout.plan_for("mma4", 20, n, k, **args)
    assert md.plan_for(key, 33, n, k, **args) == replace(
        layout.plan_for("dequant_mm", 33, n, k, **args), chunk_n=0)
    assert md.plan_for(key, 1500, n, k, **args) == replace(   # the overlap is kept
        layout.plan_for("dequant4_mm", 1500, n, k, **args), chunk_n=1024, overlap=True)
    assert md.plan_for(key, 5000, n, k, **args).path == "dequant4_mm"  # past the last bucket
    assert md.measured(key, [1, 32]) is not None and md.measured(key, [1, 64]) is None
    md.install(key, [{"m": 64, "path": "splitk", "chunk_n": 0, "swap_ab": True, "block_m": 64}])
    swapped = md.plan_for(key, 40, n, k, **args)   # the swap-AB variant measured, not the plain
    assert swapped == replace(layout.plan_for("splitk", 40, n, k, **args), swap_ab=True, block_m=64)
    md.install(key, [{"m": 1, "path": "gemv4h", "chunk_n": 0,  # the packed-fp16 GEMV's flags
                      "word_fields": {"prefetch": True, "pair_runs": True, "num_warps": 4}}])
    assert md.plan_for(key, 1, n, k, **args) == replace(
        layout.plan_for("gemv4h", 1, n, k, **args), prefetch=True, pair_runs=True)
    other = md.key(torch.device("cuda", 0), INT4, [n, k], True, torch.bfloat16)
    assert md.plan_for(other, 8, n, k, **args) is None  # zero points: another key


def test_engine_buckets():
    assert m_buckets([1, 2, 4, 8], 300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert m_buckets([1, 2, 4, 8, 16, 32], 2048)[-3:] == [512, 1024, 2048]
    assert m_buckets([1], 1) == [1]


_INTERPRETED = r'''
from sagequant.backends.cuda.interpret import enable_triton_interpreter
enable_triton_interpreter()
import torch
from sagequant.backends.cuda import layout, measure_paths, measured_dispatch as md
from sagequant.backends.cuda.triton_weight_only import weight_only_linear
from sagequant.ir.quant_spec import QuantSpec, dequantize, quantize
order = []
def timer(fn, reps=5):  # the last candidate looks fastest
    fn()
    order.append(1)
    return 1.0 / len(order)
measure_paths._graph_us = timer
spec = QuantSpec("int4", "per_group", 128, True, "fp16")
n, k = 64, 256
qt = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), spec)
rows = measure_paths.measure(qt.data, qt.scale, None, spec, [n, k], torch.float16, [4])
(row,) = rows
last = list(row["us"])[-1]
assert row["chosen"] == last, row
assert {p.split("(")[0] for p in row["errors"]} <= {"gemv4h"}, row  # inline PTX: no interpreter
key = md.key(torch.device("cpu"), spec, [n, k], False, torch.float16)
md.install(key, rows)
planned = md.plan_for(key, 3, n, k, bits=4, group=128, sm_count=132, fmt="int4")
assert planned.path == row["path"] != layout.choose(3, n, k, bits=4, group=128, fmt="int4").path
x = torch.randn(3, k, generator=torch.Generator().manual_seed(1)).half()
out = weight_only_linear(x, qt.data, qt.scale, None, None, spec, [n, k])
ref = x.double() @ dequantize(qt, torch.float64).t()
err = float((out.double() - ref).norm() / ref.norm())
assert err < 3e-3, err
print("chosen", row["chosen"], "err", err)
'''


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (interpreter)")
def test_measure_runs_every_candidate_and_dispatch_uses_the_fastest():
    """In Triton's interpreter, with a stand-in timer: every candidate path runs the weight, the
    fastest by the timer is chosen, and weight_only_linear then runs it (numerics vs float64)."""
    run = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "chosen" in run.stdout


def test_measure_linears_dedupes_skips_and_records_failures(monkeypatch):
    """One measurement per weight key (layers counted), linears whose scales are computed in
    the graph skipped, a failed measurement recorded (and warned) with the thresholds kept."""
    import torch.fx as fx

    from sagequant.ir.graph import QuantGraph
    from sagequant.runtime import measure_linears as ml
    from sagequant.runtime.measure_linears import WEIGHT_ONLY, measure_linears
    root = torch.nn.Module()
    for name, rows in (("a", 64), ("b", 64), ("c", 32), ("d", 48)):
        root.register_buffer(f"{name}_w", torch.zeros(rows, 128, dtype=torch.uint8))
        root.register_buffer(f"{name}_s", torch.ones(rows, 2, dtype=torch.float16))
    g = fx.Graph()
    x = g.placeholder("x")
    spec, outs = INT4.encode(), []
    for name, rows in (("a", 64), ("b", 64), ("c", 32)):
        w, s = g.get_attr(f"{name}_w"), g.get_attr(f"{name}_s")
        outs.append(g.call_function(WEIGHT_ONLY, (x, w, s, None, None, spec, [rows, 256])))
    computed = g.call_function(torch.ops.aten.mul.Tensor, (g.get_attr("d_s"), 2.0))
    outs.append(g.call_function(WEIGHT_ONLY, (x, g.get_attr("d_w"), computed, None, None, spec,
                                              [48, 256])))
    g.output(tuple(outs))
    graph = QuantGraph(fx.GraphModule(root, g), {})
    calls = []

    def fake_measure(qweight, scales, zeros, spec, shape, dtype, ms):
        calls.append(shape)
        if shape[0] == 32:
            raise RuntimeError("no kernel compiled")
        return [{"m": m, "path": "dequant_mm", "chunk_n": 0} for m in ms]

    monkeypatch.setattr(ml, "measure_weight", fake_measure)
    with pytest.warns(UserWarning, match="c_w .* failed; it runs the M thresholds"):
        got = measure_linears(graph, [1, 64], torch.float16)
    assert calls == [[64, 256], [32, 256]]
    assert [(r["weight"], r["layers"]) for r in got] == [("a_w", 2), ("c_w", 1), ("d_w", 1)]
    assert "no kernel compiled" in got[1]["error"] and "rows" not in got[1]
    assert got[2]["skipped"] == "weight operands are computed in the graph"
    key = md.key(torch.device("cpu"), INT4, [64, 256], False, torch.float16)
    assert md.measured(key, [1, 64]) is not None
    with pytest.warns(UserWarning, match="c_w"):   # measured again (it failed), a_w reused
        again = measure_linears(graph, [1, 64], torch.float16)
    assert again[0]["rows"] and calls[2:] == [[32, 256]]
