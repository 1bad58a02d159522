"""QuantGraph <-> JSON without pickle: nodes, targets by qualified name from an allow-list, and
arguments of a closed set of types. Tensors travel separately (safetensors)."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .annotations import META_KEY, NodeAnnotation
from ..errors import ArtifactError

GRAPH_FORMAT = 1
# Python callables a graph may call besides torch ops (export emits these for SymInt math / tuples).
_PY_TARGETS = {f"operator.{n}": getattr(operator, n) for n in
               ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "eq", "ne", "lt",
                "le", "gt", "ge", "and_", "or_")}
_PY_TARGETS.update({f"torch.{n}": getattr(torch, n) for n in ("sym_max", "sym_min", "sym_not",
                                                              "sym_float", "sym_int", "sym_sqrt")})


class GraphSerializationError(ArtifactError, ValueError):
    """A graph cannot be written, or a graph.json is outside the closed vocabulary."""


def _encode_target(node: fx.Node):
    t = node.target
    if node.op != "call_function":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return {"op": f"{t.namespace}.{t._schema.name.split('::')[-1]}.{t._overloadname}"}
    for name, fn in _PY_TARGETS.items():
        if fn is t:
            return {"py": name}
    raise GraphSerializationError(f"node {node.name}: cannot serialize call target {t!r}")


def _decode_target(op: str, target):
    if op != "call_function":
        return target
    if "op" in target:
        ns, name, overload = target["op"].split(".")
        try:
            return getattr(getattr(getattr(torch.ops, ns), name), overload)
        except AttributeError:
            raise GraphSerializationError(f"op {target['op']} is not registered in this process "
                                          "(is the backend that defines it importable?)") from None
    if target.get("py") in _PY_TARGETS:
        return _PY_TARGETS[target["py"]]
    raise GraphSerializationError(f"call target {target!r} is not in the allow-list")


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


def _decode_arg(a, env: dict):
    if isinstance(a, list):
        return [_decode_arg(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    if "node" in a:
        return env[a["node"]]
    if "tuple" in a:
        return tuple(_decode_arg(x, env) for x in a["tuple"])
    for key, kind in (("dtype", torch.dtype), ("layout", torch.layout), ("memory_format", torch.memory_format)):
        if key in a:
            value = getattr(torch, a[key], None)
            if not isinstance(value, kind):
                raise GraphSerializationError(f"unknown {key} {a[key]!r}")
            return value
    if "device" in a:
        return torch.device(a["device"])
    raise GraphSerializationError(f"cannot decode argument {a!r}")


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
    if data.get("format") != GRAPH_FORMAT:
        raise GraphSerializationError(f"graph format {data.get('format')!r} is not {GRAPH_FORMAT}")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        args = tuple(_decode_arg(entry["args"], env))
        kwargs = {k: _decode_arg(v, env) for k, v in entry["kwargs"].items()}
        target = _decode_target(entry["op"], entry["target"])
        if entry["op"] == "output":
            node = graph.output(args[0])
        else:
            node = graph.create_node(entry["op"], target, args, kwargs, name=entry["name"])
        if node.name != entry["name"]:
            raise GraphSerializationError(f"node name {entry['name']!r} collided on load")
        if "annotation" in entry:
            node.meta[META_KEY] = NodeAnnotation.from_dict(entry["annotation"])
        env[entry["name"]] = node
    root = torch.nn.Module()
    for name, tensor in tensors.items():
        *parents, leaf = name.split(".")
        mod = root
        for part in parents:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_buffer(leaf, tensor)
    missing = [n.target for n in graph.nodes if n.op == "get_attr" and n.target not in tensors]
    if missing:
        raise GraphSerializationError(f"graph reads tensors missing from the weights: {missing[:5]}")
    return fx.GraphModule(root, graph)
