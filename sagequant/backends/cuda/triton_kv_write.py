"""Triton decode-step write into a quantized paged KV cache (imports triton: load through fused.py).

One launch per layer and step does what PagedKVPool.write_decode does with ~30 ATen kernels per
k and v: for each (row, kv head, k or v) a program stores the new token into its row of the
open block's 16-bit tail and checks the token's scales; the write that fills the block (offset
block_size - 1) also quantizes it with its own absmax per channel group (the scale rounded to
the scale dtype with a floor at its smallest normal, int8 codes rounded half-even, fp8 codes
saturated at 448: quantize_blocks' numerics) and stores codes and scales. With cos / sin it also
applies the rotary embedding to q and k first, as the 16-bit cache's rope_cache_decode does. A
NaN/Inf value or scale sets a device flag instead of a host check, so the step stays one CUDA
graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fused import _rows_of
from .triton_w8a8 import _quantize_block


@triton.jit
def _rotate_row(x_ptr, c, s, dd, HALF: tl.constexpr):
    """x * cos + rotate_half(x) * sin of one head row, rounding after each op as ATen does."""
    x = tl.load(x_ptr + dd)
    dt = x.dtype
    other = tl.load(x_ptr + (dd ^ HALF))                   # the opposite half
    turned = tl.where(dd < HALF, -other, other)            # rotate_half: cat(-x2, x1)
    a = (x.to(tl.float32) * c).to(dt)
    b = (turned.to(tl.float32) * s).to(dt)
    return (a.to(tl.float32) + b.to(tl.float32)).to(dt)


@triton.jit
def _write_token(new, tail, codes, scales, flag_ptr, off, tiny, st_t, sc_t,
                 BS: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr, QMAX: tl.constexpr,
                 INT8: tl.constexpr):
    """The token into row `off` of the open block's 16-bit tail, its own scales checked (a
    block's absmax is its tokens' largest, so a bad token is a bad block, found now); and when
    it fills the block (off == BS - 1) the block quantized: codes and scales."""
    dd = tl.arange(0, D)
    NG: tl.constexpr = D // GROUP
    token = new.to(tail.dtype.element_ty)
    tl.store(tail + off * st_t + dd, token)
    x = token.to(tl.float32)
    # NaN counts as Inf: the scale is then infinite, and that alone flags the token
    absmax = tl.max(tl.reshape(tl.where(x == x, tl.abs(x), float("inf")), [NG, GROUP]), 1)
    scale = _scale(absmax, tiny, scales, QMAX)
    bad = tl.max(tl.where(scale < float("inf"), 0, 1), 0)
    tl.store(flag_ptr, bad.to(tl.uint8), mask=bad > 0)
    if off == BS - 1:
        tt = tl.arange(0, BS)
        rows = tl.load(tail + tt[:, None] * st_t + dd[None, :], mask=(tt < off)[:, None], other=0.0)
        buf = tl.where((tt < off)[:, None], rows, token[None, :]).to(tl.float32)
        column = tl.max(tl.abs(buf), 0)   # every token was checked as it was written
        scale = _scale(tl.max(tl.reshape(column, [NG, GROUP]), 1), tiny, scales, QMAX)
        tl.store(scales + tl.arange(0, NG), scale.to(scales.dtype.element_ty))
        per_channel = tl.reshape(tl.broadcast_to(scale[:, None], [NG, GROUP]), [D])
        q = _quantize_block(buf, per_channel[None, :], QMAX, INT8)
        tl.store(codes + tt[:, None] * sc_t + dd[None, :], q.to(codes.dtype.element_ty))


@triton.jit
def _scale(absmax, tiny, scales, QMAX: tl.constexpr):
    """quantize_blocks' scale: absmax / qmax (1 for all-zero groups), floored at the scale
    dtype's smallest normal and rounded to it; returned in fp32."""
    scale = tl.where(absmax == 0, 1.0, tl.math.div_rn(absmax, QMAX))
    return tl.maximum(scale, tiny).to(scales.dtype.element_ty).to(tl.float32)


