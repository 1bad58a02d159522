"""paged_attention: the op the kv_cache pass puts in place of scaled_dot_product_attention. It
reads and writes the KV pool of the engine step that is running (runtime/context.AttentionStep),
set around each forward with `attention_step(...)`: a context variable, so engines and threads
never see each other's. The op is part of the IR (passes rewrite to it, the engine runs it); the
step it reads is the runtime's."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any

import torch

_CURRENT: contextvars.ContextVar["AttentionStep | None"] = contextvars.ContextVar(
    "sagequant_attention_step", default=None)


@contextlib.contextmanager
def attention_step(step):
    token = _CURRENT.set(step)
    try:
        yield step
    finally:
        _CURRENT.reset(token)


def current_step():
    step = _CURRENT.get()
    if step is None:
        raise RuntimeError("paged attention ran outside an engine step: a graph rewritten by the "
                           "kv_cache pass runs only through sagequant.runtime.GenerationEngine")
    return step


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                    scale: float | None, window: int, kv_dtype: str = "none",
                    cos: torch.Tensor | None = None, sin: torch.Tensor | None = None) -> torch.Tensor:
    """What the kv_cache pass puts in place of scaled_dot_product_attention: write the new k, v
    [batch, kv_heads, new, head_dim] into the step's cache (stored as kv_dtype: the
    kv_cache_quant pass sets it per layer), then attend q [batch, heads, new, head_dim] causally
    over each sequence's cached tokens. With cos and sin (the step graph's fusion moves the
    rotary embedding here), q and k arrive un-rotated and the step rotates them first."""
    step = current_step()
    if step.pool.layer_dtypes[layer] != kv_dtype:
        raise RuntimeError(f"KV pool stores layer {layer} as {step.pool.layer_dtypes[layer]!r} but "
                           f"the graph says {kv_dtype!r}: build the pool from this graph")
    return step.attend(q, k, v, layer, scale, window, cos, sin)


@dataclass(frozen=True)
class AttentionCall:
    """A paged_attention node's arguments by name (kv_dtype defaults to "none" until the
    kv_cache_quant pass sets it)."""

    q: Any
    k: Any
    v: Any
    layer: int
    scale: float | None
    window: int
    kv_dtype: str = "none"
    cos: Any = None   # set (as keywords) when the step graph's fusion moved the rotary here
    sin: Any = None

    @classmethod
    def of(cls, node) -> AttentionCall:
        return cls(*node.args, **node.kwargs)

    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.layer, self.scale, self.window, self.kv_dtype)

    def kwargs(self) -> dict:
        return {} if self.cos is None else {"cos": self.cos, "sin": self.sin}

