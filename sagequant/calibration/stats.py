"""Activation statistics for the smoothing passes, gathered with forward hooks on the sequential
runner (one decoder block at a time, so memory stays about one block's activations)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import CalibrationDataError
from ..ir.formats import QuantizationError
from ..ir.graph import QuantGraph
from ..ir.patterns import sequence_source
from ..progress import track
from .sequential import SequentialRunner


@dataclass
class ActivationStats:
    """Per input channel statistics of one tensor (a linear's input), and a sample of its rows."""

    channel_absmax: torch.Tensor       # [in]
    channel_mean_abs: torch.Tensor     # [in]
    rows: torch.Tensor | None          # [n, in] rows sampled evenly across batches, or None
    # keep_sink: every sequence's first position [sequences, in], kept apart from `rows` (then
    # sampled past it), and how many positions past it `rows` stand for.
    sink_rows: torch.Tensor | None = None
    positions: int = 0

    def scaled(self, scales: torch.Tensor) -> "ActivationStats":
        """Statistics of x / s, after a smoothing fold divided the producer by s."""
        return ActivationStats(self.channel_absmax / scales, self.channel_mean_abs / scales,
                               None if self.rows is None else self.rows / scales,
                               None if self.sink_rows is None else self.sink_rows / scales, self.positions)


def past_sink(x: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """Activations [batch, seq, features] without the first `sink_tokens` positions of each
    sequence (QuantConfig.sink_tokens: the attention-sink token's massive activations)."""
    if x.dim() < 3 or sink_tokens == 0:
        return x
    if x.shape[1] <= sink_tokens:
        raise CalibrationDataError(f"calibration sequences of {x.shape[1]} tokens leave nothing after "
                                   f"QuantConfig.sink_tokens={sink_tokens}; use longer sequences")
    return x[:, sink_tokens:]


class _Accumulator:
    def __init__(self, what: str, keep_rows: int, n_batches: int, keep_sink: bool = False):
        self.what = what
        self.per_batch = -(-keep_rows // n_batches) if keep_rows else 0
        self.keep_sink = keep_sink
        self.absmax = self.abs_sum = None
        self.count = self.positions = 0
        self.rows: list[torch.Tensor] = []
        self.sink_rows: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        sampled = rows
        if self.keep_sink:
            if x.dim() < 3:
                raise CalibrationDataError(f"{self.what}: keeping each sequence's first position needs "
                                           f"activations shaped [batch, seq, features], got {tuple(x.shape)}")
            seq = x.detach().float()
            self.sink_rows.append(seq[..., 0, :].reshape(-1, x.shape[-1]).clone())
            sampled = seq[..., 1:, :].reshape(-1, x.shape[-1])
            self.positions += sampled.shape[0]
        if not bool(torch.isfinite(rows).all()):
            raise QuantizationError(f"calibration activation {self.what} contains NaN/Inf")
        # |x| summed in float64: exact for float32 inputs, so the mean does not depend on how the
        # rows were batched or split over data-parallel ranks (AWQ's grid search amplifies 1 ulp).
        absmax, abs_sum = rows.abs().amax(0), rows.abs().sum(0, dtype=torch.float64)
        self.absmax = absmax if self.absmax is None else torch.maximum(self.absmax, absmax)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.count += rows.shape[0]
        if self.per_batch:
            step = max(1, sampled.shape[0] // self.per_batch)
            self.rows.append(sampled[::step][: self.per_batch].clone())

    def result(self) -> ActivationStats:
        return ActivationStats(self.absmax, (self.abs_sum / self.count).float(),
                               torch.cat(self.rows) if self.rows else None,
                               torch.cat(self.sink_rows) if self.keep_sink else None, self.positions)


def collect_input_stats(graph: QuantGraph, batches: list[torch.Tensor], consumers: list[fx.Node],
                        keep_rows: int = 0, desc: str = "statistics", sink_tokens: int = 0,
                        keep_sink: bool = False, before_segment=None) -> dict[fx.Node, ActivationStats]:
    """Statistics of args[0] of each consumer node over all batches, past each sequence's first
    `sink_tokens` positions, in one sequential run (progress phase `desc`, one step per segment).
    keep_sink: also every sequence's first position, apart (ActivationStats.sink_rows).
    before_segment(runner, seg, caches) is called before each segment runs."""
    runner = SequentialRunner(graph)
    caches = runner.start(batches, run_prologue=False)
    accs = _accumulators(graph, consumers, keep_rows, len(batches), keep_sink)
    hooks = _hooks(graph, accs, sink_tokens)
    for seg in track(range(len(runner.segments)), desc, unit="segment", note=runner.segment_name):
        if before_segment is not None:
            before_segment(runner, seg, caches)
        runner.run_segment(seg, caches, hooks)
    return {n: a.result() for n, a in accs.items() if a.count}


def segment_input_stats(runner: SequentialRunner, seg: int, caches: list[dict],
                        consumers: list[fx.Node], keep_rows: int = 0,
                        total_batches: int | None = None, sink_tokens: int = 0,
                        keep_sink: bool = False) -> dict[fx.Node, ActivationStats]:
    """The same statistics for consumers inside one segment, observing it without committing.
    Under data parallelism (calibration/distributed.py) caches are this rank's share of
    total_batches, and the statistics are combined across ranks."""
    from .distributed import merge_accumulator, world
    accs = _accumulators(runner.graph, consumers, keep_rows, total_batches or len(caches), keep_sink)
    hooks = _hooks(runner.graph, accs, sink_tokens)
    runner.run_segment(seg, caches, hooks, commit=False)
    if world()[1] > 1:
        for acc in accs.values():
            merge_accumulator(acc)
    return {n: a.result() for n, a in accs.items() if a.count}


def _accumulators(graph: QuantGraph, consumers: list[fx.Node], keep_rows: int, n_batches: int,
                  keep_sink: bool = False):
    return {n: _Accumulator(f"input of {graph.annotation(n).layer if graph.annotation(n) else n.name}",
                            keep_rows, n_batches, keep_sink) for n in consumers}


def _hooks(graph: QuantGraph, accs: dict, sink_tokens: int) -> dict:
    """run_segment hooks feeding each consumer's accumulator its input. Keeping the sink, a
    consumer whose input was flattened (GPT-2 views [batch, seq, C] as [-1, C] before c_attn) is
    fed the [batch, seq, C] value it was flattened from: the same rows, with their positions."""
    hooks: dict = {}
    for n, acc in accs.items():
        source = sequence_source(n.args[0]) if acc.keep_sink else n.args[0]
        if source is None or source is n.args[0]:
            hooks[n] = lambda node, args, out, acc=acc: acc.add(past_sink(args[0], sink_tokens))
        else:
            prev = hooks.get(source)
            hooks[source] = lambda node, args, out, acc=acc, prev=prev: (
                prev and prev(node, args, out), acc.add(past_sink(out, sink_tokens)))
    return hooks
