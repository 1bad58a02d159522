"""GenerationEngine: continuous batching over a paged (optionally quantized) KV cache.

Each step admits waiting requests (one prefill forward each, first token sampled from it) while
slots and KV blocks allow, then runs one decode forward for every running request as a single
batch of rows with different lengths. A request is admitted only when blocks for its prompt plus
max_new_tokens are free, and they are reserved then, so a running request never runs out of
cache; finished or aborted requests give their blocks back at once.
"""
from __future__ import annotations

import math
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

from .. import backends  # noqa: F401  (registers the attention kernels)
from ..backends.cuda.hardware import cuda_missing
from ..errors import ServingError
from ..lowering.attention import select_attention_kernel
from ..ir.paged_attention import AttentionCall, attention_step
from .context import AttentionStep
from .cuda_graphs import DecodeGraphs
from .kv_pool import PagedKVPool
from .overlap import HostBuffers, InFlight, read
from .prefill_graphs import PrefillGraphs
from .step_graph import (attention_nodes, embedding_weight, kv_geometry,
                         last_position_module, step_graph)

DEFAULT_KV_BUDGET_BYTES = 1 << 30  # default pool size cap when num_kv_blocks is not given


class GenerationError(ServingError, ValueError):
    """A generation request or engine setting is invalid (the server answers it with a 4xx)."""


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token_id: int
    finished: bool
    finish_reason: str | None  # "stop" (a stop token), "length" (max_new_tokens), or None


@dataclass
class _Request:
    rid: str
    prompt: list[int]
    max_new: int
    temperature: float
    top_p: float
    stop: frozenset[int]
    generator: torch.Generator | None = None   # sampled requests: their own random stream
    slot: int = -1
    generated: list[int] = field(default_factory=list)


