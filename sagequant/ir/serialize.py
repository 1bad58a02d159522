"""QuantGraph <-> JSON without pickle: nodes, targets by qualified name from an allow-list, and
arguments of a closed set of types. Tensors travel separately (safetensors). Loading goes through
graph_decode.py, which refuses anything outside that vocabulary before torch.fx sees it."""
from __future__ import annotations

import torch
import torch.fx as fx

from .annotations import META_KEY
from .graph_decode import decode_graph
from .vocabulary import GRAPH_FORMAT, PY_TARGETS, GraphSerializationError



def _encode_target(node: fx.Node):
    t = node.target
    if node.op != "call_function":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return {"op": f"{t.namespace}.{t._schema.name.split('::')[-1]}.{t._overloadname}"}
    for name, fn in PY_TARGETS.items():
        if fn is t:
            return {"py": name}
    raise GraphSerializationError(f"node {node.name}: cannot serialize call target {t!r}")


def _encode_arg(a, where: str):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if a is None or isinstance(a, (bool, int, float, str)):
        return a
    if isinstance(a, list):
        return [_encode_arg(x, where) for x in a]
    if isinstance(a, tuple):
        return {"tuple": [_encode_arg(x, where) for x in a]}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    raise GraphSerializationError(f"{where}: cannot serialize argument of type {type(a).__name__}")


def graph_to_json(gm: fx.GraphModule) -> dict:
    nodes = []
    for n in gm.graph.nodes:
        entry = {"name": n.name, "op": n.op, "target": _encode_target(n),
                 "args": _encode_arg(list(n.args), n.name), "kwargs": {
                     k: _encode_arg(v, f"{n.name}.{k}") for k, v in n.kwargs.items()}}
        ann = n.meta.get(META_KEY)
        if ann is not None:
            entry["annotation"] = ann.to_dict()
        nodes.append(entry)
    return {"format": GRAPH_FORMAT, "nodes": nodes}


def graph_from_json(data: dict, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """Rebuild the GraphModule node by node through the fx Graph API; every name, target and
    argument is checked against the closed vocabulary (ir/vocabulary.py, ir/graph_decode.py)
    first, so fx generates code only from identifiers and constants that were validated."""
    graph = decode_graph(data, set(tensors))
    root = torch.nn.Module()
    for name, tensor in tensors.items():
        *parents, leaf = name.split(".")
        mod = root
        for part in parents:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, tensor)
    return fx.GraphModule(root, graph)
