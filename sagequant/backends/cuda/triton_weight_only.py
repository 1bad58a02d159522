"""Triton weight-only GEMMs on the stored layout: y[M, N] = x[M, K] @ dequant(W[N, K])^T (+ bias).

W is read as stored by ir.formats: int4/uint4 packed two per byte along K (element 2i in the low
nibble, int4 two's complement, odd K padded with a zero nibble), int8/uint8 or fp8 one per byte;
scales [N, G] (fp16/bf16/fp32), zero points [N, G] int32 for uint formats; the last group may be
short (ragged: masked, never read past K).

Three kernels, picked per call by layout.choose(M, N, K) (4-bit weights with K % 8 == 0 go to
the int32-word kernels of triton_words at small M, NF4 at every M):
  _wo_gemv_kernel   M tiny: CUDA-core dot products, [BLOCK_N, BLOCK_K] weight tile per step,
                    split-K over a grid axis; memory-bound, no tensor cores.
  _wo_mma_kernel    tensor cores: the codes tile is unpacked/dequantized in registers, then
                    tl.dot with the x tile; the group scale is applied once per K block to the
                    fp32 partial product (a K block never straddles a group). BLOCK_M=16 with
                    split-K serves small M ("splitk"), BLOCK_M 32..128 large M ("tiled").
  _dequant_kernel   very large M: write the 16-bit weight (a chunk of rows at a time, so the
                    scratch stays small) and let cuBLAS do the GEMM ("dequant_mm").
Split-K writes fp32 partials [S, M, N] that triton_splitk._splitk_reduce sums in a fixed order (deterministic).
This module imports triton at the top; backends/cuda/kernels.py imports it lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ir.quant_spec import QuantSpec
from . import layout, measured_dispatch
from .dequant_gemm import dequant_mm
from .hardware import sm_count
from .triton_splitk import _splitk_reduce

TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _codes(w_ptr, offs_n, k0, N, K, KB, stride_wn, BITS: tl.constexpr, SIGNED: tl.constexpr,
           FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] codes of W from column k0 (0 past N and K): int8 for signed formats,
    uint8 for unsigned, fp8 (bytes read as uint8, then bitcast: 0x00 is +0.0) for FP8 1=e4m3
    2=e5m2. KB = stored bytes per row, a separate argument so that the JIT sees it divisible
    by 16 and the mask stays uniform over 16-byte vectors (wide loads)."""
    if BITS == 4:
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        offs_b = tl.max_contiguous(tl.multiple_of(offs_b, BLOCK_K // 2), BLOCK_K // 2)
        mask = (offs_n[:, None] < N) & (offs_b[None, :] < KB)
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_b[None, :], mask=mask, other=0)
        if SIGNED:  # sign-extend each nibble with int8 shifts (Python ints stay int8)
            b = b.to(tl.int8, bitcast=True)
            lo = (b << 4) >> 4
            hi = b >> 4
        else:
            lo = b & 0xF
            hi = b >> 4
        codes = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # element 2i low, 2i+1 high
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_k = tl.max_contiguous(tl.multiple_of(offs_k, BLOCK_K), BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        codes = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0)
        if FP8 == 1:
            codes = codes.to(tl.float8e4nv, bitcast=True)
        elif FP8 == 2:
            codes = codes.to(tl.float8e5, bitcast=True)
        elif SIGNED:
            codes = codes.to(tl.int8, bitcast=True)
    return codes


@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, k0, N, GROUP, stride_sn, stride_sg, stride_zn, stride_zg,
                  ASYM: tl.constexpr):
    """Scale (fp32) and zero point (fp32; 0 when symmetric) of the group holding column k0."""
    g = k0 // GROUP
    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=offs_n < N, other=0).to(tl.float32)
    if ASYM:
        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=offs_n < N, other=0).to(tl.float32)
    else:
        z = tl.zeros_like(s)
    return s, z


