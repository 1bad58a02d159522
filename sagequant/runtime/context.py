"""The per-forward state the cache-aware attention op (ir/paged_attention.py) reads: which pool,
which sequences, where their new tokens go. The engine that owns the pool sets it around each
forward with `attention_step(...)`."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.cuda import fused
from .kv_pool import DecodeIndex, PagedKVPool


@dataclass
class AttentionStep:
    pool: PagedKVPool
    slots: list[int]          # pool slot of each batch row
    starts: list[int]         # tokens already cached for each row (its first new position)
    kernel: object            # the attention KernelSpec chosen for this engine's device
    decode: DecodeIndex | None = None  # one-token steps: device-side index, built once per step
    new_kv: tuple | None = None   # (k, v) the layer being run just wrote, while its kernel runs
    write: tuple | None = None    # (new_tokens, the pool's write_index), shared by all layers

    def decode_index(self) -> DecodeIndex:
        if self.decode is None:
            self.decode = self.pool.decode_index(self.slots, self.starts)
        return self.decode

    def positions(self, new_tokens: int, device) -> torch.Tensor:
        """[batch, new_tokens] absolute positions of the new tokens."""
        return torch.tensor(self.starts, device=device)[:, None] + torch.arange(new_tokens, device=device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
               scale: float | None, window: int, cos: torch.Tensor | None = None,
               sin: torch.Tensor | None = None) -> torch.Tensor:
        """ir.paged_attention's work: store k, v in the layer's cache, then run the attention
        kernel. With cos, sin: rotary on q and k first. A decode step on CUDA does the rotary and
        the cache write in one kernel (the attention prologue; for a quantized cache that is also
        the quantization of a block the token fills)."""
        decode = q.shape[2] == 1
        if decode:
            fused_q = fused.rope_cache_decode(q, k, v, cos, sin, self.pool.layers[layer],
                                              self.decode_index())
            if fused_q is not None:
                return self.kernel.op(fused_q, self, layer, scale, window)
        if cos is not None:
            q, k = fused.rotary_embedding(q, cos, sin), fused.rotary_embedding(k, cos, sin)
        if decode:
            self.pool.write_decode(layer, self.decode_index(), k, v)
            return self.kernel.op(q, self, layer, scale, window)
        s = k.shape[2]
        if not self.pool.layers[layer].quantized and (self.write is None or self.write[0] != s):
            self.write = (s, self.pool.write_index(self.slots, self.starts, s))
        self.pool.write(layer, self.slots, self.starts, k, v, self.write and self.write[1])
        self.new_kv = (k, v)   # a prefill kernel may attend over these instead of the cache
        try:
            return self.kernel.op(q, self, layer, scale, window)
        finally:
            self.new_kv = None
