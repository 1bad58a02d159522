"""Weight-only path choice by measured cost on the device that runs it.

layout.choose picks a path from M thresholds fixed on one shape; at other shapes and depths it
can pick a kernel slower than dequantize + cuBLAS, i.e. slower than a bf16 GEMM plus one
bandwidth-bound dequantize (the issue-18 b32 and prefill rows). measure_paths.measure times every
path `candidates` lists for a weight at each M bucket (CUDA-graph replays, so launch overhead is
not counted) and `install` keeps the fastest; weight_only_linear then reads `plan_for` before the
thresholds. This module holds only the table, so the kernels can read it without importing what
times them.
Rows not measured (another shape, dtype or device) keep the thresholds, and every measurement
is returned (µs per path per M) so the engine's report shows what was chosen and why.

Entries are keyed by device index, weight spec, [N, K], zero points and activation dtype: a
choice measured for one weight holds for every weight of that key on that device.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ...ir.quant_spec import QuantSpec
from . import layout

_TABLE: dict[tuple, list[tuple]] = {}  # key -> sorted (m, path, chunk_n, overlap, swap_ab, block_m,
#                                         word kernel fields)
_ROWS: dict[tuple, list[dict]] = {}                   # key -> the measurements behind it


def key(device: torch.device, spec: QuantSpec, shape, asym: bool, dtype: torch.dtype) -> tuple:
    return (device.index, spec, int(shape[0]), int(shape[1]), asym, dtype)


def candidates(m: int, n: int, k: int, fmt: str, group: int, sm_count: int = 132
               ) -> list[layout.Plan]:
    """The paths that can run an [n, k] weight at M rows: the thresholds' own choice, the
    dequantize + cuBLAS path (the int32-word dequantizer for 4-bit weights it takes) whole,
    chunked, and chunked in L2-sized pieces with the side-stream overlap, the tensor-core
    kernels, each int32-word kernel's variants (word_variants), and up to layout.H2_MAX_M the
    packed-fp16 GEMV (gemv4h, ~1e-3 relative error: measure_paths' check holds it to 2e-2), one
    row of x a program and, from M = 2, layout.h2_rows(M) rows."""
    bits = 8 if fmt not in layout.WORD_FORMATS else 4
    plan = lambda path: layout.plan_for(path, m, n, k, bits=bits, group=group,  # noqa: E731
                                        sm_count=sm_count, fmt=fmt)
    out = [layout.choose(m, n, k, bits=bits, group=group, sm_count=sm_count, fmt=fmt)]
    out += word_variants(out[0], fmt)
    if (m <= layout.H2_MAX_M and fmt in layout.H2_FORMATS
            and layout.word_rejects(fmt, k, group, 16) is None):  # the packed-fp16 GEMV
        out += [plan("gemv4h"), *word_variants(plan("gemv4h"), fmt)]
        if m > 1:  # each weight tile decoded once for all rows of x, one- and two-word fp16 runs
            rows = layout.plan_for("gemv4h", m, n, k, bits=bits, group=group, sm_count=sm_count,
                                   fmt=fmt, rows=layout.h2_rows(m))
            out += [rows, replace(rows, pair_runs=True)]
    if m >= 2:
        words = fmt in layout.WORD_FORMATS and layout.word_rejects(fmt, k, group, 16) is None
        dq = "dequant4_mm" if words else "dequant_mm"
        out += [replace(plan(dq), chunk_n=0), plan(dq)]
        for chunk_bytes in layout.DEQUANT_OVERLAP_CHUNK_BYTES:  # side-stream dequantize
            rows = layout.dequant_chunk_rows(n, k, chunk_bytes)
            if rows:
                out.append(replace(plan(dq), chunk_n=rows, overlap=True))
        if layout.word_rejects(fmt, k, group, layout.WORD_MMA_MIN_BLOCK_K) is None and m <= 128:
            out += [plan("mma4"), *word_variants(plan("mma4"), fmt)]
        if fmt != "nf4" and m <= 64:  # the byte kernel: one dot per K block, weight tile as A
            out += [plan("splitk"), replace(plan("splitk"), block_m=max(16, 1 << (m - 1).bit_length()),
                                            swap_ab=True)]
        if fmt != "nf4" and m > layout.SPLITK_MAX_M:
            out.append(plan("tiled"))
    unique = []
    for p in out:
        if p not in unique:
            unique.append(p)
    return unique


def word_variants(plan: layout.Plan, fmt: str) -> list[layout.Plan]:
    """The int32-word kernel's alternatives to `plan`: one flag of layout.WORD_FLAGS each (the
    split-K sum as a second kernel, the GEMVs' prefetch, gemv4h's two-word fp16 runs (and both
    together), the MMA's in-place planes at M <= 16; NF4's code book planes have no in-place
    form) and the GEMV on half the warps: twice the rows
    per thread share each x load (sm_90a, BN=64: 672 SASS instructions a K step for 128 weights a
    thread against 423 for 64; 96 registers against 72)."""
    if plan.path == "gemv4":
        flags = ["prefetch"]
    elif plan.path == "gemv4h":  # and its fp16 runs of two words
        flags = ["prefetch", "pair_runs"]
    elif plan.path == "mma4":
        flags = ["in_place"] if plan.block_m <= 16 and fmt != "nf4" else []
    else:
        return []
    flags += ["launch_reduce"] if plan.split_k > 1 else []
    out = [replace(plan, **{f: True}) for f in flags]
    if plan.path == "gemv4" and plan.num_warps > 1 and fmt != "nf4":  # NF4 at w=2 spills
        out.append(replace(plan, num_warps=plan.num_warps // 2))
    if plan.path == "gemv4h":  # the two that cut instructions and latency, together
        out.append(replace(plan, prefetch=True, pair_runs=True))
    return out


def install(k: tuple, rows: list[dict]) -> None:
    _TABLE[k] = sorted((r["m"], r["path"], r["chunk_n"], r.get("overlap", False),
                        r.get("swap_ab", False), r.get("block_m", 0),
                        tuple(sorted(r.get("word_fields", {}).items()))) for r in rows)
    _ROWS[k] = rows


def measured(k: tuple, ms) -> list[dict] | None:
    """The installed measurements of `k` when they cover every M in `ms` (else None)."""
    rows = _ROWS.get(k)
    return rows if rows is not None and set(ms) <= {r["m"] for r in rows} else None


def plan_for(k: tuple, m: int, n: int, kk: int, *, bits: int, group: int, sm_count: int,
             fmt: str) -> layout.Plan | None:
    """The measured path for M rows (the smallest measured M >= m, else the largest), with
    tiles for this M (the measured variant's swap-AB and its tile rows kept, and gemv4h's rows of
    x a program); None where this key was not measured."""
    rows = _TABLE.get(k) if _TABLE else None
    if not rows:
        return None
    _, path, chunk, overlap, swap, block_m, fields = next((r for r in rows if r[0] >= m), rows[-1])
    rows = block_m if path == "gemv4h" and block_m > 1 else 1
    plan = layout.plan_for(path, m, n, kk, bits=bits, group=group, sm_count=sm_count, fmt=fmt,
                           rows=rows)
    if path in ("dequant_mm", "dequant4_mm"):
        return replace(plan, chunk_n=chunk, overlap=overlap)
    if swap and not plan.swap_ab:
        return replace(plan, swap_ab=True, block_m=block_m or plan.block_m)
    return replace(plan, **dict(fields))


def clear() -> None:
    _TABLE.clear()
    _ROWS.clear()
