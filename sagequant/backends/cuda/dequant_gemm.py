"""Dequantize + cuBLAS for weight-only GEMMs at large M ("dequant_mm" / "dequant4_mm").

out[:, r0:r1] = x @ W[r0:r1]^T one chunk of `plan.chunk_n` weight rows at a time: the chunk is
dequantized into a 16-bit scratch that stays in L2 (H100: 50 MB) while cuBLAS reads it, and
cuBLAS writes a column slice of out in place (leading dimension N). With `plan.overlap` (CUDA
only) chunk i+1 is dequantized on a side stream into a second scratch while cuBLAS multiplies
chunk i: the dequantize is bandwidth-bound and a chunk's GEMM leaves SMs free, so the two can
share the GPU. Events order each scratch's reuse after the GEMM that read it, and the caller's
stream waits for every side-stream kernel before its last GEMM (so the scratch, allocated on
the caller's stream, is never freed under a running kernel). Inside CUDA-graph capture the side
stream joins the capture through the same events.
"""
from __future__ import annotations

from typing import Callable

import torch

_SIDE: dict = {}  # device index -> the side stream (created once, outside any capture)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device.index not in _SIDE:
        _SIDE[device.index] = torch.cuda.Stream(device=device)
    return _SIDE[device.index]


def _mm(x2, wc, bias, dst, r0, r1) -> None:
    if bias is not None:
        torch.addmm(bias[r0:r1], x2, wc.t(), out=dst)
    else:
        torch.mm(x2, wc.t(), out=dst)


def dequant_mm(x2: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, chunk_n: int,
               overlap: bool, dequant: Callable[[int, int, torch.Tensor], None]) -> None:
    """out [M, N] = x2 [M, K] @ W^T (+ bias); dequant(r0, r1, dst) writes W[r0:r1] into dst."""
    n, k = out.shape[1], x2.shape[1]
    step = min(chunk_n or n, n)
    bounds = [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]
    slot = lambda r0, r1: out if (r0, r1) == (0, n) else out[:, r0:r1]  # noqa: E731
    if not (overlap and x2.is_cuda and len(bounds) > 1):
        scratch = torch.empty((step, k), dtype=x2.dtype, device=x2.device)
        for r0, r1 in bounds:
            wc = scratch[: r1 - r0]
            dequant(r0, r1, wc)
            _mm(x2, wc, bias, slot(r0, r1), r0, r1)
        return
    main, side = torch.cuda.current_stream(x2.device), _side_stream(x2.device)
    scratch = torch.empty((2, step, k), dtype=x2.dtype, device=x2.device)
    ready = [torch.cuda.Event() for _ in bounds]
    read = [torch.cuda.Event() for _ in bounds]
    side.wait_stream(main)  # the inputs (and, under capture, the capture itself)
    for i, (r0, r1) in enumerate(bounds):
        wc = scratch[i % 2, : r1 - r0]
        with torch.cuda.stream(side):
            if i >= 2:
                side.wait_event(read[i - 2])  # the GEMM that read this scratch is done
            dequant(r0, r1, wc)
            ready[i].record(side)
        main.wait_event(ready[i])
        _mm(x2, wc, bias, slot(r0, r1), r0, r1)
        read[i].record(main)
