"""CPU reference attention over the paged KV cache: gather each sequence's blocks, dequantize
them with the plan's numerics, and run causal (optionally sliding-window) attention with torch's
SDPA — the same math the model's own attention does on unquantized k, v."""
from __future__ import annotations

import torch

from ...lowering.attention import KV_ATTENTION, AttentionKernelSpec

PRIORITIES = ("latency", "throughput", "memory")

def causal_mask(starts: int, new: int, total: int, window: int, device) -> torch.Tensor:
    """[new, total] bool: query i (position starts+i) sees keys at positions <= its own, and with
    a window w only the last w of them (key > query - w)."""
    q = torch.arange(starts, starts + new, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    mask = k <= q
    if window:
        mask &= k > q - window
    return mask

def paged_attention_ref(q: torch.Tensor, step, layer: int, scale: float | None,
                        window: int) -> torch.Tensor:
    heads, new = q.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for row, (slot, start) in enumerate(zip(step.slots, step.starts)):
        k, v = step.pool.gather(layer, slot, start + new)
        rep = heads // k.shape[0]   # grouped-query: kv head h serves query heads h*rep..h*rep+rep-1
        k = k.repeat_interleave(rep, 0).to(q.dtype)[None]
        v = v.repeat_interleave(rep, 0).to(q.dtype)[None]
        mask = causal_mask(start, new, start + new, window, q.device)
        out[row] = torch.nn.functional.scaled_dot_product_attention(
            q[row:row + 1], k, v, attn_mask=mask, scale=scale)[0]
    return out

CPU_PAGED_ATTENTION = AttentionKernelSpec(
    name="cpu_paged_attention_ref",
    backend="cpu",
    schemes=(KV_ATTENTION,),
    priorities=PRIORITIES,
    op=paged_attention_ref,
    description="gather + dequantize blocks (int8 / fp8 e4m3 / float), causal SDPA per sequence",
)
