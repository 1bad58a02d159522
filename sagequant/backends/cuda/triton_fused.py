"""Triton kernels for a decoder layer's non-GEMM work (imports triton: load through fused.py).

Each kernel computes what the unfused ATen ops of a Hugging Face decoder layer compute, rounding
to the activation dtype wherever those ops round (after each elementwise op), so a fused graph
gives the same tokens as the unfused one:
  add_rms_norm     residual add + RMSNorm (one pass over the row; the sum is written once)
  rotary           rotate_half rotary embedding of q or k, read through the transposed view
  rope_cache_decode  one decode token per row: rotary of q and k, k and v stored straight into
                   their 16-bit paged cache blocks (the attention prologue: one launch for what
                   was ~20 small ops)
  silu_mul         silu(gate) * up
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, n, eps,
                  HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(r_ptr + row * n + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
    normed = (xf * inv).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * n + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _warps(n: int) -> int:
    return 4 if n <= 2048 else 8 if n <= 8192 else 16


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rms_norm(x + residual) * weight, x + residual); residual None: the plain norm."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x2) if residual is not None else None
    r2 = residual.reshape(-1, n).contiguous() if residual is not None else x2
    block = triton.next_power_of_2(n)
    _add_rms_norm[(x2.shape[0],)](x2, r2, weight, out, total if total is not None else out, n, eps,
                                  HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(n))
    return out.reshape(x.shape), (total.reshape(x.shape) if total is not None else None)


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2):
    """out = x * cos + rotate_half(x) * sin in halves, rounding after each op as ATen does."""
    dt = x1.dtype
    a1 = (x1.to(tl.float32) * c1.to(tl.float32)).to(dt)
    b1 = (-(x2.to(tl.float32)) * s1.to(tl.float32)).to(dt)
    a2 = (x2.to(tl.float32) * c2.to(tl.float32)).to(dt)
    b2 = (x1.to(tl.float32) * s2.to(tl.float32)).to(dt)
    return (a1.to(tl.float32) + b1.to(tl.float32)).to(dt), (a2.to(tl.float32) + b2.to(tl.float32)).to(dt)


@triton.jit
def _rotary(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, seq,
            sxb, sxh, sxs, scb, scs, HALF: tl.constexpr):
    tok = tl.program_id(0)
    h = tl.program_id(1)
    b = tok // seq
    s = tok % seq
    d = tl.arange(0, HALF)
    src = x_ptr + b.to(tl.int64) * sxb + h * sxh + s.to(tl.int64) * sxs
    cs = b.to(tl.int64) * scb + s.to(tl.int64) * scs
    o1, o2 = _rotate(tl.load(src + d), tl.load(src + HALF + d),
                     tl.load(cos_ptr + cs + d), tl.load(cos_ptr + cs + HALF + d),
                     tl.load(sin_ptr + cs + d), tl.load(sin_ptr + cs + HALF + d))
    dst = out_ptr + ((b.to(tl.int64) * heads + h) * seq + s) * (2 * HALF)
    tl.store(dst + d, o1)
    tl.store(dst + HALF + d, o2)


def _rows_of(cos: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """cos / sin as [batch, seq, head_dim] with unit last stride (broadcast dims stride 0)."""
    c = cos.reshape(cos.shape[0], cos.shape[-2], cos.shape[-1]) if cos.dim() == 4 else cos
    c = c.expand(batch, seq, c.shape[-1])
    return c if c.stride(-1) == 1 else c.contiguous()


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim] (any strides, last one 1); cos, sin broadcastable as
    [batch, 1, seq, head_dim]. Returns a contiguous tensor."""
    batch, heads, seq, d = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    c, s = _rows_of(cos, batch, seq), _rows_of(sin, batch, seq)
    out = torch.empty((batch, heads, seq, d), dtype=x.dtype, device=x.device)
    _rotary[(batch * seq, heads)](x, c, s, out, heads, seq, x.stride(0), x.stride(1), x.stride(2),
                                  c.stride(0), c.stride(1), HALF=d // 2, num_warps=1)
    return out


@triton.jit
def _rope_cache_decode(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr,
                       table_ptr, pos_ptr, q_heads,
                       sqb, sqh, skb, skh, svb, svh, scb, stb, sc_n, sc_h, sc_t,
                       BS: tl.constexpr, HALF: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HALF)
    cs = cos_ptr + b.to(tl.int64) * scb
    sn = sin_ptr + b.to(tl.int64) * scb
    c1 = tl.load(cs + d)
    c2 = tl.load(cs + HALF + d)
    s1 = tl.load(sn + d)
    s2 = tl.load(sn + HALF + d)
    if h < q_heads:
        src = q_ptr + b.to(tl.int64) * sqb + h * sqh
        o1, o2 = _rotate(tl.load(src + d), tl.load(src + HALF + d), c1, c2, s1, s2)
        dst = qo_ptr + (b.to(tl.int64) * q_heads + h) * (2 * HALF)
        tl.store(dst + d, o1)
        tl.store(dst + HALF + d, o2)
    else:
        kh = h - q_heads
        pos = tl.load(pos_ptr + b)
        blk = tl.load(table_ptr + b.to(tl.int64) * stb + pos // BS).to(tl.int64)
        at = blk * sc_n + kh * sc_h + (pos % BS) * sc_t
        src = k_ptr + b.to(tl.int64) * skb + kh * skh
        o1, o2 = _rotate(tl.load(src + d), tl.load(src + HALF + d), c1, c2, s1, s2)
        tl.store(kc_ptr + at + d, o1.to(kc_ptr.dtype.element_ty))
        tl.store(kc_ptr + at + HALF + d, o2.to(kc_ptr.dtype.element_ty))
        vs = v_ptr + b.to(tl.int64) * svb + kh * svh
        tl.store(vc_ptr + at + d, tl.load(vs + d).to(vc_ptr.dtype.element_ty))
        tl.store(vc_ptr + at + HALF + d, tl.load(vs + HALF + d).to(vc_ptr.dtype.element_ty))


def rope_cache_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q [rows, heads, 1, D], k, v [rows, kv_heads, 1, D] (un-rotated, any strides with last 1);
    caches [blocks, kv_heads, block_size, D] 16-bit. Stores rotary(k) and v at each row's
    position and returns rotary(q) [rows, heads, 1, D] contiguous."""
    rows, heads, _, d = q.shape
    kv_heads = k.shape[1]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    c, s = _rows_of(cos, rows, 1), _rows_of(sin, rows, 1)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("rope_cache_decode: k and v caches must share one layout")
    out = torch.empty((rows, heads, 1, d), dtype=q.dtype, device=q.device)
    _rope_cache_decode[(rows, heads + kv_heads)](
        q, k, v, c, s, out, k_cache, v_cache, block_table, positions, heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), c.stride(0),
        block_table.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BS=k_cache.shape[2], HALF=d // 2, num_warps=1)
    return out


@triton.jit
def _silu_mul(a_ptr, b_ptr, out_ptr, n, stride_a, stride_b, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    a = tl.load(a_ptr + row * stride_a + i, mask=mask, other=0.0)
    b = tl.load(b_ptr + row * stride_b + i, mask=mask, other=0.0)
    af = a.to(tl.float32)
    act = (af / (1.0 + tl.exp(-af))).to(a.dtype)
    tl.store(out_ptr + row * n + i, (act.to(tl.float32) * b.to(tl.float32)).to(a.dtype), mask=mask)


def _row_view(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, last] with unit last stride, a view when strides allow (the halves of a
    merged gate_up output are), else a copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a2, b2 = _row_view(a), _row_view(b)
    rows, n = a2.shape
    out = torch.empty((rows, n), dtype=a.dtype, device=a.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_mul[(rows, triton.cdiv(n, block))](a2, b2, out, n, a2.stride(0), b2.stride(0),
                                              BLOCK=block, num_warps=4)
    return out.reshape(a.shape)
