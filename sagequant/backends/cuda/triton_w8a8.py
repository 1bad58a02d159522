"""W8A8 on CUDA: a fused activation-quantization kernel (per-token absmax -> scale -> codes in one
launch, or codes from a calibrated static scale), an INT8 GEMM with the dequantizing epilogue
fused (int32 accumulate, x scale per token, weight scale per channel or group, bias, cast), and
the FP8 path through torch._scaled_mm.

Numerics follow ir.quant_spec exactly: scale = absmax / qmax in fp32 (1 for an all-zero row,
never below fp32's smallest normal), codes = x / scale (IEEE division), INT8 rounds half to even
then clamps to [-128, 127], FP8 clamps to +-448 then rounds to nearest even on the cast.
This module imports triton at the top; backends/cuda/kernels.py imports it lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import layout
from .hardware import sm_count
from .triton_splitk import _splitk_reduce

FP32_TINY = float(torch.finfo(torch.float32).tiny)
RINT_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 half to even in fp32
SINGLE_PASS_MAX_K = 8192  # rows up to this long are held in registers: one read of x
INT_MM_MIN_M = 1 << 30    # M from which torch._int_mm + a torch epilogue replaces the Triton GEMM
FP8_FAST_ACCUM = True     # torch._scaled_mm(use_fast_accum=...) for the FP8 path


@triton.jit
def _quantize_block(v, scale, QMAX: tl.constexpr, INT8: tl.constexpr):
    q = tl.math.div_rn(v, scale)
    if INT8:  # clamp past the range first (so the magic add stays exact), round, clamp to codes
        q = tl.minimum(tl.maximum(q, -256.0), 256.0)
        q = (q + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    else:
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
    return q


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_xm, stride_qm,
                      QMAX: tl.constexpr, INT8: tl.constexpr, STATIC: tl.constexpr,
                      SINGLE: tl.constexpr, BLOCK_K: tl.constexpr):
    """One program per row: its scale (dynamic: absmax / QMAX, stored to s_ptr[m]) and codes."""
    m = tl.program_id(0)
    x_row = x_ptr + m * stride_xm
    q_row = q_ptr + m * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if SINGLE:
        v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        if SINGLE:
            amax = tl.max(tl.abs(v), axis=0)
        else:
            run = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                c = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                run = tl.maximum(run, tl.abs(c))
            amax = tl.max(run, axis=0)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, QMAX), 1.0)
        scale = tl.maximum(scale, 1.1754943508222875e-38)
        tl.store(s_ptr + m, scale)
    if SINGLE:
        q = _quantize_block(v, scale, QMAX, INT8)
        tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        for k0 in range(0, K, BLOCK_K):
            c = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            q = _quantize_block(c, scale, QMAX, INT8)
            tl.store(q_row + k0 + offs, q.to(q_ptr.dtype.element_ty), mask=k0 + offs < K)


def quantize_activation(x2: torch.Tensor, fmt: str, static_scale: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [M, K] -> (codes [M, K] int8 or float8_e4m3fn, fp32 scale [M, 1], or the static one)."""
    m, k = x2.shape
    if fmt == "int8":
        qdtype, qmax = torch.int8, 127.0
    elif fmt == "fp8_e4m3":
        qdtype, qmax = torch.float8_e4m3fn, float(torch.finfo(torch.float8_e4m3fn).max)
    else:
        raise ValueError(f"activation format {fmt!r}: the CUDA kernels quantize to int8 or fp8_e4m3")
    q = torch.empty((m, k), dtype=qdtype, device=x2.device)
    static = static_scale is not None
    scale = static_scale.float().reshape(1, 1) if static else \
        torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    if m == 0:
        return q, scale
    single = triton.next_power_of_2(k) <= SINGLE_PASS_MAX_K
    block = triton.next_power_of_2(k) if single else 4096
    _act_quant_kernel[(m,)](x2, q, scale, scale, k, x2.stride(0), q.stride(0), QMAX=qmax,
                            INT8=qdtype == torch.int8, STATIC=static, SINGLE=single,
                            BLOCK_K=block, num_warps=8 if block >= 4096 else 4)
    return q, scale


