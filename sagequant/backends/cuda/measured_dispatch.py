"""Weight-only path choice by measured cost on the device that runs it.

layout.choose picks a path from M thresholds fixed on one shape; at other shapes and depths it
can pick a kernel slower than dequantize + cuBLAS, i.e. slower than a bf16 GEMM plus one
bandwidth-bound dequantize (the issue-18 b32 and prefill rows). `measure` times every path that
can run a weight at each M bucket (CUDA-graph replays, so launch overhead is not counted) and
`install` keeps the fastest; weight_only_linear then reads `plan_for` before the thresholds.
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

_TABLE: dict[tuple, list[tuple[int, str, int]]] = {}  # key -> sorted (m, path, chunk_n)
_ROWS: dict[tuple, list[dict]] = {}                   # key -> the measurements behind it


def key(device: torch.device, spec: QuantSpec, shape, asym: bool, dtype: torch.dtype) -> tuple:
    return (device.index, spec, int(shape[0]), int(shape[1]), asym, dtype)


def candidates(m: int, n: int, k: int, fmt: str, group: int, sm_count: int = 132
               ) -> list[layout.Plan]:
    """The paths that can run an [n, k] weight at M rows: the thresholds' own choice, the
    dequantize + cuBLAS path whole and chunked, and the tensor-core kernels."""
    bits = 8 if fmt not in layout.WORD_FORMATS else 4
    plan = lambda path: layout.plan_for(path, m, n, k, bits=bits, group=group,  # noqa: E731
                                        sm_count=sm_count, fmt=fmt)
    out = [layout.choose(m, n, k, bits=bits, group=group, sm_count=sm_count, fmt=fmt)]
    if m >= 2:
        dq = "dequant4_mm" if fmt == "nf4" else "dequant_mm"
        out += [replace(plan(dq), chunk_n=0), plan(dq)]
        if layout.word_rejects(fmt, k, group, layout.WORD_MMA_MIN_BLOCK_K) is None and m <= 128:
            out.append(plan("mma4"))
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


def _graph_us(fn, reps: int = 5) -> float:
    """GPU µs per call of fn: `reps` calls captured in one CUDA graph, the median of 3 replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()   # compile and let the allocator settle outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del graph
    return sorted(times)[1]


def measure(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            spec: QuantSpec, shape: list[int], dtype: torch.dtype, ms) -> list[dict]:
    """Per M: µs of each candidate path, the fastest ("chosen"), the M thresholds' own choice
    ("thresholds") and the bf16 GEMM on the dequantized weight ("bf16_gemm_us": what a bf16
    model pays for this linear)."""
    from .hardware import sm_count
    group = layout.kernel_group(spec, shape[1])
    sms = sm_count(qweight.device)
    with torch.no_grad():
        return _measure(qweight, scales, zeros, spec, shape, dtype, ms, group, sms)


def _measure(qweight, scales, zeros, spec, shape, dtype, ms, group, sms) -> list[dict]:
    from .triton_weight_only import weight_only_linear
    n, k = shape
    w16 = _dense(qweight, scales, zeros, spec, shape, dtype, group)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=qweight.device, dtype=dtype)
        us, errors = {}, {}
        plans = candidates(m, n, k, spec.format, group, sms)
        for plan in plans:
            try:
                us[plan.describe()] = (_graph_us(lambda p=plan: weight_only_linear(
                    x, qweight, scales, zeros, None, spec, shape, plan=p)), plan)
            except Exception as err:  # recorded, never chosen; the others still compete
                errors[plan.describe()] = f"{type(err).__name__}: {err}"[:300]
        if not us:
            raise RuntimeError(f"no weight-only path ran {spec.describe()} {shape} at M={m}: {errors}")
        best = min(us, key=lambda d: us[d][0])
        rows.append({"m": m, "chosen": best, "thresholds": plans[0].describe(),
                     "path": us[best][1].path, "chunk_n": us[best][1].chunk_n,
                     "us": {d: round(t, 2) for d, (t, _) in us.items()}, "errors": errors,
                     "bf16_gemm_us": round(_graph_us(lambda: torch.mm(x, w16.t())), 2)})
    del w16
    return rows


def _dense(qweight, scales, zeros, spec: QuantSpec, shape, dtype, group) -> torch.Tensor:
    """The 16-bit weight (the bf16 GEMM's operand), by the kernel that dequantizes its format."""
    if spec.fmt.kind == "codebook":
        from .triton_words import dequantize_words
        out = torch.empty(tuple(shape), dtype=dtype, device=qweight.device)
        return dequantize_words(layout.weight_rows(qweight, spec, *shape), scales, zeros,
                                spec.format, group, (0, shape[0]), shape[1], out)
    from .triton_weight_only import dequantize_weight
    return dequantize_weight(qweight, scales, zeros, spec, shape, dtype)


def install(k: tuple, rows: list[dict]) -> None:
    _TABLE[k] = sorted((r["m"], r["path"], r["chunk_n"]) for r in rows)
    _ROWS[k] = rows


def measured(k: tuple, ms) -> list[dict] | None:
    """The installed measurements of `k` when they cover every M in `ms` (else None)."""
    rows = _ROWS.get(k)
    return rows if rows is not None and set(ms) <= {r["m"] for r in rows} else None


def plan_for(k: tuple, m: int, n: int, kk: int, *, bits: int, group: int, sm_count: int,
             fmt: str) -> layout.Plan | None:
    """The measured path for M rows (the smallest measured M >= m, else the largest), with
    tiles for this M; None where this key was not measured."""
    rows = _TABLE.get(k) if _TABLE else None
    if not rows:
        return None
    _, path, chunk = next((r for r in rows if r[0] >= m), rows[-1])
    plan = layout.plan_for(path, m, n, kk, bits=bits, group=group, sm_count=sm_count, fmt=fmt)
    return replace(plan, chunk_n=chunk) if path in ("dequant_mm", "dequant4_mm") else plan


def clear() -> None:
    _TABLE.clear()
    _ROWS.clear()
