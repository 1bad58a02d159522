"""What the CUDA backend needs from this machine, as reasons it cannot run (None when it can).

Every check is evaluated when asked (not cached at import), so the registry's `available()` says
the truth on the machine that selects the kernel, and tests can stand in a fake device.
"""
from __future__ import annotations

import functools
import importlib.util

import torch


def triton_missing() -> str | None:
    """Triton is preinstalled next to CUDA builds of torch; it is no dependency of sagequant."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (it ships with CUDA builds of torch)"
    return None


def cuda_missing() -> str | None:
    if not torch.cuda.is_available():
        built = "a CPU-only build of torch" if torch.version.cuda is None else \
            f"torch built for CUDA {torch.version.cuda}"
        return f"no CUDA device (torch.cuda.is_available() is False; {built})"
    return None


def capability_missing(minimum: tuple[int, int], what: str) -> str | None:
    """Reason the current device's compute capability is below `minimum`, e.g. (8, 9) for FP8."""
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < minimum:
        name = torch.cuda.get_device_name()
        return (f"needs compute capability >= {minimum[0]}.{minimum[1]} for {what}; "
                f"{name} has {major}.{minor}")
    return None


def requirement(min_capability: tuple[int, int], what: str, needs_triton: bool):
    """A zero-argument `available()` for a registry row: the first unmet requirement, or None."""
    def available() -> str | None:
        why = cuda_missing() or capability_missing(min_capability, what)
        if why is None and needs_triton:
            why = triton_missing()
        return why
    available.__doc__ = (f"CUDA device with compute capability >= {min_capability[0]}."
                         f"{min_capability[1]} ({what}){' and triton' if needs_triton else ''}")
    return available


def require_cuda_tensors(kernel: str, **tensors) -> None:
    """The ops run on CUDA tensors only; a CPU tensor here means the graph was not moved to GPU."""
    for name, t in tensors.items():
        if t is not None and t.device.type != "cuda":
            raise RuntimeError(f"kernel {kernel} runs on CUDA tensors; {name} is on {t.device} "
                               f"(move the compiled model to a CUDA device, or compile for backend "
                               f"cpu)")


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of `device`; 132 (an H100 SXM) for a CPU tensor (the Triton interpreter)."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
