"""Attention kernels over the paged KV cache, in the kernel registry under scheme KV_ATTENTION.

A row says which KV dtypes it reads and which head dims it handles; `select_attention_kernel`
picks the first row of the device's backend that accepts the plan, or raises naming every row
and why it refused (no silent fallback to another backend).
Kernel call convention: op(q [batch, heads, new, head_dim], step: AttentionStep, layer, scale,
window) -> [batch, heads, new, head_dim]; the step has already written the new k, v.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.kv_plan import KVQuantPlan
from .registry import REGISTRY, KernelNotFoundError, KernelSpec

KV_ATTENTION = "KV_ATTENTION"


@dataclass(frozen=True)
class AttentionKernelSpec(KernelSpec):
    kv_dtypes: tuple[str, ...] = ("none", "int8", "fp8")
    head_dims: tuple[int, ...] | None = None   # None: any head dim

    def rejects(self, plan: KVQuantPlan, head_dim: int) -> str | None:  # type: ignore[override]
        if plan.dtype not in self.kv_dtypes:
            return f"KV dtype {plan.dtype} not in {self.kv_dtypes}"
        if self.head_dims is not None and head_dim not in self.head_dims:
            return f"head_dim {head_dim} not in {self.head_dims}"
        return self.available()


def select_attention_kernel(plan: KVQuantPlan, head_dim: int, backend: str,
                            priority: str = "latency") -> AttentionKernelSpec:
    reasons = []
    for spec in REGISTRY.candidates(KV_ATTENTION, backend, priority):
        why = spec.rejects(plan, head_dim)
        if why is None:
            return spec
        reasons.append(f"{backend}:{spec.name}: {why}")
    raise KernelNotFoundError(
        f"no KV attention kernel for backend={backend} (kv dtype {plan.dtype}, head_dim "
        f"{head_dim}): " + ("; ".join(reasons) or "none registered"))
