"""W8A8-FP8 at M = 1 (decode) in one kernel: per-token activation quantization fused into an FP8
GEMV, where the unfused path pays a quantization launch plus torch._scaled_mm, whose tiles are
built for large M.

Every program recomputes its row's absmax over the whole of K (the row is a few KB, read from
L2), quantizes the x chunk of each K step exactly as triton_w8a8's quantizer does (scale =
absmax / 448 by IEEE division, clamp, round-to-nearest-even cast to e4m3), and accumulates code
products in fp32 (an e4m3 x e4m3 product is exact in fp32); the activation and weight scales
multiply the sum once. Split-K partials are reduced by triton_splitk._splitk_reduce.
This module imports triton at the top; kernels.py imports it lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import layout
from .hardware import sm_count
from .triton_w8a8 import _quantize_block
from .triton_splitk import _splitk_reduce

FP8_MAX = 448.0
AMAX_BLOCK = 1024  # x elements per step of the absmax pass


@triton.jit(do_not_specialize=["M"])
def _fp8_gemv_kernel(x_ptr, w_ptr, sw_ptr, static_ptr, b_ptr, out_ptr, M, N, K, k_per_split,
                     stride_xm, stride_wn, stride_swn, stride_om, STATIC: tl.constexpr,
                     HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_A: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    x_row = x_ptr + m * stride_xm
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        offs_a = tl.arange(0, BLOCK_A)
        run = tl.zeros((BLOCK_A,), dtype=tl.float32)
        for a0 in range(0, K, BLOCK_A):
            v = tl.load(x_row + a0 + offs_a, mask=a0 + offs_a < K, other=0.0).to(tl.float32)
            run = tl.maximum(run, tl.abs(v))
        amax = tl.max(run, axis=0)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
        scale = tl.maximum(scale, 1.1754943508222875e-38)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k0 = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    lo = pid_k * k_per_split
    hi = min(lo + k_per_split, K)
    for k0 in range(lo, hi, BLOCK_K):
        offs_k = k0 + offs_k0
        k_ok = offs_k < hi
        v = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        xq = _quantize_block(v, scale, 448.0, False).to(tl.float8e4nv).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=n_ok[:, None] & k_ok[None, :], other=0)
        acc += w.to(tl.float8e4nv, bitcast=True).to(tl.float32) * xq[None, :]
    sw = tl.load(sw_ptr + offs_n * stride_swn, mask=n_ok, other=0).to(tl.float32)
    out = tl.sum(acc, axis=1) * scale * sw
    if SPLIT:
        tl.store(out_ptr + pid_k * M * N + m * N + offs_n, out, mask=n_ok)
    else:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def fp8_gemv(x2: torch.Tensor, static_scale: torch.Tensor | None, qweight: torch.Tensor,
             w_scales: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
             config: dict | None = None) -> torch.Tensor:
    """out[M, N] for x2 [M, K] (fp16/bf16, M small), e4m3 weight [N, K], weight scales per
    channel [N, 1] or per tensor [1, 1]; activation scale per token, or `static_scale`."""
    m, k = x2.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=x2.device)
    if m == 0:
        return out
    cfg = dict(config or layout.fp8_gemv_config(n, k, sm_count(x2.device)))
    per, splits = layout.k_blocks_per_split(k, cfg["BLOCK_K"], cfg.pop("split_k"))
    split = splits > 1
    dst = torch.empty((splits, m, n), dtype=torch.float32, device=x2.device) if split else out
    b = bias if bias is not None else out
    sw_n, _ = layout.scale_strides(w_scales, n)
    static = static_scale.float().reshape(1) if static_scale is not None else w_scales
    w = qweight.view(torch.uint8)
    _fp8_gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), splits, m)](
        x2, w, w_scales, static, b, dst, m, n, k, per * cfg["BLOCK_K"], x2.stride(0), w.stride(0),
        sw_n, out.stride(0), STATIC=static_scale is not None, HAS_BIAS=bias is not None,
        SPLIT=split, BLOCK_A=AMAX_BLOCK, **cfg)
    if split:
        _splitk_reduce[(triton.cdiv(m * n, 1024),)](dst, b, out, m * n, n, splits,
                                                     HAS_BIAS=bias is not None, BLOCK=1024)
    return out
