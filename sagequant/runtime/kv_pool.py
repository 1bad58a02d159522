"""Paged KV pool: per layer, fixed-size blocks of `block_size` tokens shared by all sequences,
stored as the KVQuantPlan says (1-byte codes + per (block, head, group) scales, or 16-bit/float
for high-precision layers), and a block table per sequence slot.

Quantized blocks are written whole: the open (last, partly filled) block of each sequence lives
in a small 16-bit tail, which attention reads as it is, and is quantized from it once, by the
write that fills it; so a block's codes always equal quantize(its tokens) with the block's own
absmax, whether the tokens came in one prefill or one decode step at a time, and a decode step
writes one token row where it used to re-quantize the whole block. Every token is checked for
NaN/Inf (and scale overflow) as it is written. Full blocks never change again (a prefix cache
can share them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir.kv_plan import KVQuantPlan
from ..ir.kv_quant import dequantize_blocks, kv_spec, quantize_blocks, scales_finite
from ..ir.quant_spec import SCALE_DTYPES, QuantSpec
from ..errors import ServingError


class KVCacheFull(ServingError):
    """Not enough free blocks for a sequence."""


@dataclass
class LayerCache:
    k: torch.Tensor                      # [num_blocks, kv_heads, block_size, head_dim]
    v: torch.Tensor
    k_scale: torch.Tensor | None         # [num_blocks, kv_heads, n_groups] (quantized layers)
    v_scale: torch.Tensor | None
    tail: torch.Tensor | None            # [max_seqs, 2, kv_heads, block_size, head_dim] float
    spec: QuantSpec | None

    @property
    def quantized(self) -> bool:
        return self.spec is not None


@dataclass
class DecodeIndex:
    """Device tensors of one decode step (one new token per row): everything the cache write
    and the decode kernel read, so the step needs no host lists (and can be a CUDA graph)."""
    slots: torch.Tensor            # [rows] int64 pool slots
    positions: torch.Tensor        # [rows] int64 position of each new token
    block_table: torch.Tensor      # [rows, width] int32
    seq_lens: torch.Tensor         # [rows] int32, positions + 1
    max_len: int                   # upper bound of seq_lens (sizes the kernel launch)
    nonfinite: torch.Tensor | None = None  # bool [1]: set when a written scale is NaN/Inf;
                                           # None: check on the host at once


class PagedKVPool:
    def __init__(self, plan: KVQuantPlan, layer_dtypes: list[str], kv_heads: int, head_dim: int,
                 num_blocks: int, max_seqs: int, dtype: torch.dtype, device: torch.device):
        """layer_dtypes: "none" / "int8" / "fp8" per layer, as the kv_cache_quant pass set them;
        the plan gives the block size, scale groups and scale precision."""
        plan.validate_layers(len(layer_dtypes))
        plan.check_head_dim(head_dim)
        self.layer_dtypes = list(layer_dtypes)
        if num_blocks < 1 or max_seqs < 1:
            raise ValueError(f"num_blocks={num_blocks} and max_seqs={max_seqs} must be >= 1")
        self.plan, self.block_size, self.dtype, self.device = plan, plan.block_size, dtype, device
        self.num_blocks, self.kv_heads, self.head_dim = num_blocks, kv_heads, head_dim
        self.layers = [self._layer(dt, max_seqs) for dt in layer_dtypes]
        self._free = list(range(num_blocks - 1, -1, -1))
        self.blocks: dict[int, list[int]] = {}   # slot -> its blocks, in order
        self.lengths: dict[int, int] = {}        # slot -> tokens cached
        self.opened: dict[int, int] = {}         # slot -> serial number of its open() (tells
        self._opens = 0                          # a reused slot from the sequence it held)

    def _layer(self, dtype: str, max_seqs: int) -> LayerCache:
        shape = (self.num_blocks, self.kv_heads, self.block_size, self.head_dim)
        if dtype == "none":
            return LayerCache(torch.zeros(shape, dtype=self.dtype, device=self.device),
                              torch.zeros(shape, dtype=self.dtype, device=self.device),
                              None, None, None, None)
        spec = kv_spec(dtype, self.plan.scale_precision)
        groups = self.head_dim // (self.plan.group_size or self.head_dim)
        codes = lambda: torch.zeros(shape, dtype=spec.fmt.storage_dtype, device=self.device)  # noqa: E731
        scales = lambda: torch.ones(shape[:2] + (groups,), dtype=SCALE_DTYPES[spec.scale_dtype], device=self.device)  # noqa: E731
        tail = torch.zeros((max_seqs, 2) + shape[1:], dtype=self.dtype, device=self.device)
        return LayerCache(codes(), codes(), scales(), scales(), tail, spec)

    # ---- sequences --------------------------------------------------------------------------
    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def open(self, slot: int, capacity: int) -> None:
        """Reserve blocks for `capacity` tokens of a new sequence in `slot`."""
        if slot in self.blocks:
            raise ValueError(f"KV slot {slot} is already in use")
        need = self.blocks_for(capacity)
        if need > len(self._free):
            raise KVCacheFull(f"sequence needs {need} KV blocks ({capacity} tokens), "
                              f"{len(self._free)} of {self.num_blocks} free")
        self.blocks[slot] = [self._free.pop() for _ in range(need)]
        self.lengths[slot] = 0
        self._opens += 1
        self.opened[slot] = self._opens

    def free(self, slot: int) -> None:
        self._free.extend(reversed(self.blocks.pop(slot, [])))
        self.lengths.pop(slot, None)
        self.opened.pop(slot, None)

    def truncate(self, slot: int, length: int) -> None:
        """Forget tokens from `length` on (rejected speculative tokens). When the cut falls inside
        an already full (quantized) block, that block's dequantized values become the open tail."""
        old = self.lengths[slot]
        if not 0 <= length <= old:
            raise ValueError(f"truncate to {length} tokens; slot {slot} holds {old}")
        off = length % self.block_size
        if off and length // self.block_size < old // self.block_size:
            block = self.blocks[slot][length // self.block_size]
            for cache in self.layers:
                if cache.quantized:
                    cache.tail[slot, 0] = dequantize_blocks(cache.k[block], cache.k_scale[block], self.dtype)
                    cache.tail[slot, 1] = dequantize_blocks(cache.v[block], cache.v_scale[block], self.dtype)
        self.lengths[slot] = length

    def block_table(self, slots: list[int]) -> torch.Tensor:
        """[len(slots), max blocks] int32 on the pool's device (rows padded with 0)."""
        width = max(len(self.blocks[s]) for s in slots)
        rows = [self.blocks[s] + [0] * (width - len(self.blocks[s])) for s in slots]
        return torch.tensor(rows, dtype=torch.int32, device=self.device)

    # ---- storage ----------------------------------------------------------------------------
    def bytes_per_token(self) -> float:
        """Bytes of K and V storage (codes + scales) per cached token, all layers."""
        total = 0
        for c in self.layers:
            for t in (c.k, c.v, c.k_scale, c.v_scale):
                total += 0 if t is None else t.numel() * t.element_size()
        return total / (self.num_blocks * self.block_size)

    def write(self, layer: int, slots: list[int], starts: list[int], k: torch.Tensor,
              v: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Store new k, v [batch, kv_heads, new_tokens, head_dim] at positions starts[b].. of each
        row's sequence; sequence lengths advance after the last layer wrote. index: the
        write_index of (slots, starts, new_tokens), which every layer of one forward shares
        (its maker checked the room: check_room)."""
        cache = self.layers[layer]
        s = k.shape[2]
        if index is None:
            self.check_room(slots, starts, s)
        if s == 1:
            self.write_decode(layer, self.decode_index(slots, starts), k, v)
            return
        if not cache.quantized:
            blk, off = index if index is not None else self.write_index(slots, starts, s)
            cache.k[blk, :, off] = k.transpose(1, 2).to(self.dtype)
            cache.v[blk, :, off] = v.transpose(1, 2).to(self.dtype)
            return
        for row, (slot, start) in enumerate(zip(slots, starts)):
            self._write_quantized(cache, slot, start, k[row], v[row])

    def check_room(self, slots: list[int], starts: list[int], new_tokens: int) -> None:
        for slot, start in zip(slots, starts):
            if start + new_tokens > len(self.blocks[slot]) * self.block_size:
                raise KVCacheFull(f"slot {slot}: {start + new_tokens} tokens exceed its reserved "
                                  f"{len(self.blocks[slot]) * self.block_size}")

    def write_index(self, slots: list[int], starts: list[int], new_tokens: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset in block) [rows, new_tokens] of the new tokens' cache entries. Built
        from host lists, so its host-to-device copies wait for the GPU: one forward builds it
        once, not once per layer (that wait per layer left the GPU idle while the host queued
        the rest of each layer's prefill)."""
        self.check_room(slots, starts, new_tokens)
        pos = torch.tensor(starts, device=self.device)[:, None] + torch.arange(new_tokens, device=self.device)
        blk = self.block_table(slots).long().gather(1, pos // self.block_size)
        return blk, pos % self.block_size

    def decode_index(self, slots: list[int], starts: list[int]) -> DecodeIndex:
        """The DecodeIndex of rows appending one token at positions `starts` to `slots`."""
        pos = torch.tensor(starts, device=self.device)
        return DecodeIndex(torch.tensor(slots, device=self.device), pos, self.block_table(slots),
                           (pos + 1).to(torch.int32), max(starts) + 1)

    def write_decode(self, layer: int, index: DecodeIndex, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [rows, kv_heads, 1, head_dim] at index.positions, all rows at once and without
        host synchronisation when index.nonfinite is set: each token into its row of the tail,
        and the blocks it fills quantized (the blocks _write_quantized makes)."""
        cache, bs = self.layers[layer], self.block_size
        rows = torch.arange(index.slots.shape[0], device=k.device)
        off = index.positions % bs
        blk = index.block_table.long()[rows, index.positions // bs]
        if not cache.quantized:
            cache.k[blk, :, off] = k[:, :, 0].to(self.dtype)
            cache.v[blk, :, off] = v[:, :, 0].to(self.dtype)
            return
        # no host read: every row's block is quantized, kept only where the token fills it
        fills = (off == bs - 1)[:, None, None, None]
        for i, (new, codes, scales) in enumerate(((k, cache.k, cache.k_scale), (v, cache.v, cache.v_scale))):
            token = new[:, :, 0].to(self.dtype)
            ok = scales_finite(token, cache.spec, self.plan.group_size, what="KV cache",
                               check=index.nonfinite is None)
            if index.nonfinite is not None:
                index.nonfinite.logical_or_(~ok)
            cache.tail[index.slots, i, :, off] = token
            c, sc = quantize_blocks(cache.tail[index.slots, i], cache.spec, self.plan.group_size,
                                    check=False)
            codes[blk] = torch.where(fills, c, codes[blk])
            scales[blk] = torch.where(fills[..., 0], sc, scales[blk])

    def _write_quantized(self, cache: LayerCache, slot: int, start: int, k: torch.Tensor,
                         v: torch.Tensor) -> None:
        """Tokens start.. of one sequence: the blocks they fill quantized, a block they leave
        open into the tail (checked for NaN/Inf as a quantized block would be)."""
        bs, s = self.block_size, k.shape[1]
        first, last = start // bs, (start + s - 1) // bs
        n, full = last - first + 1, (start + s) // bs - first
        what = f"KV cache of slot {slot}"
        for i, (new, codes, scales) in enumerate(((k, cache.k, cache.k_scale), (v, cache.v, cache.v_scale))):
            buf = torch.zeros(self.kv_heads, n * bs, self.head_dim, dtype=self.dtype, device=new.device)
            off = start % bs
            if off:
                buf[:, :off] = cache.tail[slot, i, :, :off]
            buf[:, off:off + s] = new.to(self.dtype)
            blocks = buf.reshape(self.kv_heads, n, bs, self.head_dim).transpose(0, 1)
            if full:
                c, sc = quantize_blocks(blocks[:full], cache.spec, self.plan.group_size, what=what)
                ids = torch.tensor(self.blocks[slot][first:first + full], device=codes.device)
                codes[ids] = c
                scales[ids] = sc
            if full < n:
                scales_finite(blocks[-1], cache.spec, self.plan.group_size, what=what)
                cache.tail[slot, i] = blocks[-1]

    def advance(self, slots: list[int], n_tokens: int) -> None:
        for slot in slots:
            self.lengths[slot] += n_tokens

    def gather(self, layer: int, slot: int, length: int,
               dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The `length` tokens written to this layer for a sequence, dequantized to `dtype`
        (default: the pool's activation dtype), an open last block from the tail: k, v
        [kv_heads, length, D]."""
        cache, dtype = self.layers[layer], dtype or self.dtype
        ids = torch.tensor(self.blocks[slot][:self.blocks_for(length)], device=cache.k.device)
        out = []
        for i, (codes, scales) in enumerate(((cache.k, cache.k_scale), (cache.v, cache.v_scale))):
            blocks = codes[ids].to(dtype) if scales is None else dequantize_blocks(codes[ids], scales[ids], dtype)
            if scales is not None and length % self.block_size:
                blocks[-1] = cache.tail[slot, i].to(dtype)
            out.append(blocks.transpose(0, 1).reshape(self.kv_heads, -1, self.head_dim)[:, :length])
        return out[0], out[1]

