"""Kernel registry: (scheme, backend, priority) -> kernel specs with requirement checks.

Choosing is explicit. A key with no kernel raises KernelNotFoundError naming the key and every
registered key; a kernel whose requirements fail (hardware, group size, ragged groups) raises
with the reason. Another backend is used only when QuantConfig.fallback names it, and the
binding records that it happened.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..ir.quant_spec import QuantSpec
from ..errors import KernelError


class KernelNotFoundError(KernelError):
    """No registered kernel for a (scheme, backend, priority) key or the layer's constraints."""


@dataclass(frozen=True)
class KernelSpec:
    name: str
    backend: str
    schemes: tuple[str, ...]
    priorities: tuple[str, ...]
    op: object                      # the callable the lowered node runs (a torch op)
    description: str
    formats: tuple[str, ...] = ()   # weight formats it reads; empty: any
    group_sizes: tuple[int, ...] | None = None  # None: any group size, or none
    ragged_groups: bool = True      # can it take a last group shorter than group_size?
    available: Callable[[], str | None] = field(default=lambda: None)  # reason it cannot run here
    activation_quant: bool = False  # takes (act_spec, act_scale) after the weight arguments
    # The same GEMM reading an activation quantized upstream: (codes, scale, <weight arguments>,
    # act_spec, out_dtype). fuse_norm_qdq rewrites to it; None: this kernel quantizes its input.
    prequantized_op: object = None

    def binding_attrs(self, weight_spec: QuantSpec, shape: list[int]) -> dict:
        """Extra facts the KernelBinding records for this weight (e.g. the per-M dispatch)."""
        return {}

    def rejects(self, weight_spec: QuantSpec, in_features: int) -> str | None:
        """Why this kernel cannot run the given weight here, or None when it can."""
        if self.formats and weight_spec.format not in self.formats:
            return f"weight format {weight_spec.format} not in {self.formats}"
        g = weight_spec.group_size
        if g and self.group_sizes is not None and g not in self.group_sizes:
            return f"group_size {g} not in {self.group_sizes}"
        if g and in_features % g and not self.ragged_groups:
            return (f"in_features {in_features} is not a multiple of group_size {g} (ragged last "
                    "group) and this kernel needs whole groups")
        return self.available()


class KernelRegistry:
    def __init__(self):
        self._specs: list[KernelSpec] = []

    def register(self, spec: KernelSpec) -> KernelSpec:
        if any(s.name == spec.name and s.backend == spec.backend for s in self._specs):
            raise ValueError(f"kernel {spec.backend}:{spec.name} is already registered")
        self._specs.append(spec)
        return spec

    def keys(self) -> list[tuple[str, str, str]]:
        return sorted({(sc, s.backend, p) for s in self._specs for sc in s.schemes for p in s.priorities})

    def candidates(self, scheme: str, backend: str, priority: str) -> list[KernelSpec]:
        return [s for s in self._specs
                if s.backend == backend and scheme in s.schemes and priority in s.priorities]

    def select(self, scheme: str, backend: str, priority: str, weight_spec: QuantSpec,
               in_features: int, layer: str, fallback: str | None = None) -> tuple[KernelSpec, str | None]:
        """Pick the first kernel of the key that accepts this weight; (kernel, fallback_from)."""
        reasons = []
        for b in [backend] + ([fallback] if fallback else []):
            for spec in self.candidates(scheme, b, priority):
                why = spec.rejects(weight_spec, in_features)
                if why is None:
                    return spec, (backend if b != backend else None)
                reasons.append(f"{b}:{spec.name}: {why}")
        key = f"(scheme={scheme}, backend={backend}, priority={priority})"
        if reasons:
            detail = "; ".join(reasons)
            raise KernelNotFoundError(f"no kernel can run {layer} for {key}: {detail}"
                                      + ("" if fallback else "; set QuantConfig.fallback to allow "
                                         "another backend explicitly"))
        same_scheme = sorted({f"{s.backend}:{s.name}" for s in self._specs
                              if scheme in s.schemes and priority in s.priorities})
        where = (f"; {scheme} kernels exist for: {', '.join(same_scheme)} (set QuantConfig.backend or "
                 "QuantConfig.fallback to one of those backends)" if same_scheme else "")
        where += "; registered keys: " + ", ".join(f"({sc}, {b}, {p})" for sc, b, p in self.keys())
        raise KernelNotFoundError(f"no kernel registered for {key} (layer {layer})"
                                  + (f" nor for fallback backend {fallback}" if fallback else "") + where)


REGISTRY = KernelRegistry()
