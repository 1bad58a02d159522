"""What AWQ's scale search measures with QuantConfig.awq_scale_loss="module" (AutoAWQ's
module2inspect): the output of the module a balance group's linears feed, not theirs.

- Token-wise modules (SwiGLU gate/up: silu(gate) * up -> down_proj; ir/patterns.token_wise_module)
  run on the sampled rows, as the per-linear loss does.
- Otherwise, when the linears reach exactly one linear inside their segment (q/k/v -> attention ->
  o_proj), the segment runs from its cached input on the first ATTENTION_SEQUENCES calibration
  sequences, only up to that linear, once per candidate scale (the candidate weights set in the
  graph, then restored): attention needs whole sequences, not rows. Each sequence's first
  position weighs QuantConfig.awq_sink_weight positions there.
- Groups with neither (up -> down_proj) keep the per-linear loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..calibration.awq import OutputModule
from ..calibration.sequential import SequentialRunner
from ..ir.graph import QuantGraph
from ..ir.patterns import BalanceGroup, linear_reached, token_wise_module

ATEN = torch.ops.aten
# Sequences a segment-run loss sees: 8 x 512 positions on SmolLM2 (compile 398 s vs 394 s with the
# per-linear loss, BENCHMARKS §2k).
ATTENTION_SEQUENCES = 8


def output_module(graph: QuantGraph, group: BalanceGroup) -> OutputModule | None:
    """The group's token-wise module, run on rows with the graph's current weights; None when its
    consumers reach no such module."""
    found = token_wise_module(group)
    if found is None:
        return None

    def value(env, a):
        return graph.attr(a.target) if a.op == "get_attr" else env[a]

    def fn(outputs):
        env = dict(zip(found.consumers, outputs))
        for op in found.ops:
            env[op] = op.target(*fx.map_arg(op.args, lambda a: value(env, a)),
                                **fx.map_arg(op.kwargs, lambda a: value(env, a)))
        return ATEN.linear.default(*fx.map_arg(found.output.args, lambda a: value(env, a)))
    return OutputModule(fn, [graph.attr(c.args[2].target) if len(c.args) > 2 and c.args[2] is not None else None
                             for c in group.consumers])


@dataclass
class SegmentRuns:
    """A sequential runner and, per segment, the input caches of the first calibration sequences."""

    runner: SequentialRunner | None = None
    caches: dict[int, list[dict]] = field(default_factory=dict)

    def output_error(self, graph: QuantGraph, group: BalanceGroup, sink_weight: float = 1.0):
        """fn(quantized consumer weights) -> mean squared error of the linear the group reaches,
        over the kept sequences (position 0 weighing sink_weight); None if it reaches none."""
        seg = next(s for s, nodes in enumerate(self.runner.segments) if group.consumers[0] in nodes)
        target = linear_reached(group, self.runner.segments[seg])
        if target is None or seg not in self.caches:
            return None
        names = [c.args[1].target for c in group.consumers]

        def outputs() -> list[torch.Tensor]:
            seen: list = []
            self.runner.run_segment(seg, self.caches[seg], {target: lambda node, args, out: seen.append(out)},
                                    commit=False, only_hooked=True)
            return seen
        reference = outputs()

        def error(quantized: list[torch.Tensor]) -> float:
            originals = [graph.attr(n) for n in names]
            for n, w, q in zip(names, originals, quantized):
                graph.set_attr(n, q.to(w.dtype))
            try:
                got = outputs()
            finally:
                for n, w in zip(names, originals):
                    graph.set_attr(n, w.detach())
            total = count = 0.0
            for out, ref in zip(got, reference):
                err = (out - ref).double().pow(2).sum(-1)          # [..., seq]
                weights = torch.ones(err.shape[-1], dtype=torch.float64, device=err.device)
                weights[0] = sink_weight
                total += float((err * weights).sum())
                count += float(weights.sum()) * err[..., 0].numel() * out.shape[-1]
            return total / count
        return error
