"""insert_observers: put an observer module on the input of every quantized linear (PT2E-style
call_module nodes); `calibrate` runs data through them and removes them again."""
from __future__ import annotations

from ..calibration.observers import FORMAT_AWARE_OBSERVERS, observer_for
from ..ir.graph import QuantGraph
from .manager import PassContext, PassResult, define_pass

OBSERVER_PREFIX = "sq_observer_"


@define_pass("insert_observers", "insert activation observers on quantized linear inputs",
               requires=("annotate",))
def insert_observers(graph: QuantGraph, ctx: PassContext) -> PassResult:
    inserted = 0
    for node in graph.annotated():
        ann = graph.annotation(node)
        if not ann.quantized:
            continue
        name = f"{OBSERVER_PREFIX}{inserted}"
        graph.gm.add_module(name, input_observer(ann, ctx.config))
        x = node.args[0]
        with graph.graph.inserting_before(node):
            obs = graph.graph.call_module(name, (x,))
        node.replace_input_with(x, obs)
        inserted += 1
    graph.gm.recompile()
    return PassResult(graph, inserted > 0, {"observers": inserted})


def input_observer(ann, config):
    """The observer of a quantized linear's input, as QuantConfig.observer_kind asks."""
    kind, fmt = config.observer_kind, None
    if ann.input_spec is not None:
        fmt = ann.input_spec.fmt
    elif kind in FORMAT_AWARE_OBSERVERS:
        # 16-bit inputs (a per-layer override) have no format to optimise a clip for; their
        # record only documents the range, and says minmax.
        kind = "minmax"
    return observer_for(kind, f"input of {ann.layer}", fmt)


def observer_nodes(graph: QuantGraph):
    return [n for n in graph.graph.nodes
            if n.op == "call_module" and str(n.target).startswith(OBSERVER_PREFIX)]
