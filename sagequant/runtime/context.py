"""The per-forward state the cache-aware attention op (ir/paged_attention.py) reads: which pool,
which sequences, where their new tokens go. The engine that owns the pool sets it around each
forward with `attention_step(...)`."""
from __future__ import annotations

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