@triton.jit(do_not_specialize=["M"])  # one compile for every M
def _int8_gemm_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, bias_ptr, out_ptr, M, N, K, GROUP,
                      k_per_split, stride_am, stride_bn, stride_sa, stride_sbn, stride_sbg,
                      stride_om, GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """SPLIT: each K slice writes its scaled fp32 partial to out[pid_k] ([S, M, N]); the sum is
    _splitk_reduce's (scaling is linear, so it commutes with the split)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = min(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_k = tl.max_contiguous(tl.multiple_of(offs_k, BLOCK_K), BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_k[None, :],
                    mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0)
        if GROUPED:  # one weight scale per (channel, group): scale each K block's exact sum
            part = tl.dot(a, tl.trans(b), out_dtype=tl.int32)
            sb = tl.load(sb_ptr + offs_n * stride_sbn + (k0 // GROUP) * stride_sbg,
                         mask=offs_n < N, other=0).to(tl.float32)
            acc += part.to(tl.float32) * sb[None, :]
        else:
            acc_i = tl.dot(a, tl.trans(b), acc_i, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + offs_m * stride_sa, mask=offs_m < M, other=0).to(tl.float32)
    if GROUPED:
        acc = acc * sa[:, None]
    else:
        sb = tl.load(sb_ptr + offs_n * stride_sbn, mask=offs_n < N, other=0).to(tl.float32)
        acc = acc_i.to(tl.float32) * sa[:, None] * sb[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT:
        tl.store(out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


def int8_gemm_config(m: int, n: int, k: int, sms: int = 132) -> dict:
    """Tiles of the INT8 GEMM by M (int8 dot needs K blocks of >= 32), and split-K so that
    small-M (memory-bound) launches still cover the GPU; `split_k` is a request."""
    if m <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
    tiles = triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    waves = layout.MEMORY_BOUND_WAVES if m <= 64 else layout.COMPUTE_BOUND_WAVES
    cfg["split_k"] = layout.split_k_for(tiles, triton.cdiv(k, cfg["BLOCK_K"]), sms, waves)
    return cfg


def int8_linear(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
                w_scales: torch.Tensor, group: int, bias: torch.Tensor | None,
                out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """out = (xq @ qweight^T) * x_scale[m] * w_scale[n(, group)] + bias, in one Triton kernel."""
    m, k = xq.shape
    n = qweight.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    cfg = dict(config or int8_gemm_config(m, n, k, sm_count(xq.device)))
    grouped = group < k
    if grouped:
        cfg["BLOCK_K"] = min(cfg["BLOCK_K"], group)
        if cfg["BLOCK_K"] < 32:
            raise ValueError(f"INT8 GEMM needs weight groups of >= 32, got {group}")
    per, splits = layout.k_blocks_per_split(k, cfg["BLOCK_K"], cfg.pop("split_k", 1))
    split = splits > 1
    dst = torch.empty((splits, m, n), dtype=torch.float32, device=xq.device) if split else out
    b = bias if bias is not None else out
    sbn, sbg = layout.scale_strides(w_scales, n)
    sa_stride = 0 if x_scale.numel() == 1 else x_scale.stride(0)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), splits)
    _int8_gemm_kernel[grid](xq, qweight, x_scale, w_scales, b, dst, m, n, k, group,
                            per * cfg["BLOCK_K"], xq.stride(0), qweight.stride(0), sa_stride, sbn,
                            sbg, out.stride(0), GROUPED=grouped, HAS_BIAS=bias is not None,
                            SPLIT=split, GROUP_M=8, **cfg)
    if split:
        _splitk_reduce[(triton.cdiv(m * n, 1024),)](dst, b, out, m * n, n, splits,
                                                     HAS_BIAS=bias is not None, BLOCK=1024)
    return out


def int8_linear_int_mm(xq, x_scale, qweight, w_scales, bias, out_dtype) -> torch.Tensor:
    """torch._int_mm (cuBLASLt int8, M padded past 16) then the dequantizing epilogue in torch."""
    m = xq.shape[0]
    rows = layout.int_mm_rows(m)
    a = xq if rows == m else torch.nn.functional.pad(xq, (0, 0, 0, rows - m))
    acc = torch._int_mm(a, qweight.t())[:m]
    out = acc.float() * x_scale.float() * w_scales.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_linear(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor,
               w_scales: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype,
               fast_accum: bool = FP8_FAST_ACCUM) -> torch.Tensor:
    """torch._scaled_mm: e4m3 x e4m3 with tensor-wise or row-wise (token x channel) fp32 scales.
    Row-wise needs a bf16 output in torch; an fp16 model gets its result cast."""
    m, n = xq.shape[0], qweight.shape[0]
    sa, sb = layout.scaled_mm_scales(x_scale, w_scales, m, n)
    rowwise = sa.dim() == 2
    mm_dtype = torch.bfloat16 if rowwise else out_dtype
    b = None if bias is None else bias.to(mm_dtype)
    out = torch._scaled_mm(xq, qweight.t(), scale_a=sa, scale_b=sb, bias=b, out_dtype=mm_dtype,
                           use_fast_accum=fast_accum)
    return out if out.dtype == out_dtype else out.to(out_dtype)