@triton.jit(do_not_specialize=["M"])  # one compile for every M
def _wo_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, KB, GROUP, k_per_split,
                   stride_xm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_om,
                   BITS: tl.constexpr, SIGNED: tl.constexpr, FP8: tl.constexpr, ASYM: tl.constexpr,
                   HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   SWAP_AB: tl.constexpr, SCALE: tl.constexpr):
    """SWAP_AB computes out^T = W x^T: the dequantized tile is the MMA's A operand (registers
    on Hopper) and M is its N side, which suits small M. SCALE says where group scales apply:
    0 to each K block's fp32 product (exact; a second accumulator), 1 to the weight tile before
    the MMA (rounded to 16 bits like the reference op; one accumulator), 2 once at the end (one
    scale per row: per-channel / per-tensor)."""
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
    dot_dtype = x_ptr.dtype.element_ty
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = min(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        codes = _codes(w_ptr, offs_n, k0, N, K, KB, stride_wn, BITS, SIGNED, FP8, BLOCK_N,
                       BLOCK_K)
        s, z = _group_params(s_ptr, z_ptr, offs_n, k0, N, GROUP, stride_sn, stride_sg,
                             stride_zn, stride_zg, ASYM)
        if SCALE == 1:
            w = ((codes.to(tl.float32) - z[:, None]) * s[:, None]).to(dot_dtype)
        elif ASYM:  # unsigned codes go through fp32 (exact); |u - z| <= 255 fits fp16 and bf16
            w = (codes.to(tl.float32) - z[:, None]).to(dot_dtype)
        else:
            w = codes.to(dot_dtype)
        if SWAP_AB:
            if SCALE == 0:
                acc += tl.dot(w, tl.trans(x)) * s[:, None]
            else:
                acc = tl.dot(w, tl.trans(x), acc)
        else:
            if SCALE == 0:
                acc += tl.dot(x, tl.trans(w)) * s[None, :]
            else:
                acc = tl.dot(x, tl.trans(w), acc)
    if SCALE == 2:
        s_row = tl.load(s_ptr + offs_n * stride_sn, mask=offs_n < N, other=0).to(tl.float32)
        if SWAP_AB:
            acc = acc * s_row[:, None]
        else:
            acc = acc * s_row[None, :]
    if SWAP_AB:
        acc = tl.trans(acc)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT:  # fp32 partials [S, M, N]; bias and cast happen in _splitk_reduce
        tl.store(out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M"])  # one compile for every M
def _wo_gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, M, N, K, KB, GROUP, k_per_split,
                    stride_xm, stride_wn, stride_sn, stride_sg, stride_zn, stride_zg, stride_om,
                    BITS: tl.constexpr, SIGNED: tl.constexpr, FP8: tl.constexpr, ASYM: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = min(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        codes = _codes(w_ptr, offs_n, k0, N, K, KB, stride_wn, BITS, SIGNED, FP8, BLOCK_N,
                       BLOCK_K)
        s, z = _group_params(s_ptr, z_ptr, offs_n, k0, N, GROUP, stride_sn, stride_sg,
                             stride_zn, stride_zg, ASYM)
        w = codes.to(tl.float32)
        if ASYM:
            w = w - z[:, None]
        acc += tl.sum(w * x[None, :], axis=1) * s
    if SPLIT:
        tl.store(out_ptr + pid_k * M * N + m * N + offs_n, acc, mask=offs_n < N)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit(do_not_specialize=["n0", "N"])  # one compile for every M
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, n0, N, K, KB, GROUP,
                    stride_wn, stride_sn, stride_sg, stride_zn, stride_zg,
                    BITS: tl.constexpr, SIGNED: tl.constexpr, FP8: tl.constexpr, ASYM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Rows [n0, N) of W as 16-bit values, written to out[(n - n0), k] (row-major, ld = K).
    A block lies in one group. 4-bit codes are decoded in element order: element k reads byte
    k // 2 (neighbouring lanes share each byte's cache line) and takes the nibble at 4 * (k % 2),
    so no nibble interleave (join + reshape, a register shuffle) sits between the load and
    the wide 16-bit store; this kernel is bandwidth-bound (2.5 bytes moved per int4 weight)."""
    offs_n = n0 + tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if BITS == 4:
        b = tl.load(w_ptr + offs_n[:, None] * stride_wn + (offs_k // 2)[None, :], mask=mask,
                    other=0).to(tl.int32)
        shift = ((offs_k % 2) * 4)[None, :]
        if SIGNED:  # the byte's nibble moved to the top of an int32, then shifted back signed
            b = (b << (28 - shift)) >> 28
        else:
            b = (b >> shift) & 0xF
        codes = b.to(tl.float32)
    else:
        codes = _codes(w_ptr, offs_n, k0, N, K, KB, stride_wn, BITS, SIGNED, FP8, BLOCK_N,
                       BLOCK_K).to(tl.float32)
    s, z = _group_params(s_ptr, z_ptr, offs_n, k0, N, GROUP, stride_sn, stride_sg,
                         stride_zn, stride_zg, ASYM)
    w = (codes - z[:, None]) * s[:, None]
    tl.store(out_ptr + (offs_n - n0)[:, None] * K + offs_k[None, :],
             w.to(out_ptr.dtype.element_ty), mask=mask)


def scale_mode(group: int, k: int, plan: layout.Plan) -> int:
    """_wo_mma_kernel's SCALE: 2 one scale per row, else 1 scale the tile, 0 scale the product."""
    return 2 if group >= k else 1 if plan.scale_w else 0


def _operands(qweight, scales, zeros, spec: QuantSpec, n: int, k: int):
    """Arguments every path shares: (weight, zero points or a dummy, GROUP, strides, flags)."""
    fmt = spec.fmt
    if fmt.kind == "codebook":
        raise ValueError(f"{spec.format} weights run only on the 4-bit word kernels "
                         f"(layout.word_rejects says why they cannot take this one)")
    qweight = layout.weight_rows(qweight, spec, n, k)
    why = layout.group_rejects(spec)
    if why:
        raise ValueError(why)
    sn, sg = layout.scale_strides(scales, n)
    zt = zeros if zeros is not None else scales
    zn, zg = layout.scale_strides(zt, n)
    fp8 = {"fp8_e4m3": 1, "fp8_e5m2": 2}.get(spec.format, 0)
    flags = dict(BITS=fmt.bits, SIGNED=fmt.kind == "int" and fmt.qmin < 0, FP8=fp8,
                 ASYM=zeros is not None)
    w = qweight.view(torch.uint8)  # every format as bytes; the kernel reinterprets
    return w, zt, layout.kernel_group(spec, k), (sn, sg, zn, zg), flags


def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                       zeros: torch.Tensor | None, bias: torch.Tensor | None, spec: QuantSpec,
                       shape: list[int], plan: layout.Plan | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16) times the stored weight of `shape` [N, K]; `plan` forces a path,
    else the path measured fastest for this weight's key (measured_dispatch), else the M
    thresholds of layout.choose."""
    n, k = shape
    if x.dtype not in TORCH_TO_TL:
        raise TypeError(f"CUDA weight-only kernels take fp16/bf16 activations, got {x.dtype}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    group = layout.kernel_group(spec, k)
    if plan is None:
        shape_args = dict(bits=spec.fmt.bits, group=group, sm_count=sm_count(x.device),
                          fmt=spec.format)
        plan = (measured_dispatch.plan_for(measured_dispatch.key(
            x.device, spec, shape, zeros is not None, x.dtype), m, n, k, **shape_args)
            or layout.choose(m, n, k, **shape_args))
    if plan.path in layout.WORD_PATHS:
        from .triton_words import word_linear
        word_linear(x2, layout.weight_rows(qweight, spec, n, k), scales, zeros, bias, out,
                    spec.format, group, plan)
        return out.reshape(*x.shape[:-1], n)
    w, zt, group, (sn, sg, zn, zg), flags = _operands(qweight, scales, zeros, spec, n, k)
    b = bias if bias is not None else out
    if plan.path == "dequant_mm":
        _dequant_mm(x2, w, scales, zt, bias, out, n, k, group, (sn, sg, zn, zg), flags, plan)
        return out.reshape(*x.shape[:-1], n)
    per, splits = layout.k_blocks_per_split(k, plan.block_k, plan.split_k)
    split = splits > 1
    dst = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if split else out
    args = (x2, w, scales, zt, b, dst, m, n, k, w.shape[1], group, per * plan.block_k,
            x2.stride(0), w.stride(0), sn, sg, zn, zg, out.stride(0))
    if plan.path == "gemv":
        grid = (triton.cdiv(n, plan.block_n), splits, m)
        _wo_gemv_kernel[grid](*args, **flags, HAS_BIAS=bias is not None, SPLIT=split,
                              BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
                              num_warps=plan.num_warps, num_stages=plan.num_stages)
    else:
        grid = (triton.cdiv(m, plan.block_m) * triton.cdiv(n, plan.block_n), splits)
        _wo_mma_kernel[grid](*args, **flags, HAS_BIAS=bias is not None, SPLIT=split,
                             BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
                             GROUP_M=plan.group_m, SWAP_AB=plan.swap_ab,
                             SCALE=scale_mode(group, k, plan),
                             num_warps=plan.num_warps, num_stages=plan.num_stages)
    if split:
        block = 1024
        _splitk_reduce[(triton.cdiv(m * n, block),)](dst, b, out, m * n, n, splits,
                                                      HAS_BIAS=bias is not None, BLOCK=block)
    return out.reshape(*x.shape[:-1], n)


def dequantize_weight(qweight, scales, zeros, spec: QuantSpec, shape: list[int],
                      dtype: torch.dtype, rows: tuple[int, int] | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [r0, r1) of the 16-bit weight (all rows by default), as the reference dequantizes."""
    n, k = shape
    r0, r1 = rows or (0, n)
    w, zt, group, strides, flags = _operands(qweight, scales, zeros, spec, n, k)
    out = out if out is not None else torch.empty((r1 - r0, k), dtype=dtype, device=qweight.device)
    _launch_dequant(w, scales, zt, out, r0, r1, k, group, strides, flags)
    return out


def _launch_dequant(w, scales, zt, out, r0, r1, k, group, strides, flags) -> None:
    sn, sg, zn, zg = strides
    bn, bk = layout.dequant_tile(group, k)
    grid = (triton.cdiv(r1 - r0, bn), triton.cdiv(k, bk))
    _dequant_kernel[grid](w, scales, zt, out, r0, r1, k, w.shape[1], group, w.stride(0), sn, sg,
                          zn, zg, **flags, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)


def _dequant_mm(x2, w, scales, zt, bias, out, n, k, group, strides, flags, plan) -> None:
    """Dequantize + cuBLAS, chunk by chunk (dequant_gemm)."""
    dequant_mm(x2, bias, out, plan.chunk_n, plan.overlap,
               lambda r0, r1, dst: _launch_dequant(w, scales, zt, dst, r0, r1, k, group, strides,
                                                   flags))
