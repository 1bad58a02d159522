"""Prefill of one fresh prompt replayed from a CUDA graph per padded length bucket.

An eager prefill launches ~40 ops a layer from Python; at a few hundred tokens that host time is
longer than the GPU's work, so the GPU waits. Here the prompt is padded to the next multiple of
PAD_MULTIPLE tokens and run as a graph over static buffers (token ids, the cache write index,
the position of the last real token), captured once per bucket. Padding sits after the prompt:
causal attention keeps it out of the real tokens, its cache entries go to the decode graphs'
reserved pad block, and the logits are those of the last real token alone. Only a whole fresh
prompt of one request into a 16-bit cache, attended by the CUDA kernel (flash SDPA over the new
k, v), qualifies; anything else runs eagerly. With capture=False (CPU, tests) the same padded static step runs
eagerly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ..ir.paged_attention import AttentionCall, attention_step
from ..progress import track
from .context import AttentionStep
from .step_graph import attention_nodes, last_position_module

PAD_MULTIPLE = 128


@dataclass
class _Bucket:
    ids: torch.Tensor          # [1, P] int64
    positions: torch.Tensor    # [1, P] int64, 0..P-1 (fresh prompts only)
    blk: torch.Tensor          # [1, P] int64 cache block of each position
    off: torch.Tensor          # [1, P] int64 offset in that block
    graph: object = None
    logits: torch.Tensor | None = None


class PrefillGraphs:
    def __init__(self, engine, capture: bool):
        self.engine, self.capture = engine, capture
        self.last = torch.zeros(1, dtype=torch.int64, device=engine.device)
        self.gm = last_position_module(engine.graph, index=self.last)
        self.windowed = any(AttentionCall.of(n).window for n in attention_nodes(engine.graph))
        self.buckets: dict[int, _Bucket] = {}
        # All buckets share one memory pool: a replay may reuse what another bucket's output
        # occupied, which is safe because prefill() returns logits that are read (sampled)
        # before any other replay; per-bucket pools would hold every bucket's peak at once.
        self.pool = None
        self.captures: dict[int, dict] = {}   # bucket -> capture seconds, memory reserved by it

    def usable(self) -> bool:
        """Whether any prompt can take this path (the checks that do not depend on the prompt)."""
        e = self.engine
        # The CUDA attention kernel attends a fresh prompt over the k, v it was handed (flash
        # SDPA); the reference gathers the slot's blocks, which the padded step does not fill.
        return (self.gm is not None and not self.windowed and e.graphs is not None
                and e.kernel.backend == "cuda" and not any(c.quantized for c in e.pool.layers))

    def fits(self, slot: int, tokens: int) -> bool:
        e = self.engine
        return self.usable() and e.pool.lengths[slot] == 0 and 1 < tokens <= e.prefill_chunk

    def bucket_sizes(self) -> list[int]:
        """Every padded length a prompt can take: up to the prefill chunk and the context."""
        longest = min(self.engine.prefill_chunk, self.engine.max_seq_len)
        return list(range(PAD_MULTIPLE, math.ceil(longest / PAD_MULTIPLE) * PAD_MULTIPLE + 1,
                          PAD_MULTIPLE))

    def capture_all(self) -> float:
        """Capture every bucket now, as DecodeGraphs.capture_all does for decode (a server runs
        this before taking requests, so no prompt waits for a capture). The capture prompts are
        all padding: every position writes the pad block. Seconds."""
        start = time.perf_counter()
        if self.capture and self.usable():
            bs = self.engine.pool.block_size
            sizes = [s for s in self.bucket_sizes() if self._bucket(s).graph is None]
            for size in track(sizes, "capture prefill graphs", unit="graph"):
                b = self._bucket(size)
                b.ids.zero_()
                b.blk.fill_(self.engine.graphs.pad_block)
                b.off.copy_(b.positions % bs)
                self.last.zero_()
                self._capture(b)
        return time.perf_counter() - start

    def prefill(self, slot: int, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [1, 1, vocab] of the last of `tokens` [1, L], written to the empty `slot`."""
        pool, n = self.engine.pool, tokens.shape[1]
        pool.check_room([slot], [0], n)
        size = math.ceil(n / PAD_MULTIPLE) * PAD_MULTIPLE
        b = self._bucket(size)
        pos = torch.arange(size)
        table = torch.tensor(pool.blocks[slot], dtype=torch.int64)
        blocks = torch.full((size,), self.engine.graphs.pad_block, dtype=torch.int64)
        blocks[:n] = table[pos[:n] // pool.block_size]
        b.blk.copy_(blocks[None])
        b.off.copy_((pos % pool.block_size)[None])
        b.ids[:, :n].copy_(tokens)
        b.ids[:, n:].zero_()
        self.last.fill_(n - 1)
        if not self.capture:
            b.logits = self._forward(b)
        else:
            if b.graph is None:
                self._capture(b)
            b.graph.replay()
        pool.advance([slot], n)
        return b.logits

    def _bucket(self, size: int) -> _Bucket:
        if size not in self.buckets:
            dev, long = self.engine.device, torch.int64
            self.buckets[size] = _Bucket(torch.zeros(1, size, dtype=long, device=dev),
                                         torch.arange(size, device=dev)[None],
                                         torch.zeros(1, size, dtype=long, device=dev),
                                         torch.zeros(1, size, dtype=long, device=dev))
        return self.buckets[size]

    def _forward(self, b: _Bucket) -> torch.Tensor:
        e = self.engine
        # The pad slot's Python bookkeeping stands in: every write goes through the static index.
        step = AttentionStep(e.pool, [e.graphs.pad_slot], [0], e.kernel,
                             write=(b.ids.shape[1], (b.blk, b.off)))
        with torch.inference_mode(), attention_step(step):
            return self.gm(b.ids, b.positions)

    def _capture(self, b: _Bucket) -> None:
        start = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()   # warm-up as DecodeGraphs does (its writes repeat in replay)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(side)
        b.graph = torch.cuda.CUDAGraph()
        reserved = torch.cuda.memory_reserved(self.engine.device)   # the graph pool's growth
        with torch.cuda.graph(b.graph, pool=self.pool):
            b.logits = self._forward(b)
        torch.cuda.synchronize(self.engine.device)
        self.captures[b.ids.shape[1]] = {
            "capture_s": round(time.perf_counter() - start, 4),
            "reserved_bytes": torch.cuda.memory_reserved(self.engine.device) - reserved}
