"""Triton decode attention over the paged KV cache (imports triton: load through kv_attention.py).

One query token per sequence. Programs are (sequence, kv head, split): each loads its kv head's
blocks once for all `rep` query heads of the group (grouped-query attention), dequantizes int8 /
fp8 codes with the (block, head, group) scales in registers, and keeps an online softmax; a
second kernel merges the splits (flash-decoding), so long contexts use the whole GPU even at
batch 1.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 512  # enough (sequence, head, split) programs to fill an H100's 132 SMs


@triton.jit
def _decode_partial(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, table_ptr, lens_ptr,
                    acc_ptr, m_ptr, l_ptr, sm_scale, window, blocks_per_split,
                    stride_qb, stride_qh, stride_kn, stride_kh, stride_kt,
                    stride_sn, stride_sh, stride_tb, n_splits,
                    HEADS: tl.constexpr, REP: tl.constexpr, BLOCK_H: tl.constexpr,
                    D: tl.constexpr, BS: tl.constexpr, GROUP: tl.constexpr, QUANT: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    n_blocks = tl.cdiv(seq_len, BS)
    first = split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, n_blocks)
    hs = tl.arange(0, BLOCK_H)
    dd = tl.arange(0, D)
    tt = tl.arange(0, BS)
    head = kvh * REP + hs
    hmask = hs < REP
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + dd[None, :],
                mask=hmask[:, None], other=0.0)
    q_lp = (q.to(tl.float32) * sm_scale).to(q.dtype)
    lo = 0
    if window > 0:
        lo = seq_len - window  # the query sits at seq_len - 1; keys > query - window
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for j in range(first, last):
        blk = tl.load(table_ptr + b * stride_tb + j).to(tl.int64)
        off = blk * stride_kn + kvh * stride_kh + tt[:, None] * stride_kt + dd[None, :]
        k = tl.load(k_ptr + off).to(tl.float32)
        v = tl.load(v_ptr + off).to(tl.float32)
        if QUANT:
            soff = blk * stride_sn + kvh * stride_sh + dd // GROUP
            k = k * tl.load(ks_ptr + soff).to(tl.float32)[None, :]
            v = v * tl.load(vs_ptr + soff).to(tl.float32)[None, :]
        s = tl.dot(q_lp, tl.trans(k.to(q.dtype)))          # [BLOCK_H, BS], fp32 accumulate
        pos = j * BS + tt
        valid = (pos < seq_len) & (pos >= lo)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m = m_new
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
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - big))
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + dd, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                           scale: float | None, window: int) -> torch.Tensor:
    """q [batch, heads, 1, head_dim] (fp16/bf16); caches [blocks, kv_heads, block_size, head_dim]
    (int8 / float8_e4m3fn codes with scales [blocks, kv_heads, groups], or fp16/bf16 without);
    block_table [batch, width] int32; seq_lens [batch] int32 (tokens incl. the new one)."""
    batch, heads, _, d = q.shape
    kv_heads, bs = k_cache.shape[1], k_cache.shape[2]
    rep = heads // kv_heads
    quant = k_scale is not None
    group = d // k_scale.shape[-1] if quant else d
    max_blocks = triton.cdiv(max_len, bs)
    n_splits = max(1, min(max_blocks, math.ceil(TARGET_PROGRAMS / (batch * kv_heads))))
    per_split = triton.cdiv(max_blocks, n_splits)
    n_splits = triton.cdiv(max_blocks, per_split)
    q2 = q[:, :, 0]
    acc = torch.empty((batch, heads, n_splits, d), dtype=torch.float32, device=q.device)
    m = torch.empty((batch, heads, n_splits), dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    dummy = k_scale if quant else q2
    _decode_partial[(batch, kv_heads, n_splits)](
        q2, k_cache, v_cache, dummy, v_scale if quant else q2, block_table, seq_lens,
        acc, m, lse, scale if scale is not None else d ** -0.5, window, per_split,
        q2.stride(0), q2.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        dummy.stride(0) if quant else 0, dummy.stride(1) if quant else 0, block_table.stride(0),
        n_splits, HEADS=heads, REP=rep, BLOCK_H=max(16, triton.next_power_of_2(rep)), D=d, BS=bs,
        GROUP=group, QUANT=quant)
    out = torch.empty_like(q2)
    _combine[(batch, heads)](acc, m, lse, out, n_splits, out.stride(0), out.stride(1),
                             HEADS=heads, D=d, SPLITS_P2=max(2, triton.next_power_of_2(n_splits)))
    return out[:, :, None]
