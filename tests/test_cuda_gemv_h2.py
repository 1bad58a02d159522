"""The packed-fp16 GEMV (gemv4h, triton_gemv_h2) on CPU: its inline PTX does not run under
Triton's interpreter, so h2_reference models the same bit trick and roundings in torch and is
held to the float64 reference here; the kernel itself is checked on the GPU by selfcheck's word
cases and benchmarks/gemv4_sweep.py --h2."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sagequant.backends.cuda import h2_reference as h2
from sagequant.backends.cuda import layout, measured_dispatch
from sagequant.ir.formats import pack_nibbles
from sagequant.ir.quant_spec import QuantSpec

INT4 = QuantSpec("int4", "per_group", 128, True, "fp16")


def _words(fmt: str, n: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if fmt == "int4" else (0, 16)
    codes = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int16)
    return codes, pack_nibbles(codes).view(torch.int32), gen


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_pairs_decode_every_nibble_exactly(fmt):
    """Pair i of word j holds elements 8j + e and 8j + e + 4 (e = i) as (u - zero) / 16 in
    fp16, exactly: all 16 codes, every position, zero points 0..15 for uint4."""
    codes, words, gen = _words(fmt, 16, 64, 1)
    zeros = torch.randint(0, 16, (16, 1), generator=gen).float() if fmt == "uint4" else None
    pairs = h2.pair_weights(words, fmt, zeros)
    got = torch.zeros(16, 64, dtype=torch.float64)
    for e, (low, high) in enumerate(pairs):
        got[:, e::8] = low.double() * 16
        got[:, e + 4::8] = high.double() * 16
    want = codes.double() - (zeros.double() if zeros is not None else 0.0)
    assert torch.equal(got, want)


def test_wrong_xor_constant_is_caught():
    """The int4 sign flip lives in the XOR constants: uint4's constants on int4 codes decode
    every negative code wrongly (the test above would fail)."""
    codes, words, _ = _words("int4", 4, 32, 2)
    pairs = h2.pair_weights(words, "uint4", torch.full((4, 1), 8.0))
    assert not torch.equal(pairs[0][0].double() * 16, codes[:, 0::8].double())


@pytest.mark.parametrize("pair_runs", [False, True])
@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_fp16_sums_stay_within_the_kernel_tolerance(fmt, pair_runs):
    """x to fp16 and 4-product (pair_runs: 8-product) fp16 sums: ~1e-3 relative error against
    float64, under the selfcheck / sweep tolerance 3e-3 (and far from exact: the fp16 rounding
    is there)."""
    n, k, group = 32, 512, 128
    codes, words, gen = _words(fmt, n, k, 3)
    scales = torch.rand(n, k // group, generator=gen) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (n, k // group), generator=gen).float() \
        if fmt == "uint4" else None
    x = torch.randn(k, generator=gen).to(torch.bfloat16)
    z = zeros.repeat_interleave(group, 1).double() if zeros is not None else 0.0
    w64 = (codes.double() - z) * scales.double().repeat_interleave(group, 1)
    ref = w64 @ x.double()
    got = h2.gemv_h2(x.float(), words, scales, fmt, group, zeros, pair_runs).double()
    rel = float((got - ref).norm() / ref.norm())
    assert 1e-5 < rel < 3e-3


@pytest.mark.parametrize("pair_runs", [False, True])
def test_fp16_range_holds_large_activations(pair_runs):
    """A 4-product partial is at most 2 |x| (8 products: 4 |x|): |x| = 16000 stays finite (fp16
    max 65504)."""
    codes, words, _ = _words("int4", 8, 64, 4)
    x = torch.full((64,), 16000.0)
    out = h2.gemv_h2(x, words, torch.ones(8, 1), "int4", 64, pair_runs=pair_runs)
    ref = codes.double().sum(1) * 16000.0
    assert torch.isfinite(out).all()
    assert float((out.double() - ref).norm() / ref.norm().clamp_min(1)) < 3e-3


def test_gemv4h_is_a_measured_candidate_only():
    """Never a threshold's choice; measured dispatch times it for int4/uint4 up to H2_MAX_M (not
    NF4, whose code book it has no form for)."""
    for m in (1, 2, 8, 64):
        assert layout.choose(m, 4096, 4096, bits=4, group=128, fmt="int4").path != "gemv4h"
    for fmt in ("int4", "uint4", "nf4"):
        for m in (1, layout.H2_MAX_M, layout.H2_MAX_M + 1):
            paths = {p.path for p in measured_dispatch.candidates(m, 4096, 4096, fmt, 128)}
            assert ("gemv4h" in paths) == (fmt != "nf4" and m <= layout.H2_MAX_M)
    plan = layout.plan_for("gemv4h", 1, 28672, 4096, bits=4, group=128, fmt="int4")
    assert (plan.block_n, plan.num_warps, plan.block_k, plan.split_k) == (64, 2, 128, 2)
    assert layout.plan_for("gemv4h", 1, 4096, 14336, bits=4, group=128, fmt="int4").split_k == 16
    flags = [tuple(f for f in layout.WORD_FLAGS if getattr(p, f))
             for p in measured_dispatch.word_variants(plan, "int4")]
    assert flags == [("prefetch",), ("pair_runs",), ("launch_reduce",), ("prefetch", "pair_runs")]


def test_rows_variant_is_a_candidate_from_m2_and_keeps_its_rows_when_installed():
    """From M = 2 measured dispatch also times gemv4h with layout.h2_rows(M) rows of x a program
    (one decode of each weight tile for all rows), with and without two-word runs; once chosen,
    the installed row rebuilds that plan at every M of its bucket (rows past M are masked)."""
    assert [layout.h2_rows(m) for m in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    n, k = 6144, 4096
    for m in (1, 3, 8):
        rows = [p for p in measured_dispatch.candidates(m, n, k, "int4", 128)
                if p.path == "gemv4h" and p.block_m > 1]
        assert [(p.block_m, p.pair_runs) for p in rows] == (
            [] if m == 1 else [(layout.h2_rows(m), False), (layout.h2_rows(m), True)])
    plan = layout.plan_for("gemv4h", 8, n, k, bits=4, group=128, fmt="int4", rows=8)
    assert (plan.block_m, plan.block_n, plan.block_k, plan.num_warps) == (8, 64, 128, 4)
    assert plan.split_k == layout.split_k_for(n // 64, k // 128, 132, layout.MEMORY_BOUND_WAVES)
    key = measured_dispatch.key(torch.device("cuda", 0), INT4, [n, k], False, torch.bfloat16)
    measured_dispatch.install(key, [{"m": 8, "path": "gemv4h", "chunk_n": 0, "block_m": 8,
                                     "word_fields": {"pair_runs": True, "num_warps": 4}}])
    try:
        args = dict(bits=4, group=128, sm_count=132, fmt="int4")
        for m in (5, 8):
            assert measured_dispatch.plan_for(key, m, n, k, **args) == replace(
                layout.plan_for("gemv4h", m, n, k, **args, rows=8), pair_runs=True)
    finally:
        measured_dispatch.clear()


def test_pair_runs_round_differently():
    """pair_runs changes the summation (chains of 8, not 4): not bit-equal to the 4-product
    model, so the tolerance test above really covers a second rounding."""
    codes, words, gen = _words("int4", 16, 256, 5)
    x = torch.randn(256, generator=gen)
    one = h2.gemv_h2(x, words, torch.ones(16, 2), "int4", 128)
    two = h2.gemv_h2(x, words, torch.ones(16, 2), "int4", 128, pair_runs=True)
    assert not torch.equal(one, two)


def test_gemv4_sweep_goes_on_past_a_fatal_variant(monkeypatch):
    """gemv4_sweep --isolate's child: a variant that leaves the CUDA context unusable is recorded
    ("fatal") and ends the process; the next process skips the rows recorded and finishes the
    shape, its best taken over both processes' rows (kernels and CUDA stood in for by torch)."""
    import argparse
    import importlib
    import io
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sweep = importlib.import_module("gemv4_sweep")
    monkeypatch.setattr(sweep.lib, "DEVICE", "cpu")
    monkeypatch.setattr(sweep, "H2", True)
    n, k = sweep.SMOKE_SHAPES["o"]
    bad = sweep.variants(1, n, k, 4, True)[1][0]

    def run(x, wt, data, scales, out, plan, main):
        if plan.describe() == bad:
            raise RuntimeError("an illegal memory access was encountered")
        out.copy_((x.double() @ wt.w64.t()).to(out.dtype))
    monkeypatch.setattr(sweep, "run_variant", run)
    monkeypatch.setattr(sweep, "cuda_alive", lambda: False)
    args = argparse.Namespace(smoke=True, shape="o")
    first = io.StringIO()
    with pytest.raises(sweep.Fatal):
        sweep.sweep(args, sweep.lib.Budget(600), [], first)
    rows = [json.loads(line) for line in first.getvalue().splitlines()]
    assert [r["variant"] for r in rows][-1] == bad and rows[-1]["fatal"] and len(rows) == 2
    monkeypatch.setattr(sweep, "cuda_alive", lambda: True)
    res = sweep.sweep(args, sweep.lib.Budget(600), rows, io.StringIO())
    again = {r["variant"] for r in res["rows"] if r["m"] == 1}
    assert again and not again & {r["variant"] for r in rows}
    assert [(b["m"], b["best"] != bad) for b in res["best"]] == [(1, True), (2, True)]
