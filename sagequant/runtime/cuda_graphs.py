"""Decode steps replayed from CUDA graphs, one graph per padded batch bucket (1, 2, 4, ...).

A decode step reads only static device buffers (token ids, positions and a DecodeIndex: slots,
block table, lengths), which are refilled before each replay; rows beyond the real batch are
padding that writes into a reserved pad slot and block and is dropped from the logits. Cache
writes run without host synchronisation; a NaN/Inf in new KV sets a device flag that is checked
after the replay (one sync per step, which sampling needs anyway).

With capture=False (CPU, tests) the same padded static step runs eagerly.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..ir.formats import QuantizationError
from ..ir.paged_attention import attention_step
from ..progress import track
from .context import AttentionStep
from .kv_pool import DecodeIndex


@dataclass
class _Bucket:
    ids: torch.Tensor          # [rows, 1]
    positions: torch.Tensor    # [rows, 1]
    index: DecodeIndex
    graph: object = None       # torch.cuda.CUDAGraph once captured
    logits: torch.Tensor | None = None
    last: tuple = ()           # (slots, their open() serials, starts) the index buffers hold


def nonfinite_error() -> QuantizationError:
    return QuantizationError("KV cache: a decode step produced NaN/Inf keys or values "
                             "(or values past the scale dtype's range)")


class DecodeGraphs:
    def __init__(self, engine, capture: bool):
        self.engine, self.capture = engine, capture
        pool = engine.pool
        self.pad_slot = engine.max_batch          # the pool has one slot more than max_batch
        pool.open(self.pad_slot, 1)
        self.pad_block = pool.blocks[self.pad_slot][0]
        self.width = pool.blocks_for(engine.max_seq_len + engine.extra_tokens)
        self.sizes = sorted({min(2 ** i, engine.max_batch) for i in range(engine.max_batch.bit_length() + 1)})
        self.buckets: dict[int, _Bucket] = {}
        self.nonfinite: torch.Tensor | None = None   # the flag the last decode's writes set
        self.launches = 0                            # decode steps run (benchmarks count them)

    def _bucket(self, rows: int) -> _Bucket:
        size = next(s for s in self.sizes if s >= rows)
        if size not in self.buckets:
            dev, long = self.engine.device, torch.int64
            index = DecodeIndex(torch.zeros(size, dtype=long, device=dev), torch.zeros(size, dtype=long, device=dev),
                                torch.zeros(size, self.width, dtype=torch.int32, device=dev),
                                torch.ones(size, dtype=torch.int32, device=dev),
                                self.width * self.engine.pool.block_size,
                                torch.zeros(1, dtype=torch.bool, device=dev))
            self.buckets[size] = _Bucket(torch.zeros(size, 1, dtype=long, device=dev),
                                         torch.zeros(size, 1, dtype=long, device=dev), index)
        return self.buckets[size]

    def decode(self, slots: list[int], tokens: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Logits [rows, 1, vocab] of one new token per slot (tokens [rows, 1], on any device).
        check=False leaves the NaN/Inf flag of the cache writes unread (no host sync): the caller
        reads `self.nonfinite` later, before the next decode resets it."""
        pool, n = self.engine.pool, len(slots)
        b = self._bucket(n)
        pad = b.ids.shape[0] - n
        all_slots = slots + [self.pad_slot] * pad
        starts = [pool.lengths[s] for s in slots] + [0] * pad
        opened = [pool.opened[s] for s in all_slots]
        if b.last == (all_slots, opened, [s - 1 for s in starts[:n]] + starts[n:]):
            # The same rows one token on (a steady batch): advance the index on the device; the
            # block table is unchanged because a request's blocks are all reserved at admission.
            for t in (b.index.positions, b.index.seq_lens, b.positions):
                t[:n] += 1
        else:
            self._fill(b, all_slots, starts)
        b.last = (all_slots, opened, starts)
        b.index.nonfinite.zero_()
        b.ids[:n].copy_(tokens)
        if not self.capture:
            b.logits = self._forward(b, all_slots, starts)
        else:
            if b.graph is None:
                self._capture(b, all_slots, starts)
            b.graph.replay()
        self.nonfinite = b.index.nonfinite
        self.launches += 1
        if check and bool(self.nonfinite):
            raise nonfinite_error()
        pool.advance(slots, 1)
        return b.logits[:n]

    def capture_all(self) -> float:
        """Capture every bucket's graph now (a server does this before taking requests: a
        request arriving at a new batch size otherwise waits for that capture, and its warm-up
        forwards). The capture rows are all padding: they write only the pad block. Seconds."""
        start = time.perf_counter()
        if self.capture:
            sizes = [s for s in self.sizes if self._bucket(s).graph is None]
            for size in track(sizes, "capture decode graphs", unit="graph"):
                b = self._bucket(size)
                rows, starts = [self.pad_slot] * size, [0] * size
                self._fill(b, rows, starts)
                b.last = ()   # the first real step refills the index
                self._capture(b, rows, starts)
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize(self.engine.device)
        return time.perf_counter() - start

    def _fill(self, b: _Bucket, slots: list[int], starts: list[int]) -> None:
        """The index buffers from host lists (the copies wait for the GPU to drain)."""
        pool = self.engine.pool
        table = [pool.blocks[s] + [self.pad_block] * (self.width - len(pool.blocks[s]))
                 for s in slots]
        positions = torch.tensor(starts)
        b.index.slots.copy_(torch.tensor(slots))
        b.index.positions.copy_(positions)
        b.index.block_table.copy_(torch.tensor(table, dtype=torch.int32))
        b.index.seq_lens.copy_(positions + 1)
        b.positions.copy_(positions[:, None])
        b.ids.zero_()

    def _forward(self, b: _Bucket, slots: list[int], starts: list[int]) -> torch.Tensor:
        step = AttentionStep(self.engine.pool, slots, starts, self.engine.kernel, decode=b.index)
        with torch.inference_mode(), attention_step(step):
            return self.engine.graph.gm(b.ids, b.positions)

    def _capture(self, b: _Bucket, slots: list[int], starts: list[int]) -> None:
        # Warm-up on a side stream (Triton compiles, the allocator settles); the writes it
        # makes are the ones the replay makes again (same token at the same position).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b, slots, starts)
        torch.cuda.current_stream().wait_stream(side)
        b.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(b.graph):
            b.logits = self._forward(b, slots, starts)
