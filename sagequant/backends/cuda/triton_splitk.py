"""The split-K epilogue every Triton GEMM here shares: sum fp32 partials [S, M, N] in a fixed
order (deterministic), add the bias, cast to the output dtype. Imports triton at the top."""
from __future__ import annotations

import triton
import triton.language as tl


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