@triton.jit
def _quant_cache_decode(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr,
                        ks_ptr, vs_ptr, tail_ptr, table_ptr, pos_ptr, slot_ptr, flag_ptr,
                        kv_heads, tiny, sqb, sqh, skb, skh, svb, svh, scb, stb,
                        sc_n, sc_h, sc_t, ss_n, ss_h, st_s, st_i, st_h, st_t,
                        BS: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
                        QMAX: tl.constexpr, INT8: tl.constexpr, ROPE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dd = tl.arange(0, D)
    HALF: tl.constexpr = D // 2
    if ROPE:
        c = tl.load(cos_ptr + b * scb + dd).to(tl.float32)
        s = tl.load(sin_ptr + b * scb + dd).to(tl.float32)
    if h < 2 * kv_heads:   # k of kv head h, then v of kv head h - kv_heads: one block each
        kh = h % kv_heads
        pos = tl.load(pos_ptr + b)
        slot = tl.load(slot_ptr + b)
        blk = tl.load(table_ptr + b * stb + pos // BS).to(tl.int64)
        tail = tail_ptr + slot * st_s + kh * st_h
        cache_at = blk * sc_n + kh * sc_h
        scale_at = blk * ss_n + kh * ss_h
        if h < kv_heads:
            if ROPE:
                k = _rotate_row(k_ptr + b * skb + kh * skh, c, s, dd, HALF)
            else:
                k = tl.load(k_ptr + b * skb + kh * skh + dd)
            _write_token(k, tail, kc_ptr + cache_at, ks_ptr + scale_at, flag_ptr, pos % BS, tiny,
                         st_t, sc_t, BS, D, GROUP, QMAX, INT8)
        else:
            v = tl.load(v_ptr + b * svb + kh * svh + dd)
            _write_token(v, tail + st_i, vc_ptr + cache_at, vs_ptr + scale_at, flag_ptr, pos % BS,
                         tiny, st_t, sc_t, BS, D, GROUP, QMAX, INT8)
    else:
        if ROPE:
            qh = h - 2 * kv_heads
            out = _rotate_row(q_ptr + b * sqb + qh * sqh, c, s, dd, HALF)
            tl.store(qo_ptr + (b * (tl.num_programs(1) - 2 * kv_heads) + qh) * D + dd, out)


def quant_cache_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       cos: torch.Tensor | None, sin: torch.Tensor | None,
                       k_codes: torch.Tensor, v_codes: torch.Tensor, k_scale: torch.Tensor,
                       v_scale: torch.Tensor, tail: torch.Tensor, block_table: torch.Tensor,
                       positions: torch.Tensor, slots: torch.Tensor, flag: torch.Tensor) -> torch.Tensor:
    """q [rows, heads, 1, D], k, v [rows, kv_heads, 1, D] (un-rotated when cos is given; any
    strides with last 1); codes [blocks, kv_heads, block_size, D] int8 / float8_e4m3fn, scales
    [blocks, kv_heads, groups] fp16 / fp32, tail [max_seqs, 2, kv_heads, block_size, D];
    flag bool [1], set when a value or scale is not finite. Writes each row's token at
    positions[row] of slot slots[row]; returns rotary(q) contiguous (q itself without cos)."""
    rows, heads, _, d = q.shape
    kv_heads, bs = k_codes.shape[1], k_codes.shape[2]
    int8 = k_codes.dtype == torch.int8
    if not int8 and k_codes.dtype != torch.float8_e4m3fn:
        raise ValueError(f"quant_cache_decode: codes must be int8 or float8_e4m3fn, not {k_codes.dtype}")
    if k_codes.stride() != v_codes.stride() or k_scale.stride() != v_scale.stride():
        raise ValueError("quant_cache_decode: k and v caches (and scales) must share one layout")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    rope = cos is not None
    out = torch.empty((rows, heads, 1, d), dtype=q.dtype, device=q.device) if rope else q
    c = _rows_of(cos, rows, 1) if rope else q
    s = _rows_of(sin, rows, 1) if rope else q
    _quant_cache_decode[(rows, 2 * kv_heads + (heads if rope else 0))](
        q, k, v, c, s, out, k_codes, v_codes, k_scale, v_scale, tail, block_table, positions,
        slots, flag.view(torch.uint8), kv_heads, torch.finfo(k_scale.dtype).tiny,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        c.stride(0) if rope else 0, block_table.stride(0), k_codes.stride(0), k_codes.stride(1),
        k_codes.stride(2), k_scale.stride(0), k_scale.stride(1), tail.stride(0), tail.stride(1),
        tail.stride(2), tail.stride(3), BS=bs, D=d, GROUP=d // k_scale.shape[-1],
        QMAX=127.0 if int8 else float(torch.finfo(torch.float8_e4m3fn).max), INT8=int8,
        ROPE=rope, num_warps=4)
    return out
