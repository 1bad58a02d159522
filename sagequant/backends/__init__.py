"""Backends: kernels and emitters. Importing this package registers every kernel whose module
imports on this machine (GPU modules must still import on CPU-only machines)."""
from .reference import kernels as _reference_kernels  # noqa: F401
from .cuda import kernels as _cuda_kernels  # noqa: F401
from .reference import kv_attention as _reference_kv_attention  # noqa: F401,E402
from .cuda import kv_attention as _cuda_kv_attention  # noqa: F401,E402
from .cuda import fused as _cuda_fused  # noqa: F401,E402
