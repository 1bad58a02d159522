"""The split-K epilogues the Triton GEMMs here share. Both sum the fp32 partials [S, M, N] in the
fixed order s = 0..S-1 (deterministic, bit-identical to each other), add the bias and cast:

  _splitk_reduce   a second kernel over the workspace.
  _last_split_sums inside the GEMM (no second launch): each program stores its partial, then
                   bumps its output tile's arrival counter; the program that arrives last sums
                   the S partials and resets the counter to 0 for the next call (CUDA graphs
                   replay it as is). Only which program sums is racy, never the summation order.
  _store_split     a GEMM's epilogue for its SPLIT mode: 0 no split (bias, cast, store),
                   1 partial to the workspace (for _splitk_reduce), 2 _last_split_sums.

Imports triton at the top. `tile_counters` hands out the zeroed per-device counter buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict = {}   # device -> the counters in use
_OUTGROWN: list = []   # buffers replaced by a larger one: graphs captured with them still read them


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """A zeroed int32 counter per output tile, one buffer per device: every kernel that uses it
    leaves it zeroed. Kernels that share it must run one after another (one stream, or graphs
    replayed one at a time), as a decode step's GEMMs do; it is allocated on the first eager call
    (a warm-up), since CUDA-graph capture cannot allocate it."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"split-K tile counters: {tiles} needed, "
                               f"{0 if have is None else have.numel()} allocated; run the GEMM "
                               "once outside CUDA-graph capture first")
        if have is not None:
            _OUTGROWN.append(have)
        have = torch.zeros(max(tiles, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = have
    return have


@triton.jit(do_not_specialize=["MN"])  # one compile for every M
def _splitk_reduce(ws_ptr, b_ptr, out_ptr, MN, N, S, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _last_split_sums(part, ws_ptr, cnt_ptr, b_ptr, out_ptr, flat, out_offs, offs_n, mask, MN, S,
                     pid_k, tile, HAS_BIAS: tl.constexpr):
    """part: this program's fp32 partial (any shape); flat: m * N + n of each element, out_offs
    its offset in out, offs_n its n (for the bias)."""
    tl.store(ws_ptr + pid_k * MN + flat, part, mask=mask)
    tl.debug_barrier()  # every thread's partial is stored before the release below
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    if arrived == S - 1:
        acc = tl.zeros_like(part)
        for s in range(S):  # .cg: read at L2, where the other programs' stores are
            acc += tl.load(ws_ptr + s * MN + flat, mask=mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        tl.atomic_xchg(cnt_ptr + tile, 0)


@triton.jit
def _store_split(part, ws_ptr, cnt_ptr, b_ptr, out_ptr, flat, out_offs, offs_n, mask, MN, S, pid_k,
                 tile, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """part, flat, out_offs, offs_n, mask: as _last_split_sums's (offs_n broadcast to part's shape)."""
    if SPLIT == 2:
        _last_split_sums(part, ws_ptr, cnt_ptr, b_ptr, out_ptr, flat, out_offs, offs_n, mask, MN, S,
                         pid_k, tile, HAS_BIAS)
    elif SPLIT == 1:
        tl.store(ws_ptr + pid_k * MN + flat, part, mask=mask)
    else:
        if HAS_BIAS:
            part += tl.load(b_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offs, part.to(out_ptr.dtype.element_ty), mask=mask)
