"""CUDA attention over the paged KV cache: decode steps (one new token per sequence) run the
Triton kernel in triton_kv_attention.py, which reads int8 / fp8 / 16-bit blocks and dequantizes
in registers; prefill of whole prompts into a 16-bit cache runs causal flash SDPA over the new
k, v; other prefill and multi-token verify steps gather + dequantize the blocks and run torch's
SDPA on the GPU (the reference kernel's math). Imports without a GPU or triton."""
from __future__ import annotations

import importlib

import torch

from ...lowering.attention import KV_ATTENTION, AttentionKernelSpec
from ..reference.kv_attention import paged_attention_ref
from . import hardware

PRIORITIES = ("latency", "throughput", "memory")
HEAD_DIMS = (16, 32, 64, 128, 256)  # tl.arange needs a power of two; tl.dot needs >= 16


def fresh_prefill_attention(q: torch.Tensor, step, layer: int, scale: float | None,
                            window: int) -> torch.Tensor | None:
    """Prefill of whole prompts (every row starts at position 0) into a 16-bit cache without a
    window: the cache then holds exactly the k, v just written, so causal SDPA over those (flash
    attention, grouped-query heads unexpanded) is the reference's result without gathering the
    blocks, expanding the kv heads and building a mask. None where that does not hold."""
    fresh = step.new_kv
    if (fresh is None or window or any(step.starts) or step.pool.layers[layer].quantized
            or fresh[0].dtype != q.dtype or fresh[0].shape[2] != q.shape[2]):
        return None
    k, v = fresh
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                                            enable_gqa=k.shape[1] != q.shape[1])


def cuda_paged_attention(q: torch.Tensor, step, layer: int, scale: float | None,
                         window: int) -> torch.Tensor:
    if q.shape[2] != 1:
        out = fresh_prefill_attention(q, step, layer, scale, window)
        return out if out is not None else paged_attention_ref(q, step, layer, scale, window)
    hardware.require_cuda_tensors("cuda_paged_decode_attention", q=q)
    index = step.decode_index()   # built once per step (or static, under CUDA graphs)
    cache = step.pool.layers[layer]
    impl = importlib.import_module(f"{__package__}.triton_kv_attention")
    return impl.paged_decode_attention(q, cache.k, cache.v, cache.k_scale, cache.v_scale,
                                       index.block_table, index.seq_lens, index.max_len, scale, window,
                                       tail=cache.tail, slots=index.slots)


CUDA_PAGED_ATTENTION = AttentionKernelSpec(
    name="cuda_paged_decode_attention",
    backend="cuda",
    schemes=(KV_ATTENTION,),
    priorities=PRIORITIES,
    op=cuda_paged_attention,
    description="Triton split-K decode attention over int8 / fp8 / 16-bit paged blocks, "
                "dequantized in registers; prefill via gathered SDPA",
    head_dims=HEAD_DIMS,
    available=hardware.requirement((8, 0), "the paged decode attention kernel", needs_triton=True),
)
