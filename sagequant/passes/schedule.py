"""schedule: annotate every lowered node with Scheduler IR — the seed's `dtype` and `kernel`, plus
bytes moved and FLOPs per token so a scheduler can batch and order work by cost."""
from __future__ import annotations

from ..ir.annotations import SchedulerIR
from ..ir.graph import QuantGraph
from ..ir.lowered import LinearCall
from .manager import PassContext, PassResult, define_pass


@define_pass("schedule", "annotate lowered nodes with Scheduler IR (dtype, kernel, bytes, flops)",
               requires=("lower",))
def schedule(graph: QuantGraph, ctx: PassContext) -> PassResult:
    annotated = 0
    for node in graph.annotated():
        ann = graph.annotation(node)
        if ann.kernel is None:
            continue
        attrs = ann.kernel.attrs
        k, n = attrs["in_features"], attrs["out_features"]
        weight_bytes = sum(int(graph.attr(a).numel() * graph.attr(a).element_size())
                           for a in _stored_weight_tensors(LinearCall.of(node).weights))
        graph.update_annotation(node, scheduler=SchedulerIR(
            dtype=ann.weight_spec.format, kernel=ann.kernel.kernel, weight_bytes=weight_bytes,
            bytes_per_token=(k + n) * attrs["activation_bytes"], flops_per_token=2 * k * n))
        annotated += 1
    return PassResult(graph, annotated > 0, {"scheduled": annotated})


def _stored_weight_tensors(args) -> list:
    """The get_attr nodes behind a kernel's weight operands, also through nodes computed from
    stored tensors (e.g. double-quantized NF4 scales dequantized in the graph)."""
    found, stack, seen = [], [a for a in args if hasattr(a, "op")], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr":
            found.append(n)
        elif n.op == "call_function":
            stack.extend(a for a in n.all_input_nodes)
    return found


def scheduler_ir(graph: QuantGraph) -> list[dict]:
    """Scheduler IR of the whole graph as JSON-ready dicts, in execution order."""
    out = []
    for node in graph.annotated():
        ann = graph.annotation(node)
        if ann.scheduler is not None:
            out.append({"node": node.name, "layer": ann.layer, **ann.scheduler.to_dict()})
    return out
