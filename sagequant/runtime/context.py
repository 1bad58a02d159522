"""The per-forward state the cache-aware attention op reads: which pool, which sequences, where
their new tokens go. The engine that owns the pool sets it around each forward with
`attention_step(...)` (a context variable, so engines and threads never see each other's)."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch

from .kv_pool import DecodeIndex, PagedKVPool


@dataclass
class AttentionStep:
    pool: PagedKVPool
    slots: list[int]          # pool slot of each batch row
    starts: list[int]         # tokens already cached for each row (its first new position)
    kernel: object            # the attention KernelSpec chosen for this engine's device
    decode: DecodeIndex | None = None  # one-token steps: device-side index, built once per step

    def decode_index(self) -> DecodeIndex:
        if self.decode is None:
            self.decode = self.pool.decode_index(self.slots, self.starts)
        return self.decode

    def positions(self, new_tokens: int, device) -> torch.Tensor:
        """[batch, new_tokens] absolute positions of the new tokens."""
        return torch.tensor(self.starts, device=device)[:, None] + torch.arange(new_tokens, device=device)


_CURRENT: contextvars.ContextVar[AttentionStep | None] = contextvars.ContextVar(
    "sagequant_attention_step", default=None)


@contextlib.contextmanager
def attention_step(step: AttentionStep):
    token = _CURRENT.set(step)
    try:
        yield step
    finally:
        _CURRENT.reset(token)


def current_step() -> AttentionStep:
    step = _CURRENT.get()
    if step is None:
        raise RuntimeError("paged attention ran outside an engine step: a graph rewritten by the "
                           "kv_cache pass runs only through sagequant.runtime.GenerationEngine")
    return step


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                    scale: float | None, window: int, kv_dtype: str = "none") -> torch.Tensor:
    """What the kv_cache pass puts in place of scaled_dot_product_attention: write the new k, v
    [batch, kv_heads, new, head_dim] into the step's cache (stored as kv_dtype: the
    kv_cache_quant pass sets it per layer), then attend q [batch, heads, new, head_dim] causally
    over each sequence's cached tokens."""
    step = current_step()
    if step.pool.layer_dtypes[layer] != kv_dtype:
        raise RuntimeError(f"KV pool stores layer {layer} as {step.pool.layer_dtypes[layer]!r} but "
                           f"the graph says {kv_dtype!r}: build the pool from this graph")
    if q.shape[2] == 1:
        step.pool.write_decode(layer, step.decode_index(), k, v)
    else:
        step.pool.write(layer, step.slots, step.starts, k, v)
    return step.kernel.op(q, step, layer, scale, window)
