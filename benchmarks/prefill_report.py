"""Prefill diagnostics for e2e_generation.py (issue 18): one prefill under torch.profiler (wall
time next to the GPU kernels' time, so a host-bound prefill shows as wall >> kernels), and the
engine's measured weight-only kernel choices (runtime/measure_linears.py) against the M
thresholds' path and the bf16 GEMM on the same shape; both as Markdown tables."""
from __future__ import annotations

import time

import cuda_bench_lib as lib


def profile_prefill(engine, prompt: list[int]) -> dict:
    """One request of `prompt` (max_new_tokens=1) under torch.profiler, kernels summed by the
    categories of engine_step_profile."""
    from torch.profiler import ProfilerActivity, profile
    from engine_step_profile import category
    engine.add_request(prompt, 1)
    lib.sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.step()
        lib.sync()
        wall = (time.perf_counter() - t0) * 1e3
    cats: dict[str, list] = {}
    kernels: dict[str, list] = {}
    for avg in prof.key_averages():   # kernels (and memcpy/memset) carry self device time
        us = getattr(avg, "self_device_time_total", None)
        us = getattr(avg, "self_cuda_time_total", 0) if us is None else us
        if us > 0:
            kernels[avg.key] = [us, avg.count]
            c = cats.setdefault(category(avg.key), [0.0, 0])
            c[0] += us
            c[1] += avg.count
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]
    return {"wall_ms": wall, "kernel_ms": sum(v[0] for v in kernels.values()) / 1e3,
            "kernels": sum(v[1] for v in kernels.values()),
            "by_category_ms": {c: round(v[0] / 1e3, 3) for c, v in cats.items()},
            "top": [{"name": n[:90], "ms": round(v[0] / 1e3, 3), "calls": v[1]} for n, v in top]}


def choices_summary(engine) -> list[dict]:
    """Per measured weight, per M bucket: the chosen path and its µs, the thresholds' path and
    its µs, the bf16 GEMM's µs on the same shape."""
    return [{"spec": c["spec"], "shape": c["shape"], "layers": c["layers"],
             "not_measured": c.get("error") or c.get("skipped"), "rows": [
        {"m": r["m"], "chosen": r["chosen"], "us": r["us"][r["chosen"]],
         "thresholds": r["thresholds"], "thresholds_us": r["us"].get(r["thresholds"]),
         "bf16_gemm_us": r["bf16_gemm_us"]} for r in c.get("rows", [])]}
            for c in engine.kernel_choices]


def markdown(rows: list[dict], lengths) -> list[str]:
    f = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else ""  # noqa: E731
    text = []
    prof = [(r["scheme"], n, r[f"prefill_profile_{n}"]) for r in rows for n in lengths
            if isinstance(r.get(f"prefill_profile_{n}"), dict)]
    if prof:
        cats = sorted({c for *_, p in prof for c in p["by_category_ms"]})
        text.append("Prefill under torch.profiler, ms (wall: the engine step; kernels: GPU time):\n\n"
                    + lib.markdown_table(
                        ["scheme", "tokens", "wall ms", "kernel ms", "kernels"] + cats,
                        [[s, n, f(p["wall_ms"]), f(p["kernel_ms"]), p["kernels"]]
                         + [f(p["by_category_ms"].get(c, 0)) for c in cats] for s, n, p in prof]))
    table = [[r["scheme"], c["spec"], "x".join(map(str, c["shape"])), c["layers"], x["m"],
              x["chosen"], f(x["us"]), x["thresholds"], f(x["thresholds_us"]), f(x["bf16_gemm_us"]),
              f(x["bf16_gemm_us"] / x["us"]) if x["us"] else ""]
             for r in rows for c in r.get("kernel_choices", []) for x in c["rows"]]
    table += [[r["scheme"], c["spec"], "x".join(map(str, c["shape"])), c["layers"], "",
               f"not measured: {c['not_measured']}", "", "thresholds", "", "", ""]
              for r in rows for c in r.get("kernel_choices", []) if c.get("not_measured")]
    if table:
        text.append("Weight-only paths measured at engine build (µs per call, CUDA-graph replays):\n\n"
                    + lib.markdown_table(
                        ["scheme", "weight", "N x K", "layers", "M", "chosen", "µs", "thresholds' path",
                         "µs", "bf16 GEMM µs", "bf16 / chosen"], table))
    return text
