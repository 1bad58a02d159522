"""Helpers for benchmarks/cuda_kernels.py: importing sagequant from a bare checkout, quantized
weights built on the GPU, float64 references, and CUDA-graph timing over rotated weight copies.
"""
from __future__ import annotations

import importlib.util
import math
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"  # "cpu" only for --smoke (the Triton interpreter on tiny shapes, no timing value)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def import_sagequant():
    """An installed sagequant, else this checkout's `sagequant/` folder. The stub packages skip the
    package and backends/ __init__ files, whose other imports (ONNX, TensorRT backends) the GPU image
    may lack; only what the CUDA kernels need is imported."""
    if importlib.util.find_spec("sagequant") is None:
        pkg = ROOT / "sagequant"
        for name, path in (("sagequant", pkg), ("sagequant.backends", pkg / "backends")):
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod
    import sagequant.backends.cuda.kernels  # noqa: F401  (registers the ops)
    import sagequant.backends.reference.kernels  # noqa: F401  (the CPU reference ops)
    return sys.modules["sagequant"]


class Budget:
    """Seconds since start; sections skip their remaining work once `limit` is passed."""

    def __init__(self, limit_s: float):
        self.t0, self.limit = time.perf_counter(), limit_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.limit - self.elapsed()


def environment() -> dict:
    import platform
    if DEVICE != "cuda":
        return {"gpu": None, "l2_bytes": 1024, "torch": torch.__version__, "smoke": True}
    p = torch.cuda.get_device_properties(0)
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = None
    return {"gpu": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
            "l2_bytes": getattr(p, "L2_cache_size", None), "memory_GiB": round(p.total_memory / 2**30, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "tinygemm": hasattr(torch, "_weight_int4pack_mm") and hasattr(torch, "_convert_weight_to_int4pack")}


def measure_bandwidth(nbytes: int = 1 << 30, reps: int = 10) -> float | None:
    """Device-to-device copy, bytes read + written per second (GB/s), median of `reps`."""
    if DEVICE != "cuda":
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * nbytes / statistics.median(times) / 1e9


def measure_matmul_tflops(n: int = 8192) -> float | None:
    if DEVICE != "cuda":
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(5):
        a @ b
    e.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * 5 / (s.elapsed_time(e) / 1e3) / 1e12


def rel_errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Frobenius relative error, max |err| / max |ref|, and whether every output is finite."""
    finite = bool(torch.isfinite(out).all())
    d = out.double() - ref
    rn = float(ref.norm()) or 1.0
    return {"rel_fro": float(d.norm()) / rn,
            "max_rel": float(d.abs().max()) / (float(ref.abs().max()) or 1.0),
            "finite": finite}


def poison(numel: int, dtype: torch.dtype) -> None:
    """Fill a block the caching allocator will hand to the next output of this size with NaN, so
    an element the kernel never writes shows up as non-finite."""
    t = torch.full((numel,), float("nan"), dtype=dtype if dtype.is_floating_point else torch.float32,
                   device=DEVICE)
    del t


def time_graph(fns: list, target_s: float = 0.015, repeats: int = 3) -> dict:
    """Capture every fn of `fns` (one per weight copy) in one CUDA graph, replay it, and return
    the median time per call in µs (plus the spread of the repeats)."""
    if DEVICE != "cuda":  # --smoke: run each once, the number means nothing
        t0 = time.perf_counter()
        for f in fns:
            f()
        return {"us": (time.perf_counter() - t0) * 1e6 / len(fns), "spread": 0.0,
                "copies": len(fns), "reps": 1}
    fns[0]()  # compile outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    graph.replay()
    e.record()
    torch.cuda.synchronize()
    one = max(s.elapsed_time(e) / 1e3, 1e-6)
    reps = int(min(200, max(1, target_s / one)))
    samples = []
    for _ in range(repeats):
        s.record()
        for _ in range(reps):
            graph.replay()
        e.record()
        torch.cuda.synchronize()
        samples.append(s.elapsed_time(e) * 1e3 / reps / len(fns))
    del graph
    med = statistics.median(samples)
    return {"us": med, "spread": (max(samples) - min(samples)) / med, "copies": len(fns),
            "reps": reps}


def copies_for(nbytes: int, l2_bytes: int, most: int = 128) -> int:
    """Weight copies to rotate through so that one graph replay streams >= 4x the L2."""
    return int(min(most, max(1, math.ceil(4 * l2_bytes / max(nbytes, 1)))))


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def short_error(err: BaseException) -> str:
    lines = traceback.format_exception_only(type(err), err)
    return " ".join(line.strip() for line in lines)[-600:]


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)
