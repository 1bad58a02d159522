"""Timing of the weight-only paths measured_dispatch.candidates lists for one weight, on the
device that holds it (the measuring half of measured dispatch: it calls the kernels, which read
the table measured_dispatch keeps)."""
from __future__ import annotations

import torch

from ...ir.quant_spec import QuantSpec
from . import layout
from .measured_dispatch import candidates
from .triton_weight_only import dequantize_weight, weight_only_linear


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
    n, k = shape
    w16 = _dense(qweight, scales, zeros, spec, shape, dtype, group)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=qweight.device, dtype=dtype)
        us, errors = {}, {}
        plans = candidates(m, n, k, spec.format, group, sms)
        ref = torch.mm(x, w16.t()).float()
        for plan in plans:
            run = lambda p=plan: weight_only_linear(  # noqa: E731
                x, qweight, scales, zeros, None, spec, shape, plan=p)
            try:
                _check(run(), ref)
                us[plan.describe()] = (_graph_us(run), plan)
            except Exception as err:  # recorded, never chosen; the others still compete
                errors[plan.describe()] = f"{type(err).__name__}: {err}"[:300]
        if not us:
            raise RuntimeError(f"no weight-only path ran {spec.describe()} {shape} at M={m}: {errors}")
        best = min(us, key=lambda d: us[d][0])
        rows.append({"m": m, "chosen": best, "thresholds": plans[0].describe(),
                     "path": us[best][1].path, "chunk_n": us[best][1].chunk_n,
                     "overlap": us[best][1].overlap, "swap_ab": us[best][1].swap_ab,
                     "block_m": us[best][1].block_m,
                     "word_fields": {f: getattr(us[best][1], f) for f in layout.WORD_FIELDS}
                     if us[best][1].path in ("gemv4", "gemv4h", "mma4") else {},
                     "us": {d: round(t, 2) for d, (t, _) in us.items()}, "errors": errors,
                     "bf16_gemm_us": round(_graph_us(lambda: torch.mm(x, w16.t())), 2)})
    del w16
    return rows


def _check(out: torch.Tensor, ref: torch.Tensor, tol: float = 2e-2) -> None:
    """A candidate is timed only when its output matches the bf16 GEMM on the same dequantized
    weight (both round to 16 bits: ~4e-3 apart); a wrong one is recorded, never chosen."""
    err = float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))
    if not err <= tol:
        raise ValueError(f"output differs from the 16-bit GEMM: relative error {err:.3g} > {tol}")


def _dense(qweight, scales, zeros, spec: QuantSpec, shape, dtype, group) -> torch.Tensor:
    """The 16-bit weight (the bf16 GEMM's operand), by the kernel that dequantizes its format."""
    if spec.fmt.kind == "codebook":
        from .triton_words import dequantize_words
        out = torch.empty(tuple(shape), dtype=dtype, device=qweight.device)
        return dequantize_words(layout.weight_rows(qweight, spec, *shape), scales, zeros,
                                spec.format, group, (0, shape[0]), shape[1], out)
    return dequantize_weight(qweight, scales, zeros, spec, shape, dtype)
