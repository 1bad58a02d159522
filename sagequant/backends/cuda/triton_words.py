"""4-bit weight-only GEMMs that read the packed weight as int32 words: int4, uint4 and NF4.

Viewed as little-endian int32, word j of a row holds elements 8j..8j+7, element 8j+p in bits
4p..4p+3 (ir.formats packs element 2i in the low nibble of byte i), so a [N, K/2] uint8 weight
is a free [N, K/8] int32 view when K % 8 == 0: 16-byte loads carry 32 weights.

A nibble u becomes a float without an integer-to-float conversion: OR-ed into the mantissa of
2**23 it reads as the fp32 2**23 + u exactly, and one subtraction leaves u - 8 (int4, whose words
are XOR-ed with 0x88888888 first: q + 8 == q ^ 8 on a nibble) or u - zero point (uint4). The
GEMV masks the nibble in place instead of shifting it down (bits 4q..4q+3 of the word or of the
word shifted by 16, q = p % 4), which reads as 2**23 + u * 16**q, and divides x by 16**q
(exact); the MMA kernel does the same where Plan.in_place (bf16 x: fp16 has not the range). The
magic 2**23 is a kernel argument so that mask and OR are one LOP3. NF4 looks u up in its
16-entry code book (L1-resident). Group scales multiply the fp32 partial sum of each K block (a
block never straddles a group), so the arithmetic before them is exact.

  _gemv_kernel  M = 1: CUDA-core dot products, [BLOCK_N, BLOCK_KW] words per step, split-K.
  _dequant_kernel  large M: the 16-bit weight, chunk by chunk, for cuBLAS ("dequant4_mm").
  _mma_kernel   small M: the 8 nibble planes of a word tile feed tensor-core dots against
                the matching x columns (x[8j + p] for plane p), swap-AB (M is the MMA's N
                side), split-K; the same kernel tiles any M.
Split-K writes fp32 partials [S, M, N] summed in a fixed order (deterministic) either by the
GEMM's own last-arriving program (SPLIT=2, triton_splitk._last_split_sums: no second launch) or
by triton_splitk._splitk_reduce (SPLIT=1, Plan.launch_reduce). This module imports triton at the
top; kernels.py imports it lazily.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import layout
from .dequant_gemm import dequant_mm
from .triton_gemv_h2 import gemv_h2
from .triton_splitk import _splitk_reduce, _store_split, tile_counters

KINDS = {"int4": 0, "uint4": 1, "nf4": 2}
MAGIC = 0x4B000000  # OR-ed into a nibble, the fp32 2**23 + nibble (a kernel argument: see _plane)


@triton.jit
def _pow16(Q: tl.constexpr):
    if Q == 0:
        return 1.0
    elif Q == 1:
        return 16.0
    elif Q == 2:
        return 256.0
    else:
        return 4096.0


@triton.jit
def _plane(w, w_hi, P: tl.constexpr, z, book_ptr, magic, KIND: tl.constexpr,
           SCALED: tl.constexpr):
    """Nibble P of every word as fp32. SCALED: times 16**(P % 4) for int4/uint4, the caller
    dividing x by it (exact in fp32 and bf16, not fp16's range); masking in place saves the shift
    per nibble (44 against 47 µs on gate_up, H100). Unscaled: shifted down first. w is
    pre-flipped for int4, w_hi = w >> 16 (read only when SCALED), z the zero points. magic is
    0x4B000000 passed at run time: as a register, the in-place mask and OR fuse into one LOP3
    (ptxas takes one immediate per LOP3; sm_90a SASS of the GEMV's K loop, BN=128: 157 LOP3
    against 261). The shifted form keeps the immediate (no fewer instructions either way)."""
    if KIND == 2:
        return tl.load(book_ptr + ((w >> (4 * P)) & 0xF))
    off = 8.0 if KIND == 0 else z
    if SCALED:
        Q: tl.constexpr = P % 4
        src = w if P < 4 else w_hi
        f = ((src & (0xF << (4 * Q))) | magic).to(tl.float32, bitcast=True)
        return f - (8388608.0 + off * _pow16(Q))
    f = (((w >> (4 * P)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
    return f - (8388608.0 + off)


@triton.jit
def _x_plane(x, P: tl.constexpr, KIND: tl.constexpr):
    """x for plane P in fp32, divided by the plane's 16**(P % 4) (NF4: unscaled)."""
    if KIND == 2:
        return x.to(tl.float32)
    return x.to(tl.float32) * (1.0 / _pow16(P % 4))


@triton.jit
def _group(s_ptr, z_ptr, offs_n, n_ok, g, stride_sn, stride_sg, stride_zn, stride_zg,
           KIND: tl.constexpr):
    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0).to(tl.float32)
    if KIND == 1:
        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_ok, other=0).to(tl.float32)
    else:
        z = s
    return s, z


