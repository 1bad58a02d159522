"""The int4 / uint4 decode GEMV in packed half-precision math ("gemv4h"): two weights per
instruction where triton_words._gemv_kernel spends three fp32 instructions on each.

A word (8 nibbles, element e in bits 4e..4e+3) gives four f16x2 pairs (e, e + 4) with one LOP3
each: (w & 0x000F000F) ^ 0x64006400 reads as the fp16 pair 1024 + u (fp16 spacing at 1024 is 1),
(w & 0x00F000F0) ^ ... as 1024 + 16u (still exact: 10 mantissa bits), and the same two masks on
w >> 8 give pairs (2, 6) and (3, 7). int4 flips each nibble's sign bit inside the same LOP3 (the
XOR constant carries it: 0x64086408, 0x64806480), so u = q + 8. One HADD2 / HFMA2 per pair turns
1024 + u into u - 8 (or u - zero point) exactly, and four HFMA2 multiply by the matching x pairs
and sum the word's 8 products in fp16: two sums of four; those are widened to fp32 and added to
the fp32 accumulator times the group scale, so fp16 rounding touches only 4 products at a time.

Accuracy: x enters fp16 (exact for 2**-17 <= |x| < 65504 in bf16, whose 8-bit significand fits
fp16's 11; below, bits under 2**-24 are lost), the weights as (u - 8) / 16 (exact), and the
4-product sums round to fp16's 11 bits (relative 2**-11 of a partial): h2_reference's model of it
is 3-4e-4 relative (rel_fro, K = 4096, random codes and x) before the bf16 output's own rounding
(~2e-3), where the fp32 kernel's is ~1e-7. Range: a 4-product partial is at most 4 * 8 * |x| / 16
= 2 |x|, so |x| up to 32752 stays finite (bf16 activations at the inputs of linears stay far
below). Per word: 1 SHF + 4 LOP3 + 4 HFMA2 + 4 HFMA2 + 2 HADD2.F32 + FADD + FFMA = 17
instructions for 8 weights, plus the x pairs (4 loads, 4 shifts / masks, 2 F2FP a word column,
shared by the rows a thread holds).

PAIR_RUNS (Plan.pair_runs): words 2j and 2j + 1 (adjacent in a thread's registers: the tile
split in place, no shuffle) share one fp16 run of 8 products a half: 30 instructions for 16
weights (the widening, FADD and FFMA once per two words; sm_90a, int4, BN=64 w=2: 359 SASS
instructions a K step against 393), partials up to 4 |x| (finite to |x| = 16376), ~1.4x the fp16
rounding error.
Activations are fp16 or bf16 (weight_only_linear takes no other), read as int32 words.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import layout
from .triton_splitk import _store_split

# XOR constants of the two pair masks: the fp16 magic 1024 (0x6400) in each half, and for int4 the
# sign bit of the masked nibble (bit 3 of the low pair, bit 7 of the in-place one).
MAGIC = {0: (0x64086408, 0x64806480), 1: (0x64006400, 0x64006400)}
PAIRS = ("a0", "a1", "a2", "a3")  # the four decoded f16x2 pairs of a word, as PTX registers
# k = fp16 1/16 and k2 = 1/256 in both halves (1024 + u -> 64 + u / 16; 1024 + 16u -> 4 + u / 16)
_SIXTEENTHS = "mov.b32 k, 0x2C002C00;\nmov.b32 k2, 0x1C001C00;\n"


def _nibble_pairs(word: str, xor_lo: str, xor_hi: str, off_lo: str, off_hi: str) -> str:
    """PTX: the 8 nibbles of `word` as four f16x2 pairs a0..a3, each by one LOP3 (mask, XOR into
    the fp16 magic 1024 + u, low nibble or 16 * u high) and one HFMA2 (k = 1/16 or k2 = 1/256, then
    the offset)."""
    return (f"lop3.b32 a0, {word}, 0x000F000F, {xor_lo}, 0x6A;\n"
            f"lop3.b32 a1, {word}, 0x00F000F0, {xor_hi}, 0x6A;\n"
            f"shr.u32 t, {word}, 8;\n"
            f"lop3.b32 a2, t, 0x000F000F, {xor_lo}, 0x6A;\n"
            f"lop3.b32 a3, t, 0x00F000F0, {xor_hi}, 0x6A;\n"
            f"fma.rn.f16x2 a0, a0, k, {off_lo};\n"
            f"fma.rn.f16x2 a1, a1, k2, {off_hi};\n"
            f"fma.rn.f16x2 a2, a2, k, {off_lo};\n"
            f"fma.rn.f16x2 a3, a3, k2, {off_hi};\n")


def _pair_products(a: tuple, xs: tuple, first: bool) -> str:
    """PTX: p (+)= the four weight pairs `a` * the four x pairs `xs`, in f16x2."""
    head = (f"mul.rn.f16x2 p, {a[0]}, {xs[0]};\n" if first
            else f"fma.rn.f16x2 p, {a[0]}, {xs[0]}, p;\n")
    return head + "".join(f"fma.rn.f16x2 p, {w}, {x}, p;\n" for w, x in zip(a[1:], xs[1:]))


def _widen_into(scale: str, acc: str) -> str:
    """PTX: $0 = acc + (p's two fp16 halves widened to fp32 and added) * scale."""
    return ("mov.b32 {l, h}, p;\ncvt.f32.f16 fl, l;\ncvt.f32.f16 fh, h;\nadd.f32 fl, fl, fh;\n"
            f"fma.rn.f32 $0, fl, {scale}, {acc};\n")


def _word_dot(n_words: int) -> str:
    """One asm block: n_words words ($1..), each with its four x pairs (the next 4 * n_words
    operands), decoded and multiplied in one fp16 run, its two halves widened to fp32 and added,
    then $0 = acc + run * scale; after the pairs: XOR lo / hi, offset lo / hi, scale, acc."""
    c = 1 + 5 * n_words
    words, xs = tuple(f"${i}" for i in range(1, 1 + n_words)), tuple(f"${i}" for i in range(1 + n_words, c))
    xor_lo, xor_hi, off_lo, off_hi, scale, acc = (f"${c + i}" for i in range(6))
    body = "".join(_nibble_pairs(w, xor_lo, xor_hi, off_lo, off_hi)
                   + _pair_products(PAIRS, xs[4 * j:4 * j + 4], j == 0) for j, w in enumerate(words))
    return ("{\n.reg .b32 t, a0, a1, a2, a3, p, k, k2;\n.reg .b16 l, h;\n.reg .f32 fl, fh;\n"
            + _SIXTEENTHS + body + _widen_into(scale, acc) + "}")


def _decode() -> str:
    """One asm block: $0..$3 = the four f16x2 pairs of word $4 (XOR lo / hi $5, $6, offsets $7,
    $8), for kernels that multiply one decoded word by several rows of x."""
    return ("{\n.reg .b32 t, a0, a1, a2, a3, k, k2;\n" + _SIXTEENTHS
            + _nibble_pairs("$4", "$5", "$6", "$7", "$8")
            + "".join(f"mov.b32 ${i}, a{i};\n" for i in range(4)) + "}")


def _row_dot(n_words: int) -> str:
    """One asm block: $0 = acc + scale * (the decoded pairs of n_words words, $1.. four a word,
    times the matching x pairs, the next 4 * n_words operands, in one fp16 run); then scale, acc."""
    c = 1 + 8 * n_words
    a = tuple(f"${i}" for i in range(1, 1 + 4 * n_words))
    xs = tuple(f"${i}" for i in range(1 + 4 * n_words, c))
    body = "".join(_pair_products(a[4 * j:4 * j + 4], xs[4 * j:4 * j + 4], j == 0)
                   for j in range(n_words))
    return ("{\n.reg .b32 p;\n.reg .b16 l, h;\n.reg .f32 fl, fh;\n" + body
            + _widen_into(f"${c}", f"${c + 1}") + "}")


# _DECODE_ASM / _ROW_ASM / _ROW_PAIR_ASM: the same arithmetic split in two, for ROWS > 1.
_DECODE_ASM = tl.constexpr(_decode())
_ROW_ASM = tl.constexpr(_row_dot(1))
_ROW_PAIR_ASM = tl.constexpr(_row_dot(2))
# _WORD_ASM: $0 out fp32; $1 word; $2..$5 x pairs (q, q+4) / 16 as f16x2; $6, $7 the XOR constants;
# $8 -(1024 + off) and $9 -(64 + off) as f16x2; $10 the group scale * 16; $11 the accumulator.
# _PAIR_ASM: $1, $2 the two words, $3..$6 and $7..$10 their x pairs, then as _WORD_ASM's $6..$11.
# lop3 0x6A: (a & b) ^ c.
_WORD_ASM = tl.constexpr(_word_dot(1))
_PAIR_ASM = tl.constexpr(_word_dot(2))
# Two int32 words a = (x[2i], x[2i+1]), b = (x[2i+4], x[2i+5]) of 16-bit x -> the pairs
# (x[2i], x[2i+4]) and (x[2i+1], x[2i+5]) as f16x2. bf16 widens exactly to fp32 by a shift.
_BF16_PAIRS = tl.constexpr("""{
.reg .b32 al, ah, bl, bh;
shl.b32 al, $2, 16;
and.b32 ah, $2, 0xFFFF0000;
shl.b32 bl, $3, 16;
and.b32 bh, $3, 0xFFFF0000;
cvt.rn.f16x2.f32 $0, bl, al;
cvt.rn.f16x2.f32 $1, bh, ah;
}""")
_F16_PAIRS = tl.constexpr("prmt.b32 $0, $2, $3, 0x5410; prmt.b32 $1, $2, $3, 0x7632;")


@triton.jit
def _x_pairs(x_ptr, cols, ok, BF16: tl.constexpr, EVEN: tl.constexpr):
    """x of word columns `cols` as the four f16x2 pairs (x[8j + q], x[8j + q + 4]), low half
    x[8j + q]. x is read as int32 words (elements 2i, 2i + 1): words 4j + i and 4j + 2 + i
    hold pairs 2i and 2i + 1 (bf16: widened by a shift or a mask, then F2FP; fp16: one PRMT)."""
    xw = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + cols * 4
    if EVEN:
        a0, a1, b0, b1 = tl.load(xw), tl.load(xw + 1), tl.load(xw + 2), tl.load(xw + 3)
    else:
        a0 = tl.load(xw, mask=ok, other=0)
        a1 = tl.load(xw + 1, mask=ok, other=0)
        b0 = tl.load(xw + 2, mask=ok, other=0)
        b1 = tl.load(xw + 3, mask=ok, other=0)
    if BF16:  # bf16 -> fp32 (exact) -> fp16
        x0, x1 = tl.inline_asm_elementwise(_BF16_PAIRS, "=r,=r,r,r", [a0, b0],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        x2, x3 = tl.inline_asm_elementwise(_BF16_PAIRS, "=r,=r,r,r", [a1, b1],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        x0, x1 = tl.inline_asm_elementwise(_F16_PAIRS, "=r,=r,r,r", [a0, b0],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        x2, x3 = tl.inline_asm_elementwise(_F16_PAIRS, "=r,=r,r,r", [a1, b1],
                                           dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    return x0, x1, x2, x3


@triton.jit
def _f16x2(v):
    """fp32 v as the f16x2 pair (v, v)."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $1;", "=r,f", [v],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _offsets(BLOCK_N: tl.constexpr):
    """int4's two decode offsets, -(1024 + 8) / 16 and -(64 + 8) / 16, as f16x2 per row."""
    return (_f16x2(tl.full((BLOCK_N,), -1032.0 / 16, tl.float32)),
            _f16x2(tl.full((BLOCK_N,), -72.0 / 16, tl.float32)))


@triton.jit
def _group(s_ptr, z_ptr, offs_n, n_ok, g, stride_sn, stride_sg, stride_zn, stride_zg, off_a, off_b,
           KIND: tl.constexpr):
    """Group g's scale per row in fp32 and the decode offsets: int4's as given, uint4's from the
    group's zero points."""
    s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=n_ok, other=0).to(tl.float32)
    if KIND != 0:
        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=n_ok, other=0)
        z = z.to(tl.float32)
        off_a = _f16x2((-1024.0 - z) / 16)
        off_b = _f16x2((-64.0 - z) / 16)
    return s, off_a, off_b


@triton.jit
def _decoded(w, xor_a, xor_b, off_a, off_b):
    """The four f16x2 pairs of every word of the [rows, cols] tile w (offsets per row)."""
    return tl.inline_asm_elementwise(_DECODE_ASM, "=r,=r,=r,=r,r,r,r,r,r",
                                     [w, xor_a, xor_b, off_a[:, None], off_b[:, None]],
                                     dtype=(tl.int32,) * 4, is_pure=True, pack=1)


@triton.jit
def _words(w_rows, cols, n_ok, hi, EVEN: tl.constexpr):
    """The [rows, cols] word tile; past `hi` (only where not EVEN) zero: 0 * x, x finite."""
    if EVEN:
        return tl.load(w_rows + cols[None, :], mask=n_ok[:, None], other=0)
    return tl.load(w_rows + cols[None, :], mask=n_ok[:, None] & (cols < hi)[None, :], other=0)


@triton.jit(do_not_specialize=["M"])
def _gemv_h2_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, KW,
                    group_shift, words_per_split, S, xor_a, xor_b, stride_xm, stride_wn, stride_sn,
                    stride_sg, stride_zn, stride_zg, stride_om, KIND: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_KW: tl.constexpr, PREFETCH: tl.constexpr, PAIR_RUNS: tl.constexpr,
                    BF16: tl.constexpr, EVEN: tl.constexpr):
    """One row of x per program, [BLOCK_N, BLOCK_KW] words per step, split-K as _gemv_kernel.
    xor_a / xor_b (MAGIC[KIND]) come as arguments so that each LOP3 keeps one immediate; the
    group of word w0 is w0 >> group_shift (groups are powers of two); EVEN: KW % BLOCK_KW == 0,
    so no K mask (every split then holds whole blocks). PAIR_RUNS: words 2j, 2j + 1 of the block
    in one fp16 run. PREFETCH: the next block's
    words are loaded before this block's math; on the split's last block that is this block
    again (an L1 hit), never past `hi`."""
    m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    HALF: tl.constexpr = BLOCK_KW // 2 if PAIR_RUNS else BLOCK_KW
    offs_j = tl.arange(0, BLOCK_KW)
    acc = tl.zeros((BLOCK_N, HALF), dtype=tl.float32)
    lo = pid_k * words_per_split
    hi = min(lo + words_per_split, KW)
    xa = tl.full((BLOCK_N, HALF), xor_a, tl.int32)
    xb = tl.full((BLOCK_N, HALF), xor_b, tl.int32)
    off_a, off_b = _offsets(BLOCK_N)   # int4's; uint4's come per group from its zero points
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    x_row = x_ptr + m * stride_xm
    if PREFETCH:
        w_next = _words(w_rows, lo + offs_j, n_ok, hi, EVEN)
    for w0 in range(lo, hi, BLOCK_KW):
        if PREFETCH:
            # EVEN loads carry no K mask: the last block prefetches itself, not the next split
            nxt = min(w0 + BLOCK_KW, hi - BLOCK_KW) if EVEN else w0 + BLOCK_KW
            w = w_next
            w_next = _words(w_rows, nxt + offs_j, n_ok, hi, EVEN)
        else:
            w = _words(w_rows, w0 + offs_j, n_ok, hi, EVEN)
        s, off_a, off_b = _group(s_ptr, z_ptr, offs_n, n_ok, w0 >> group_shift, stride_sn,
                                 stride_sg, stride_zn, stride_zg, off_a, off_b, KIND)
        if PAIR_RUNS:
            wa, wb = tl.split(tl.reshape(w, (BLOCK_N, HALF, 2)))
            ca = w0 + 2 * tl.arange(0, HALF)
            x0, x1, x2, x3 = _x_pairs(x_row, ca, ca < hi, BF16, EVEN)
            y0, y1, y2, y3 = _x_pairs(x_row, ca + 1, ca + 1 < hi, BF16, EVEN)
            acc = tl.inline_asm_elementwise(
                _PAIR_ASM, "=f,r,r,r,r,r,r,r,r,r,r,r,r,r,r,f,f",
                [wa, wb, x0[None, :], x1[None, :], x2[None, :], x3[None, :], y0[None, :],
                 y1[None, :], y2[None, :], y3[None, :], xa, xb, off_a[:, None], off_b[:, None],
                 (s * 16.0)[:, None], acc],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            cols = w0 + offs_j
            x0, x1, x2, x3 = _x_pairs(x_row, cols, cols < hi, BF16, EVEN)
            acc = tl.inline_asm_elementwise(
                _WORD_ASM, "=f,r,r,r,r,r,r,r,r,r,f,f",
                [w, x0[None, :], x1[None, :], x2[None, :], x3[None, :], xa, xb, off_a[:, None],
                 off_b[:, None], (s * 16.0)[:, None], acc],
                dtype=tl.float32, is_pure=True, pack=1)
    _store_split(tl.sum(acc, axis=1), ws_ptr, cnt_ptr, b_ptr, out_ptr, m * N + offs_n,
                 m * stride_om + offs_n, offs_n, n_ok, M * N, S, pid_k, pid_n * M + m, SPLIT, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def _gemv_h2_rows_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, KW,
                         group_shift, words_per_split, S, xor_a, xor_b, stride_xm, stride_wn,
                         stride_sn, stride_sg, stride_zn, stride_zg, stride_om, KIND: tl.constexpr,
                         HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, PAIR_RUNS: tl.constexpr,
                         BF16: tl.constexpr, EVEN: tl.constexpr):
    """_gemv_h2_kernel for ROWS rows of x a program (Plan.block_m): each weight tile is loaded and
    decoded once (_DECODE_ASM) and multiplied with every row's x pairs (_ROW_ASM), so at M = 8 a
    word costs 9 decode instructions + 8 x 8 for the products, where one row a program spends 17
    on each row and reads the weight 8 times. Same per-element arithmetic as _gemv_h2_kernel;
    rows past M read row M - 1 and store nothing."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    rows = pid_m * ROWS + tl.arange(0, ROWS)
    x_rows = (x_ptr + tl.minimum(rows, M - 1) * stride_xm)[:, None]
    HALF: tl.constexpr = BLOCK_KW // 2 if PAIR_RUNS else BLOCK_KW
    offs_j = tl.arange(0, BLOCK_KW)
    acc = tl.zeros((ROWS, BLOCK_N, HALF), dtype=tl.float32)
    lo = pid_k * words_per_split
    hi = min(lo + words_per_split, KW)
    xa = tl.full((BLOCK_N, HALF), xor_a, tl.int32)
    xb = tl.full((BLOCK_N, HALF), xor_b, tl.int32)
    off_a, off_b = _offsets(BLOCK_N)   # int4's; uint4's come per group from its zero points
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    for w0 in range(lo, hi, BLOCK_KW):
        w = _words(w_rows, w0 + offs_j, n_ok, hi, EVEN)
        s, off_a, off_b = _group(s_ptr, z_ptr, offs_n, n_ok, w0 >> group_shift, stride_sn,
                                 stride_sg, stride_zn, stride_zg, off_a, off_b, KIND)
        scale = (s * 16.0)[None, :, None]
        if PAIR_RUNS:
            wa, wb = tl.split(tl.reshape(w, (BLOCK_N, HALF, 2)))
            a0, a1, a2, a3 = _decoded(wa, xa, xb, off_a, off_b)
            b0, b1, b2, b3 = _decoded(wb, xa, xb, off_a, off_b)
            ca = (w0 + 2 * tl.arange(0, HALF))[None, :]
            x0, x1, x2, x3 = _x_pairs(x_rows, ca, ca < hi, BF16, EVEN)
            y0, y1, y2, y3 = _x_pairs(x_rows, ca + 1, ca + 1 < hi, BF16, EVEN)
            acc = tl.inline_asm_elementwise(
                _ROW_PAIR_ASM, "=f" + ",r" * 16 + ",f,f",
                [a0[None], a1[None], a2[None], a3[None], b0[None], b1[None], b2[None], b3[None],
                 x0[:, None], x1[:, None], x2[:, None], x3[:, None], y0[:, None], y1[:, None],
                 y2[:, None], y3[:, None], scale, acc],
                dtype=tl.float32, is_pure=True, pack=1)
        else:
            a0, a1, a2, a3 = _decoded(w, xa, xb, off_a, off_b)
            cols = (w0 + offs_j)[None, :]
            x0, x1, x2, x3 = _x_pairs(x_rows, cols, cols < hi, BF16, EVEN)
            acc = tl.inline_asm_elementwise(
                _ROW_ASM, "=f" + ",r" * 8 + ",f,f",
                [a0[None], a1[None], a2[None], a3[None], x0[:, None], x1[:, None], x2[:, None],
                 x3[:, None], scale, acc], dtype=tl.float32, is_pure=True, pack=1)
    _store_split(tl.sum(acc, axis=2), ws_ptr, cnt_ptr, b_ptr, out_ptr,
                 rows[:, None] * N + offs_n[None, :], rows[:, None] * stride_om + offs_n[None, :],
                 rows[:, None] * 0 + offs_n[None, :], (rows < M)[:, None] & n_ok[None, :], M * N,
                 S, pid_k, pid_n * tl.num_programs(0) + pid_m, SPLIT, HAS_BIAS)


def gemv_h2(x2: torch.Tensor, w: torch.Tensor, args: tuple, flags: dict, grid: tuple, fmt: str,
            group: int, bkw: int, plan: layout.Plan) -> None:
    """Launch _gemv_h2_kernel (plan.block_m == 1) or _gemv_h2_rows_kernel (block_m rows of x a
    program) with triton_words.word_linear's arguments (`args`, `flags`, the [N, K/8] int32
    words `w`): the group becomes a shift, the 2**23 magic the XOR constants."""
    if fmt not in layout.H2_FORMATS:
        raise ValueError(f"gemv4h runs {'/'.join(layout.H2_FORMATS)} weights, not {fmt}")
    if x2.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"gemv4h: x dtype {x2.dtype} is not float16 / bfloat16")
    if plan.pair_runs and bkw % 2:
        raise ValueError(f"gemv4h pair_runs: block_k {plan.block_k} is not a multiple of 16")
    rows = plan.block_m
    if rows < 1 or rows & (rows - 1) or (rows > 1 and plan.prefetch):
        raise ValueError(f"gemv4h: block_m {rows} must be a power of two, and 1 with prefetch")
    if x2.stride(0) % 2 or x2.data_ptr() % 4:  # read as int32 words
        x2 = x2.clone()
    kind = 0 if fmt == "int4" else 1
    (_, _, s, z, _, b, out, ws, cnt, m, n, kw, _, per_words, splits, _, _, swn, sn, sg, zn, zg,
     so) = args
    shift = (group // 8).bit_length() - 1
    common = (x2, w, s, z, b, out, ws, cnt, m, n, kw, shift, per_words, splits, *MAGIC[kind],
              x2.stride(0), swn, sn, sg, zn, zg, so)
    tail = dict(flags, PAIR_RUNS=plan.pair_runs, BF16=x2.dtype == torch.bfloat16,
                EVEN=kw % bkw == 0)
    if rows == 1:
        _gemv_h2_kernel[grid](*common, **tail, PREFETCH=plan.prefetch)
    else:
        _gemv_h2_rows_kernel[grid](*common, **tail, ROWS=rows)