class GenerationEngine:
    def __init__(self, compiled, max_batch: int = 8, max_seq_len: int | None = None,
                 num_kv_blocks: int | None = None, device=None, seed: int = 0,
                 extra_tokens_per_request: int = 0, prefill_chunk: int = 2048,
                 cuda_graphs: bool | None = None, fused_step: bool = True,
                 merge_linears: bool | None = None, measure_kernels: bool | None = None,
                 prefill_graphs: bool | None = None, overlap_decode: bool | None = None):
        """device: run there (default: where the compiled weights are; another device gets a
        copy of the weights). extra_tokens_per_request: cache room reserved beyond prompt +
        max_new_tokens (a speculative verifier writes up to k draft tokens past what it keeps).
        prefill_chunk: longer prompts are prefilled in chunks of this many tokens.
        cuda_graphs: decode steps from CUDA graphs per padded batch bucket (default: on for a
        CUDA device; True elsewhere runs the same padded static step eagerly).
        fused_step: run the step graph with its decoder glue fused (runtime/fuse_step.py); False
        keeps the ATen ops as exported (for A/B timing). merge_linears: one GEMM for the linears
        that read one input (q/k/v, gate/up); None merges when the weights are copied to `device`,
        True also where they already are (a second copy of the merged weights there).
        measure_kernels: time each weight-only linear's paths at the Ms this engine runs and
        run the fastest (runtime/measure_linears.py; default: on for a CUDA device); the
        choices and timings are in `kernel_choices`. They hold process-wide for that device and
        weight key, so an engine built with False still runs what an earlier one measured
        (backends/cuda/measured_dispatch.clear() drops them). prefill_graphs: a whole fresh
        prompt into a 16-bit cache prefills from a CUDA graph per padded length bucket
        (runtime/prefill_graphs.py; needs the decode graphs' pad block; default: on with CUDA
        graphs on a CUDA device, each bucket captured at its first prompt). overlap_decode:
        enqueue each decode step before reading the previous one's tokens (runtime/overlap.py:
        the same tokens, stop conditions checked one step late, events a step() call later;
        default: on with CUDA graphs on a CUDA device)."""
        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise GenerationError(f"max_batch={max_batch!r} must be an int >= 1")
        if not (isinstance(prefill_chunk, int) and prefill_chunk >= 1):
            raise GenerationError(f"prefill_chunk={prefill_chunk!r} must be an int >= 1")
        self.compiled, self.prefill_chunk = compiled, prefill_chunk
        home = embedding_weight(compiled.graph).device
        self.device = torch.device(device) if device is not None else home
        if self.device.type == "cuda":
            missing = cuda_missing()
            if missing:
                raise GenerationError(f"GenerationEngine(device={str(self.device)!r}): {missing}")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.graph = step_graph(compiled, device=None if self.device == home else self.device,
                                fused=fused_step, merge_linears=merge_linears)
        self.last_position_gm = last_position_module(self.graph)  # prefill: last token's logits
        emb = embedding_weight(self.graph)
        info = self.graph.model_info
        self.vocab_size = int(info["vocab_size"])
        cfg = info.get("hf_config") or {}
        limit = cfg.get("max_position_embeddings") or cfg.get("n_positions")
        max_seq_len = max_seq_len or limit
        if not (isinstance(max_seq_len, int) and max_seq_len >= 2):
            raise GenerationError(f"max_seq_len={max_seq_len!r} must be an int >= 2 (the model config "
                             "gives no max_position_embeddings to default to)")
        if limit and max_seq_len > limit:
            raise GenerationError(f"max_seq_len={max_seq_len} exceeds the model's {limit} positions")
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.extra_tokens = extra_tokens_per_request
        plan = self.graph.kv_plan
        kv_heads, head_dim = kv_geometry(self.graph)
        layer_dtypes = [AttentionCall.of(n).kv_dtype for n in attention_nodes(self.graph)]
        blocks_per_seq = math.ceil((max_seq_len + self.extra_tokens) / plan.block_size)
        if num_kv_blocks is None:
            probe = PagedKVPool(plan, layer_dtypes, kv_heads, head_dim, 1, 1, emb.dtype, torch.device("meta"))
            per_block = probe.bytes_per_token() * plan.block_size
            num_kv_blocks = max(blocks_per_seq, min(max_batch * blocks_per_seq,
                                                    int(DEFAULT_KV_BUDGET_BYTES // per_block)))
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        # Graphs pad batches with a reserved slot and block (one more of each).
        self.pool = PagedKVPool(plan, layer_dtypes, kv_heads, head_dim, num_kv_blocks + use_graphs,
                                max_batch + use_graphs, emb.dtype, self.device)
        self.kernel = select_attention_kernel(plan, head_dim, self.device.type,
                                              getattr(compiled.config, "priority", "latency"))
        self.graphs = DecodeGraphs(self, capture=self.device.type == "cuda") if use_graphs else None
        for option, asked in (("prefill_graphs", prefill_graphs), ("overlap_decode", overlap_decode)):
            if asked and self.graphs is None:
                raise GenerationError(f"{option}=True needs the static decode step "
                                      "(cuda_graphs=None on a CUDA device, or cuda_graphs=True)")
        on_gpu_graphs = self.graphs is not None and self.device.type == "cuda"
        self.prefill_graphs = (PrefillGraphs(self, capture=self.device.type == "cuda")
                               if (on_gpu_graphs if prefill_graphs is None else prefill_graphs)
                               else None)
        self.overlap = on_gpu_graphs if overlap_decode is None else bool(overlap_decode)
        self._host = HostBuffers(max_batch, self.device) if self.overlap else None
        self._inflight: InFlight | None = None
        self.kernel_choices: list[dict] = []
        if measure_kernels if measure_kernels is not None else self.device.type == "cuda":
            from .measure_linears import m_buckets, measure_linears
            sizes = self.graphs.sizes if self.graphs else [1]
            self.kernel_choices = measure_linears(self.graph, m_buckets(sizes, prefill_chunk),
                                                  emb.dtype)
        # Each sampled request draws from its own generator, seeded from this sequence in
        # add_request order: its tokens do not depend on what else shares the batch.
        self._seeds = torch.Generator().manual_seed(seed)
        self.waiting: deque[_Request] = deque()
        self.running: dict[str, _Request] = {}
        self._ids = set()
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self.tokens_generated = 0

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
                    top_p: float = 1.0, stop_token_ids=(), request_id: str | None = None) -> str:
        prompt = _token_list(prompt_ids, self.vocab_size, "prompt_ids")
        if not prompt:
            raise GenerationError("prompt_ids is empty; generation needs at least one prompt token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
        if len(prompt) + max_new_tokens > self.max_seq_len:
            raise GenerationError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) "
                             f"exceeds max_seq_len={self.max_seq_len}")
        need = self.pool.blocks_for(len(prompt) + max_new_tokens + self.extra_tokens)
        total = self.stats()["kv_blocks_total"]
        if need > total:
            raise GenerationError(f"request needs {need} KV blocks; the pool has {total}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not math.isfinite(temperature) or temperature < 0:
            raise GenerationError(f"temperature={temperature!r} must be a finite number >= 0")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise GenerationError(f"top_p={top_p!r} must be in (0, 1]")
        stop = frozenset(_token_list(stop_token_ids, self.vocab_size, "stop_token_ids"))
        rid = request_id if request_id is not None else uuid.uuid4().hex
        if not isinstance(rid, str) or not rid:
            raise GenerationError(f"request_id={rid!r} must be a non-empty string")
        if rid in self._ids:
            raise GenerationError(f"request_id {rid!r} is already in use")
        self._ids.add(rid)
        req = _Request(rid, prompt, max_new_tokens, float(temperature), float(top_p), stop)
        if temperature > 0:
            seed = int(torch.randint(2 ** 62, (), generator=self._seeds))
            req.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.waiting.append(req)
        return rid

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its KV blocks; False if it is unknown or
        already finished."""
        for req in list(self.waiting):
            if req.rid == request_id:
                self.waiting.remove(req)
                self._ids.discard(request_id)
                return True
        req = self.running.get(request_id)
        if req is None:
            return False
        self._finish(req)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        reserved = 1 if self.graphs else 0   # the graphs' padding block
        return {"kv_blocks_used": self.pool.num_blocks - self.pool.free_blocks - reserved,
                "kv_blocks_total": self.pool.num_blocks - reserved, "running": len(self.running),
                "waiting": len(self.waiting), "tokens_generated": self.tokens_generated,
                "kv_bytes_per_token": self.pool.bytes_per_token()}

    # ---- stepping ---------------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        events = []
        if self._inflight is not None and self._can_admit():
            events += self._read(self._inflight)
            self._inflight = None
        while self._can_admit():
            req = self.waiting.popleft()
            req.slot = self._free_slots.pop()
            self.pool.open(req.slot, len(req.prompt) + req.max_new + self.extra_tokens)
            self.running[req.rid] = req
            prompt = torch.tensor([req.prompt], device=self.device)
            if self.prefill_graphs is not None and self.prefill_graphs.fits(req.slot, len(req.prompt)):
                logits = self.prefill_graphs.prefill(req.slot, prompt)
            else:
                for begin in range(0, prompt.shape[1], self.prefill_chunk):
                    logits = self.forward([req.slot], prompt[:, begin:begin + self.prefill_chunk],
                                          last_only=True)
            events.append(self._emit(req, int(self._draw(req, logits[0, -1]))))
        if self.overlap:
            return events + self._decode_overlapped()
        batch = list(self.running.values())
        if batch:
            last = torch.tensor([[r.generated[-1]] for r in batch], device=self.device)
            slots = [r.slot for r in batch]
            logits = self.graphs.decode(slots, last) if self.graphs else self.forward(slots, last)
            tokens = self._tokens(batch, logits).tolist()   # one device->host copy for the batch
            events.extend(self._emit(r, t) for r, t in zip(batch, tokens))
        return events

    def _can_admit(self) -> bool:
        return bool(self.waiting and self._free_slots and self.pool.free_blocks >= self.pool.blocks_for(
            len(self.waiting[0].prompt) + self.waiting[0].max_new + self.extra_tokens))

    def _decode_overlapped(self) -> list[TokenEvent]:
        """Launch the next decode step from the in-flight step's device tokens, then emit the
        in-flight step's tokens (runtime/overlap.py)."""
        prev, launched = self._inflight, None
        rows = prev.rows() if prev is not None else {}
        # A row whose in-flight token is its max_new_tokens-th gets no further step.
        batch = [r for r in self.running.values() if len(r.generated) + (id(r) in rows) < r.max_new]
        if batch:
            if prev is not None and [id(r) for r in batch] == [id(r) for r in prev.batch]:
                ids = prev.tokens[:, None]
            elif prev is not None:   # rows left the batch: take the others' tokens by row
                index = torch.tensor([rows[id(r)] for r in batch], device=self.device)
                ids = prev.tokens.index_select(0, index)[:, None]
            else:
                ids = torch.tensor([[r.generated[-1]] for r in batch], device=self.device)
            logits = self.graphs.decode([r.slot for r in batch], ids, check=False)
            launched = self._host.launch_copy(batch, self._tokens(batch, logits), self.graphs.nonfinite)
        self._inflight = launched
        events = self._read(prev) if prev is not None else []
        if launched is not None and not any(self.running.get(r.rid) is r for r in launched.batch):
            self._inflight = None   # every row ended on a stop token: nothing of it is kept
        return events

    def _read(self, step: InFlight) -> list[TokenEvent]:
        """The tokens of an in-flight step for the rows still running (aborted rows and rows
        that ended a step earlier drop theirs)."""
        tokens = read(step)
        return [self._emit(r, t) for r, t in zip(step.batch, tokens)
                if self.running.get(r.rid) is r]

    def forward(self, slots: list[int], tokens: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits [rows, new, vocab] of `tokens` [rows, new] appended to each slot's cache;
        last_only: of each row's last new token only, [rows, 1, vocab] (where the graph allows)."""
        starts = [self.pool.lengths[s] for s in slots]
        step = AttentionStep(self.pool, slots, starts, self.kernel)
        gm = self.last_position_gm if last_only and self.last_position_gm is not None else self.graph.gm
        with torch.inference_mode(), attention_step(step):
            logits = gm(tokens, step.positions(tokens.shape[1], self.device))
        self.pool.advance(slots, tokens.shape[1])
        return logits

    def _emit(self, req: _Request, token: int) -> TokenEvent:
        req.generated.append(token)
        self.tokens_generated += 1
        reason = "stop" if token in req.stop else "length" if len(req.generated) >= req.max_new else None
        if reason:
            self._finish(req)
        return TokenEvent(req.rid, token, reason is not None, reason)

    def _finish(self, req: _Request) -> None:
        self.running.pop(req.rid, None)
        self.pool.free(req.slot)
        self._free_slots.append(req.slot)
        self._ids.discard(req.rid)

    def _tokens(self, batch: list[_Request], logits: torch.Tensor) -> torch.Tensor:
        """[rows] int64 on the device: each row's next token from its logits [rows, 1, vocab]
        (one argmax for the greedy rows, a draw for each sampled one; nothing read back)."""
        tokens = logits[:, -1].argmax(-1)
        for i, r in enumerate(batch):
            if r.temperature > 0:
                tokens[i] = self._draw(r, logits[i, -1])
        return tokens

    def _draw(self, req: _Request, logits: torch.Tensor) -> torch.Tensor:
        """The next token of `req` from its logits [vocab], as a 0-dim device tensor. Sampling
        races exponential clocks (argmax of p / q, q ~ Exp(1): token i wins with probability
        p_i), which is how torch.multinomial draws one sample, without its host-side checks."""
        if req.temperature == 0:
            return logits.argmax()
        probs = torch.softmax(logits.double() / req.temperature, dim=-1)
        if req.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = (torch.cumsum(sorted_p, 0) - sorted_p) < req.top_p   # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
        clocks = torch.empty_like(probs).exponential_(generator=req.generator)
        # A clock of exactly 0 must not make 0 / 0 (NaN, which argmax would pick).
        return (probs / clocks.clamp_min_(torch.finfo(clocks.dtype).tiny)).argmax()


def _token_list(ids, vocab: int, what: str) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise GenerationError(f"{what} must be a 1-D integer tensor or a list of ints")
        ids = ids.tolist()
    try:
        out = list(ids)
    except TypeError:
        raise GenerationError(f"{what} must be a list of ints, got {type(ids).__name__}") from None
    bad = [t for t in out if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise GenerationError(f"{what} holds {len(bad)} entries that are not token ids in [0, {vocab}): "
                         f"{bad[:5]}")
    return out