@triton.jit
def _words(w_ptr, offs_n, n_ok, cols, hi, stride_wn, KIND: tl.constexpr):
    """The [rows, cols] word tile (zero past `hi`), int4 pre-flipped."""
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :],
                mask=n_ok[:, None] & (cols < hi)[None, :], other=0)
    if KIND == 0:
        w = w ^ -2004318072  # 0x88888888: flip the sign bit of all 8 nibbles
    return w


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, book_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, KW,
                 GROUP, words_per_split, S, magic, stride_xm, stride_wn, stride_sn, stride_sg,
                 stride_zn, stride_zg, stride_om, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                 PREFETCH: tl.constexpr):
    """One row of x per program. PREFETCH loads the next K block's words before this block's
    arithmetic (num_stages leaves this loop's loads unpipelined)."""
    m = tl.program_id(0)  # fastest: the M programs of one weight tile run together (L2 reuse)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_j = tl.arange(0, BLOCK_KW)
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    lo = pid_k * words_per_split
    hi = min(lo + words_per_split, KW)
    if PREFETCH:
        w_next = _words(w_ptr, offs_n, n_ok, lo + offs_j, hi, stride_wn, KIND)
    for w0 in range(lo, hi, BLOCK_KW):
        cols = w0 + offs_j
        c_ok = cols < hi
        if PREFETCH:
            w = w_next
            w_next = _words(w_ptr, offs_n, n_ok, cols + BLOCK_KW, hi, stride_wn, KIND)
        else:
            w = _words(w_ptr, offs_n, n_ok, cols, hi, stride_wn, KIND)
        w_hi = w >> 16
        s, z = _group(s_ptr, z_ptr, offs_n, n_ok, (w0 * 8) // GROUP, stride_sn, stride_sg,
                      stride_zn, stride_zg, KIND)
        blk = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
        for p in tl.static_range(8):
            xp = tl.load(x_ptr + m * stride_xm + cols * 8 + p, mask=c_ok, other=0.0)
            wp = _plane(w, w_hi, p, z[:, None], book_ptr, magic, KIND, True)
            blk += wp * _x_plane(xp, p, KIND)[None, :]
        acc += blk * s[:, None]
    _store_split(tl.sum(acc, axis=1), ws_ptr, cnt_ptr, b_ptr, out_ptr, m * N + offs_n,
                 m * stride_om + offs_n, offs_n, n_ok, M * N, S, pid_k, pid_n * M + m, SPLIT, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def _mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, book_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, KW,
                GROUP, words_per_split, S, magic, stride_xm, stride_wn, stride_sn, stride_sg,
                stride_zn, stride_zg, stride_om, KIND: tl.constexpr, HAS_BIAS: tl.constexpr,
                SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_KW: tl.constexpr, IN_PLACE: tl.constexpr):
    """IN_PLACE (bf16 / fp32 x): planes masked in place, x divided by 16**(P % 4) (exact)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    m_ok = offs_m < M
    offs_j = tl.arange(0, BLOCK_KW)
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    lo = pid_k * words_per_split
    hi = min(lo + words_per_split, KW)
    for w0 in range(lo, hi, BLOCK_KW):
        cols = w0 + offs_j
        c_ok = cols < hi
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :],
                    mask=n_ok[:, None] & c_ok[None, :], other=0)
        if KIND == 0:
            w = w ^ -2004318072  # 0x88888888: flip the sign bit of all 8 nibbles
        s, z = _group(s_ptr, z_ptr, offs_n, n_ok, (w0 * 8) // GROUP, stride_sn, stride_sg,
                      stride_zn, stride_zg, KIND)
        w_hi = w >> 16 if IN_PLACE else w
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for p in tl.static_range(8):
            xp = tl.load(x_ptr + offs_m[None, :] * stride_xm + cols[:, None] * 8 + p,
                         mask=m_ok[None, :] & c_ok[:, None], other=0.0)
            if IN_PLACE:
                xp = _x_plane(xp, p, KIND).to(dot_dtype)
            wp = _plane(w, w_hi, p, z[:, None], book_ptr, magic, KIND, IN_PLACE).to(dot_dtype)
            part = tl.dot(wp, xp, part)
        acc += part * s[:, None]
    acc = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    mask = m_ok[:, None] & n_ok[None, :]
    _store_split(acc, ws_ptr, cnt_ptr, b_ptr, out_ptr, offs_m[:, None] * N + offs_n[None, :],
                 offs_m[:, None] * stride_om + offs_n[None, :], offs_m[:, None] * 0 + offs_n[None, :],
                 mask, M * N, S, pid_k, pid_m * tl.num_programs(0) + pid_n, SPLIT, HAS_BIAS)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, book_ptr, out_ptr, N, KW, GROUP, stride_wn, stride_sn,
                    stride_sg, stride_zn, stride_zg, KIND: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_KW: tl.constexpr):
    """16-bit W[n, k] (row-major, ld = K) from the words. Each word's 8 nibbles are decoded
    along a third axis of 8 ([BLOCK_N, BLOCK_KW, 8]) that the compiler keeps inside one thread,
    so that axis reshaped into K is each thread's 8 consecutive outputs: one 16-byte store per
    word and no shuffle between decode and store (the join tree this replaces put plane i at
    element bitrev3(i), which cost a shared-memory transpose of every output). The weight is
    read once: evict-first keeps L2 for the scratch that cuBLAS reads next."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    w0 = tl.program_id(1) * BLOCK_KW
    cols = w0 + tl.arange(0, BLOCK_KW)
    n_ok = offs_n < N
    w = tl.load(w_ptr + offs_n[:, None] * stride_wn + cols[None, :],
                mask=n_ok[:, None] & (cols < KW)[None, :], other=0, eviction_policy="evict_first")
    if KIND == 0:
        w = w ^ -2004318072
    s, z = _group(s_ptr, z_ptr, offs_n, n_ok, (w0 * 8) // GROUP, stride_sn, stride_sg,
                  stride_zn, stride_zg, KIND)
    u = (w[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF
    if KIND == 2:
        f = tl.load(book_ptr + u)
    else:  # 2**23 + u read back as fp32, minus 2**23 + the offset: u - 8 (int4) or u - z, exact
        off = 8.0 if KIND == 0 else z[:, None, None]
        f = (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + off)
    vals = tl.reshape(f, (BLOCK_N, BLOCK_KW * 8)) * s[:, None]
    offs_k = w0 * 8 + tl.arange(0, BLOCK_KW * 8)
    tl.store(out_ptr + offs_n[:, None] * (KW * 8) + offs_k[None, :],
             vals.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & (offs_k[None, :] < KW * 8))


_BOOKS: dict = {}


def _book(device: torch.device) -> torch.Tensor:
    """The NF4 code book as fp32 on `device` (one copy per device, made outside any graph)."""
    if device not in _BOOKS:
        from ...ir.formats import NF4_CODEBOOK
        _BOOKS[device] = torch.tensor(NF4_CODEBOOK, dtype=torch.float32, device=device)
    return _BOOKS[device]


def word_linear(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                zeros: torch.Tensor | None, bias: torch.Tensor | None, out: torch.Tensor,
                fmt: str, group: int, plan: layout.Plan) -> None:
    """out[M, N] = x2[M, K] @ dequant(W)^T (+ bias) for a 4-bit weight stored [N, K/2] uint8;
    plan.path is "gemv4", "gemv4h" (int4/uint4), "mma4" or "dequant4_mm"; plan.block_k counts
    elements (8 per word).
    Split-K partials are summed by the GEMM's last program, or by _splitk_reduce where
    plan.launch_reduce: the same sums, bit for bit."""
    m, k = x2.shape
    n = out.shape[1]
    if plan.path == "dequant4_mm":
        _dequant_mm(x2, qweight, scales, zeros, bias, out, fmt, group, plan)
        return
    why = layout.word_rejects(fmt, k, group, plan.block_k)
    if why:
        raise ValueError(why)
    w = qweight.view(torch.uint8).view(torch.int32)  # [N, K/8]; the view checks alignment
    kw, bkw = k // 8, plan.block_k // 8
    per, splits = layout.k_blocks_per_split(kw, bkw, plan.split_k)
    tiles = triton.cdiv(n, plan.block_n)
    gemv = plan.path in ("gemv4", "gemv4h")
    m_tiles = m if plan.path == "gemv4" else triton.cdiv(m, plan.block_m)  # gemv4h: block_m rows
    grid = (m, tiles, splits) if gemv else (tiles, splits, m_tiles)
    mode = 0 if splits == 1 else 1 if plan.launch_reduce else 2
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=x2.device) if mode else out
    counters = tile_counters(x2.device, tiles * m_tiles) if mode == 2 else ws
    sn, sg = layout.scale_strides(scales, n)
    zt = zeros if zeros is not None else scales
    zn, zg = layout.scale_strides(zt, n)
    book = _book(x2.device) if fmt == "nf4" else scales
    b = bias if bias is not None else out
    args = (x2, w, scales, zt, book, b, out, ws, counters, m, n, kw, group, per * bkw, splits,
            MAGIC, x2.stride(0), w.stride(0), sn, sg, zn, zg, out.stride(0))
    flags = dict(KIND=KINDS[fmt], HAS_BIAS=bias is not None, SPLIT=mode, BLOCK_N=plan.block_n,
                 BLOCK_KW=bkw, num_warps=plan.num_warps, num_stages=plan.num_stages)
    if plan.path == "gemv4h":
        gemv_h2(x2, w, args, flags, grid, fmt, group, bkw, plan)
    elif plan.path == "gemv4":
        _gemv_kernel[grid](*args, **flags, PREFETCH=plan.prefetch)
    else:
        _mma_kernel[grid](*args, **flags, BLOCK_M=plan.block_m,
                          IN_PLACE=plan.in_place and x2.dtype != torch.float16)  # fp16: range
    if mode == 1:
        _splitk_reduce[(triton.cdiv(m * n, 1024),)](ws, b, out, m * n, n, splits,
                                                     HAS_BIAS=bias is not None, BLOCK=1024)


def dequantize_words(qweight, scales, zeros, fmt: str, group: int, rows: tuple[int, int], k: int,
                     out: torch.Tensor) -> torch.Tensor:
    """Rows [r0, r1) of the 16-bit weight into `out` [r1 - r0, K] (dtype of out)."""
    r0, r1 = rows
    bn, bk = layout.dequant_tile(group, k)
    why = layout.word_rejects(fmt, k, group, bk)
    if why:
        raise ValueError(why)
    w = qweight.view(torch.uint8).view(torch.int32)[r0:r1]
    rows_of = lambda t: t[r0:r1] if t.shape[0] > 1 else t  # noqa: E731  (per-tensor: one row)
    sc = rows_of(scales)
    zt = rows_of(zeros) if zeros is not None else sc
    sn, sg = layout.scale_strides(sc, r1 - r0)
    zn, zg = layout.scale_strides(zt, r1 - r0)
    book = _book(out.device) if fmt == "nf4" else sc
    grid = (triton.cdiv(r1 - r0, bn), triton.cdiv(k // 8, bk // 8))
    _dequant_kernel[grid](w, sc, zt, book, out, r1 - r0, k // 8, group, w.stride(0), sn, sg, zn,
                          zg, KIND=KINDS[fmt], BLOCK_N=bn, BLOCK_KW=bk // 8, num_warps=4)
    return out


def _dequant_mm(x2, qweight, scales, zeros, bias, out, fmt, group, plan) -> None:
    """Large M: dequantize + cuBLAS, chunk by chunk (dequant_gemm)."""
    k = x2.shape[1]
    if fmt == "nf4":
        _book(x2.device)  # made before any side stream or graph capture uses it
    dequant_mm(x2, bias, out, plan.chunk_n, plan.overlap,
               lambda r0, r1, dst: dequantize_words(qweight, scales, zeros, fmt, group, (r0, r1),
                                                    k, dst))
