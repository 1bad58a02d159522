"""Where and how the compiled model runs: backend, priority, an explicit fallback backend, the
norm / Q-DQ fusions, and the speculative-decoding draft path."""
from __future__ import annotations

from dataclasses import dataclass

from .checks import boolean, choice, fail, names, normalise

BACKENDS = ("ascend", "cpu", "cuda", "kunlun", "mlu", "onnxruntime", "rocm", "tensorrt")
PRIORITIES = names("latency", "throughput", "memory")


@dataclass(frozen=True)
class BackendConfig:
    backend: str = "cpu"
    priority: str = "latency"
    fallback: str | None = None   # the backend whose kernels may run where `backend` has none
    fuse_ln: bool = True
    fuse_qdq: bool = True
    draft_mode: bool = False

    def __post_init__(self) -> None:
        backend = choice("backend", self.backend, names(*BACKENDS))
        for name in ("fuse_ln", "fuse_qdq", "draft_mode"):
            boolean(name, getattr(self, name))
        fallback = self.fallback
        if fallback is not None:
            fallback = choice("fallback", fallback, names(*BACKENDS))
            if fallback == backend:
                others = ", ".join(b for b in BACKENDS if b != backend)
                raise fail("fallback", fallback, f"equals QuantConfig.backend={backend!r}",
                           f"None or one of {others}")
        normalise(self, backend=backend, priority=choice("priority", self.priority, PRIORITIES),
                  fallback=fallback)
