"""Backends: kernels and emitters. The kernel registry's rows are registered here, in one place:
every backend module only defines its rows (GPU modules still import on CPU-only machines; a row
whose hardware is missing says so when chosen)."""
from ..lowering.registry import REGISTRY
from .cuda import fused as _cuda_fused  # noqa: F401  (defines the fused decode-step ops)
from .cuda.kernels import ROWS as CUDA_ROWS
from .cuda.kv_attention import CUDA_PAGED_ATTENTION
from .reference.kernels import CPU_W4A8, CPU_W8A8, CPU_WEIGHT_ONLY
from .reference.kv_attention import CPU_PAGED_ATTENTION

KERNELS = (CPU_WEIGHT_ONLY, CPU_W8A8, CPU_W4A8, *CUDA_ROWS, CPU_PAGED_ATTENTION, CUDA_PAGED_ATTENTION)
for _spec in KERNELS:
    REGISTRY.register(_spec)
