"""Triton decode attention over the paged KV cache (imports triton: load through kv_attention.py).

One query token per sequence. Programs are (sequence, kv head, split) (flash-decoding: a second
kernel merges the splits, so long contexts fill the GPU even at batch 1). Each program reads its
kv head's tokens once for all `rep` query heads of the group (grouped-query attention), a tile of
`tile_tokens` tokens at a time gathered across pages through the block table, with an online
softmax in base 2.

Quantized blocks are read as 1-byte codes, and a sequence's open (partly filled) block from the
pool's 16-bit tail, as it is (kv_pool: it is quantized once, when full). With one scale per
(block, head) the codes enter the tensor-core dots as they are (int8 and fp8 e4m3 codes are exact
in fp16 / bf16) and the scales apply to the [heads, tokens] scores and probabilities, so
dequantization costs one multiply per score instead of one per element; with channel groups each
element is scaled before the dot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeLaunch:
    # tokens per loop iteration (2 pages of 16): fastest for every cache dtype in the H100 sweep
    # at 8k, batch 1 (BENCHMARKS 11b: int8 15.7 vs 20.7 µs a layer with 64)
    tile_tokens: int = 32
    target_programs: int = 512    # (sequence, kv head, split) programs: fill an H100's 132 SMs
    num_warps: int = 4
    num_stages: int = 2           # software-pipelined tiles in flight per program

    def describe(self) -> str:
        return (f"tile{self.tile_tokens}/p{self.target_programs}/w{self.num_warps}"
                f"/s{self.num_stages}")


# Per cache dtype ("none": 16-bit); benchmarks/kv_decode_speed.py --sweep times alternatives.
LAUNCH = {"none": DecodeLaunch(), "int8": DecodeLaunch(), "fp8": DecodeLaunch()}


@triton.jit
def _online_softmax(q, k, v, ks, vs, valid, m, l, acc, SCALED: tl.constexpr):
    """One tile of keys / values into the running max m, sum l and accumulator acc (base 2; q
    carries the softmax scale and log2 e); SCALED: per-token k / v scales ks, vs [tokens] applied
    to the scores and the probabilities; invalid tokens score -inf."""
    s = tl.dot(q, tl.trans(k))                           # [BLOCK_H, BLOCK_N], fp32
    if SCALED:
        s = s * ks[None, :]
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    if SCALED:
        p = p * vs[None, :]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc


@triton.jit
def _decode_partial(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, lens_ptr, tail_ptr, slot_ptr,
                    acc_ptr, m_ptr, l_ptr, qk_scale, window, tiles_per_split,
                    stride_qb, stride_qh, stride_kn, stride_kh, stride_kt,
                    stride_sn, stride_sh, stride_tb, st_s, st_i, st_h, st_t, n_splits,
                    HEADS: tl.constexpr, REP: tl.constexpr, BLOCK_H: tl.constexpr,
                    D: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                    GROUP: tl.constexpr, QUANT: tl.constexpr):
    """QUANT: tokens from open_at = (seq_len // BS) * BS on (the open block) come from the
    sequence's 16-bit tail [max_seqs, 2, kv_heads, BS, D], unscaled, in a second loop after the
    coded tiles, so the coded tiles' loop is the 16-bit cache's own with one-byte loads."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    lo = 0
    if window > 0:
        lo = tl.maximum(seq_len - window, 0)  # the query sits at seq_len - 1; keys > query - window
    start = split * tiles_per_split * BLOCK_N
    stop = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    start = tl.maximum(start, (lo // BLOCK_N) * BLOCK_N)   # tiles wholly before the window
    hs = tl.arange(0, BLOCK_H)
    dd = tl.arange(0, D)
    tn = tl.arange(0, BLOCK_N)
    head = kvh * REP + hs
    hmask = hs < REP
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + dd[None, :],
                mask=hmask[:, None], other=0.0)
    dt = q.dtype
    q = (q.to(tl.float32) * qk_scale).to(dt)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    table = table_ptr + b * stride_tb
    open_at = (seq_len // BS) * BS if QUANT else seq_len
    for n0 in range(start, tl.minimum(stop, open_at), BLOCK_N):   # the coded (or 16-bit) blocks
        pos = n0 + tn
        coded = pos < open_at   # (and so below seq_len)
        blk = tl.load(table + pos // BS, mask=coded, other=0).to(tl.int64)
        row = blk * stride_kn + kvh * stride_kh + (pos % BS) * stride_kt
        k = tl.load(k_ptr + row[:, None] + dd[None, :], mask=coded[:, None], other=0.0)
        v = tl.load(v_ptr + row[:, None] + dd[None, :], mask=coded[:, None], other=0.0)
        srow = blk * stride_sn + kvh * stride_sh
        if QUANT and GROUP < D:   # channel groups: dequantize each element
            soff = srow[:, None] + (dd // GROUP)[None, :]
            k = (k.to(tl.float32) * tl.load(ks_ptr + soff, mask=coded[:, None], other=0.0).to(tl.float32)).to(dt)
            v = (v.to(tl.float32) * tl.load(vs_ptr + soff, mask=coded[:, None], other=0.0).to(tl.float32)).to(dt)
        if QUANT and GROUP == D:
            ks = tl.load(ks_ptr + srow, mask=coded, other=0.0).to(tl.float32)
            vs = tl.load(vs_ptr + srow, mask=coded, other=0.0).to(tl.float32)
        else:   # unread
            ks = tl.zeros([BLOCK_N], tl.float32)
            vs = ks
        m, l, acc = _online_softmax(q, k.to(dt), v.to(dt), ks, vs, coded & (pos >= lo), m, l, acc,
                                    SCALED=QUANT and GROUP == D)
    if QUANT:   # the open block, from the sequence's 16-bit tail
        tail = tail_ptr + tl.load(slot_ptr + b).to(tl.int64) * st_s + kvh * st_h
        for n0 in range(tl.maximum(start, open_at), stop, BLOCK_N):
            pos = n0 + tn
            live = pos < seq_len
            at = (pos % BS)[:, None] * st_t + dd[None, :]
            k = tl.load(tail + at, mask=live[:, None], other=0.0).to(dt)
            v = tl.load(tail + st_i + at, mask=live[:, None], other=0.0).to(dt)
            m, l, acc = _online_softmax(q, k, v, k, v, live & (pos >= lo), m, l, acc, SCALED=False)
    part = (b * HEADS + head) * n_splits + split
    tl.store(m_ptr + part, m, mask=hmask)
    tl.store(l_ptr + part, l, mask=hmask)
    tl.store(acc_ptr + part[:, None] * D + dd[None, :], acc, mask=hmask[:, None])


@triton.jit
def _combine(acc_ptr, m_ptr, l_ptr, out_ptr, n_splits, stride_ob, stride_oh,
             HEADS: tl.constexpr, D: tl.constexpr, SPLITS_P2: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ss = tl.arange(0, SPLITS_P2)
    dd = tl.arange(0, D)
    smask = ss < n_splits
    base = (b * HEADS + h) * n_splits
    m = tl.load(m_ptr + base + ss, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + base + ss, mask=smask, other=0.0)
    acc = tl.load(acc_ptr + (base + ss)[:, None] * D + dd[None, :], mask=smask[:, None], other=0.0)
    big = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - big))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dd, out.to(out_ptr.dtype.element_ty))


def split_plan(batch: int, kv_heads: int, max_len: int, tile_tokens: int,
               target_programs: int) -> tuple[int, int]:
    """(splits, tiles per split) from host sizes only (max_len bounds the context), so a CUDA
    graph captured once serves every length up to it: splits past a row's length exit at once."""
    tiles = triton.cdiv(max_len, tile_tokens)
    splits = max(1, min(tiles, math.ceil(target_programs / (batch * kv_heads))))
    per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, per_split), per_split


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                           scale: float | None, window: int,
                           launch: DecodeLaunch | None = None, tail: torch.Tensor | None = None,
                           slots: torch.Tensor | None = None) -> torch.Tensor:
    """q [batch, heads, 1, head_dim] (fp16/bf16); caches [blocks, kv_heads, block_size, head_dim]
    (int8 / float8_e4m3fn codes with scales [blocks, kv_heads, groups], or fp16/bf16 without);
    block_table [batch, width] int32; seq_lens [batch] int32 (tokens incl. the new one).
    launch: None takes LAUNCH of the cache's dtype. Quantized caches also take the open blocks'
    16-bit tail [max_seqs, 2, kv_heads, block_size, head_dim] and each row's pool slot [batch]."""
    batch, heads, _, d = q.shape
    kv_heads, bs = k_cache.shape[1], k_cache.shape[2]
    if k_scale is not None and k_scale.stride() != v_scale.stride():
        raise ValueError("paged_decode_attention: k and v scales must share one layout")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("paged_decode_attention: k and v caches must share one layout")
    rep = heads // kv_heads
    quant = k_scale is not None
    if quant and (tail is None or slots is None):
        raise ValueError("paged_decode_attention: a quantized cache needs its tail and the rows' "
                         "slots (the open blocks are read from the tail)")
    group = d // k_scale.shape[-1] if quant else d
    if launch is None:
        launch = LAUNCH["none" if not quant else "int8" if k_cache.dtype == torch.int8 else "fp8"]
    n_splits, per_split = split_plan(batch, kv_heads, max_len, launch.tile_tokens,
                                     launch.target_programs)
    q2 = q[:, :, 0]
    acc = torch.empty((batch, heads, n_splits, d), dtype=torch.float32, device=q.device)
    m = torch.empty((batch, heads, n_splits), dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    ks, vs = (k_scale, v_scale) if quant else (q2, q2)   # unread without QUANT
    tail, slots = (tail, slots) if quant else (q2, seq_lens)
    st = tail.stride()[:4] if quant else (0, 0, 0, 0)
    sm_scale = scale if scale is not None else d ** -0.5
    _decode_partial[(batch, kv_heads, n_splits)](
        q2, k_cache, v_cache, ks, vs, block_table, seq_lens, tail, slots, acc, m, lse,
        sm_scale * LOG2E, window, per_split, q2.stride(0), q2.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), ks.stride(0) if quant else 0,
        ks.stride(1) if quant else 0, block_table.stride(0), *st, n_splits, HEADS=heads, REP=rep,
        BLOCK_H=max(16, triton.next_power_of_2(rep)), D=d, BS=bs, BLOCK_N=launch.tile_tokens,
        GROUP=group, QUANT=quant, num_warps=launch.num_warps, num_stages=launch.num_stages)
    out = torch.empty_like(q2)
    _combine[(batch, heads)](acc, m, lse, out, n_splits, out.stride(0), out.stride(1),
                             HEADS=heads, D=d, SPLITS_P2=max(2, triton.next_power_of_2(n_splits)))
    return out[:, :, None]
