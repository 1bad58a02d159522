"""graph.json -> torch.fx.Graph, one checked node at a time through the Graph API.

Nothing from the file reaches torch.fx before it passed the closed vocabulary (vocabulary.py):
ops from a fixed set, names that are plain identifiers, targets that are dotted identifier paths
(get_attr: a tensor of the weights file; call_function: a registered aten / sagequant op or an
allow-listed Python operator; call_method: an allow-listed tensor method), placeholders only the
model inputs sagequant declares, and arguments of closed JSON shapes referring to earlier nodes.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..config import BACKENDS, SCHEMES
from ..config.backend import PRIORITIES
from ..errors import QuantizationError
from .annotations import META_KEY, CalibrationRecord, KernelBinding, NodeAnnotation, SchedulerIR
from .formats import FORMATS
from .quant_spec import QuantSpec
from .vocabulary import (CALL_METHODS, DEVICE, GRAPH_FORMAT, MODEL_INPUTS, NODE_OPS, OP_NAMESPACES,
                         PY_TARGETS, GraphSerializationError, check_identifier, check_path,
                         check_constant_string, check_record, check_scalar, check_string, fail)

_NODE_KEYS = {"name", "op", "target", "args", "kwargs", "annotation"}
_ANNOTATION_KEYS = ("layer", "role", "scheme", "weight_spec", "input_spec", "clip_ratio",
                    "skip_reason", "calibration", "kernel", "scheduler")
_DUNDER_OPS = frozenset(f"__{p}{n}__" for p in ("", "i") for n in ("and", "or", "xor", "lshift", "rshift"))
_TAGGED = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}


def decode_graph(data, tensor_names: set[str]) -> fx.Graph:
    if not isinstance(data, dict):
        raise GraphSerializationError(f"graph.json must hold an object, got {type(data).__name__}")
    unknown = set(data) - {"format", "nodes"}
    if unknown:
        raise fail("graph.json", sorted(unknown)[0], "is not a graph.json field (format, nodes)")
    if data.get("format") != GRAPH_FORMAT:
        raise GraphSerializationError(f"graph.json field 'format' is {data.get('format')!r}; this "
                                      f"sagequant reads graph format {GRAPH_FORMAT}")
    nodes = data.get("nodes")
    if not isinstance(nodes, list) or not nodes:
        raise fail("graph.json", "nodes", "must be a non-empty list of node objects")
    for name in tensor_names:
        check_path(name, "weights.safetensors", "tensor name")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    inputs_seen: list[str] = []
    for index, entry in enumerate(nodes):
        node = _decode_node(graph, entry, index, env, tensor_names, inputs_seen,
                            last=index == len(nodes) - 1)
        env[node.name] = node
    if not inputs_seen or inputs_seen[0] != "input_ids":
        raise fail("graph.json", "nodes", "must start with the placeholder input_ids")
    return graph


def _decode_node(graph: fx.Graph, entry, index: int, env: dict, tensor_names: set[str],
                 inputs_seen: list[str], last: bool) -> fx.Node:
    where = f"graph.json node #{index}"
    if not isinstance(entry, dict):
        raise fail(where, "node", f"must be an object, got {type(entry).__name__}")
    unknown = set(entry) - _NODE_KEYS
    if unknown:
        raise fail(where, sorted(unknown)[0], f"is not a node field ({', '.join(sorted(_NODE_KEYS))})")
    name = check_identifier(entry.get("name"), where, "name")
    where = f"graph.json node #{index} {name!r}"
    if name in env:
        raise fail(where, "name", "repeats an earlier node's name")
    op = entry.get("op")
    if op not in NODE_OPS:
        raise fail(where, "op", f"is {op!r}; allowed: {', '.join(NODE_OPS)}")
    if (op == "output") != last:
        raise fail(where, "op", "output must be the last node, and only the last" if op == "output"
                   else "the last node must be the output")
    args = decode_value(entry.get("args"), env, where, "args")
    if not isinstance(args, list):
        raise fail(where, "args", "must be a list")
    kwargs = entry.get("kwargs")
    if not isinstance(kwargs, dict):
        raise fail(where, "kwargs", "must be an object")
    kwargs = {check_identifier(k, where, "kwargs key"): decode_value(v, env, where, f"kwargs.{k}")
              for k, v in kwargs.items()}
    target = entry.get("target")
    if op in ("placeholder", "get_attr") and args:
        raise fail(where, "args", f"must be empty for a {op} node")
    if op in ("placeholder", "get_attr", "output") and kwargs:
        raise fail(where, "kwargs", f"must be empty for a {op} node")
    if op == "placeholder":
        node = _placeholder(graph, name, target, where, inputs_seen)
    elif op == "get_attr":
        check_path(target, where, "target")
        if target not in tensor_names:
            raise fail(where, "target", f"{target!r} names no tensor of weights.safetensors")
        node = graph.create_node("get_attr", target, name=name)
    elif op == "call_function":
        node = graph.create_node("call_function", _function(target, where), tuple(args), kwargs, name=name)
    elif op == "call_method":
        if target not in CALL_METHODS:
            raise fail(where, "target", f"{target!r} is not an allowed tensor method; allowed: "
                                        f"{', '.join(sorted(CALL_METHODS))}")
        if not args or not isinstance(args[0], fx.Node):
            raise fail(where, "args", "a method call needs the tensor node as its first argument")
        node = graph.create_node("call_method", target, tuple(args), kwargs, name=name)
    else:
        if target != "output" or name != "output" or len(args) != 1:
            raise fail(where, "target", "the output node is named 'output', targets 'output' and "
                                        "has one argument")
        node = graph.output(args[0])
    if node.name != name:
        raise fail(where, "name", f"is reserved or taken in the generated code (fx renamed it to "
                                  f"{node.name!r})")
    if "annotation" in entry:
        if op != "call_function":
            raise fail(where, "annotation", f"only call_function nodes carry one, not {op}")
        node.meta[META_KEY] = decode_annotation(entry["annotation"], where)
    return node


def _placeholder(graph: fx.Graph, name: str, target, where: str, inputs_seen: list[str]) -> fx.Node:
    if target != name:
        raise fail(where, "target", f"{target!r} must equal the placeholder's name")
    expected = MODEL_INPUTS[len(inputs_seen)] if len(inputs_seen) < len(MODEL_INPUTS) else None
    if name != expected:
        raise fail(where, "target", f"{name!r} is not the next declared model input; a graph takes "
                                    f"{' then '.join(MODEL_INPUTS)}")
    inputs_seen.append(name)
    return graph.placeholder(name)


def _function(target, where: str):
    if not isinstance(target, dict) or len(target) != 1:
        raise fail(where, "target", 'must be {"op": "namespace.name.overload"} or {"py": name}')
    if "py" in target:
        if target["py"] not in PY_TARGETS:
            raise fail(where, "target.py", f"{str(target['py'])[:80]!r} is not in the allow-list: "
                                           f"{', '.join(PY_TARGETS)}")
        return PY_TARGETS[target["py"]]
    qualified = target.get("op")
    if not isinstance(qualified, str) or qualified.count(".") != 2:
        raise fail(where, "target.op", f"{str(qualified)[:80]!r} is not namespace.name.overload")
    ns, name, overload = qualified.split(".")
    if ns not in OP_NAMESPACES:
        raise fail(where, "target.op", f"namespace {ns[:40]!r} is not allowed ({', '.join(OP_NAMESPACES)})")
    if name not in _DUNDER_OPS:  # aten spells the bitwise operators as dunders
        check_identifier(name, where, "target.op name")
    check_identifier(overload, where, "target.op overload")
    try:
        packet = getattr(getattr(torch.ops, ns), name)
        fn = getattr(packet, overload)
    except (AttributeError, RuntimeError):
        raise GraphSerializationError(f"{where}: op {qualified} is not registered in this "
                                      "process (is the backend that defines it importable?)") from None
    if not isinstance(fn, torch._ops.OpOverload):
        raise fail(where, "target.op", f"{qualified} is not an operator overload")
    return fn


def decode_value(value, env: dict, where: str, field: str, depth: int = 0):
    """An argument: a scalar, a list, or one of the tagged objects node / tuple / dtype / device /
    layout / memory_format."""
    if depth > 16:
        raise fail(where, field, "is nested deeper than 16 levels")
    if isinstance(value, list):
        return [decode_value(v, env, where, f"{field}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, str):
        return check_constant_string(value, where, field)
    if not isinstance(value, dict):
        return check_scalar(value, where, field)
    if len(value) != 1:
        raise fail(where, field, "a tagged object has exactly one key (node, tuple, dtype, device, "
                                 "layout or memory_format)")
    (tag, inner), = value.items()
    if tag == "node":
        if not isinstance(inner, str) or inner not in env:
            raise fail(where, f"{field}.node", f"{str(inner)[:80]!r} is not an earlier node")
        return env[inner]
    if tag == "tuple":
        if not isinstance(inner, list):
            raise fail(where, f"{field}.tuple", "must be a list")
        return tuple(decode_value(v, env, where, f"{field}.tuple[{i}]", depth + 1) for i, v in enumerate(inner))
    if tag in _TAGGED:
        check_identifier(inner, where, f"{field}.{tag}")
        decoded = getattr(torch, inner, None)
        if not isinstance(decoded, _TAGGED[tag]):
            raise fail(where, f"{field}.{tag}", f"{inner!r} is not a torch {tag}")
        return decoded
    if tag == "device":
        if not isinstance(inner, str) or not DEVICE.match(inner):
            raise fail(where, f"{field}.device", f"{str(inner)[:80]!r} is not cpu, meta or cuda[:N]")
        return torch.device(inner)
    raise fail(where, field, f"tag {str(tag)[:40]!r} is not one of node, tuple, dtype, device, layout, "
                             "memory_format")


def decode_annotation(data, where: str) -> NodeAnnotation:
    field = "annotation"
    if not isinstance(data, dict):
        raise fail(where, field, f"must be an object, got {type(data).__name__}")
    keys = set(data)
    if keys != set(_ANNOTATION_KEYS):
        odd = sorted(keys ^ set(_ANNOTATION_KEYS))[0]
        raise fail(where, f"{field}.{odd}", "is " + ("missing" if odd not in keys else "not an annotation field"))
    check_path(data["layer"], where, f"{field}.layer")
    check_identifier(data["role"], where, f"{field}.role")
    _one_of(data["scheme"], SCHEMES, where, f"{field}.scheme", optional=True)
    if data["skip_reason"] is not None:  # free text (shown in reports, escaped in HTML)
        check_string(data["skip_reason"], where, f"{field}.skip_reason")
    if isinstance(data["clip_ratio"], bool) or not isinstance(data["clip_ratio"], (int, float)):
        raise fail(where, f"{field}.clip_ratio", "must be a number")
    check_scalar(data["clip_ratio"], where, f"{field}.clip_ratio")
    for key in ("weight_spec", "input_spec"):
        if data[key] is not None:
            check_record(QuantSpec, data[key], where, f"{field}.{key}")
            _one_of(data[key]["format"], FORMATS, where, f"{field}.{key}.format")
    calibration = data["calibration"]
    if not isinstance(calibration, dict):
        raise fail(where, f"{field}.calibration", "must be an object")
    for key, record in calibration.items():
        check_identifier(key, where, f"{field}.calibration key")
        check_record(CalibrationRecord, record, where, f"{field}.calibration.{key}")
        for name in ("tensor", "observer"):
            check_identifier(record[name], where, f"{field}.calibration.{key}.{name}")
    kernel = data["kernel"]
    if kernel is not None:
        check_record(KernelBinding, kernel, where, f"{field}.kernel")
        check_identifier(kernel["kernel"], where, f"{field}.kernel.kernel")
        _one_of(kernel["backend"], BACKENDS, where, f"{field}.kernel.backend")
        _one_of(kernel["scheme"], SCHEMES, where, f"{field}.kernel.scheme")
        _one_of(kernel["priority"], PRIORITIES, where, f"{field}.kernel.priority")
        _one_of(kernel.get("fallback_from"), BACKENDS, where, f"{field}.kernel.fallback_from", optional=True)
        for key in kernel.get("attrs", {}):
            check_identifier(key, where, f"{field}.kernel.attrs key")
    if data["scheduler"] is not None:
        check_record(SchedulerIR, data["scheduler"], where, f"{field}.scheduler")
        for name in ("dtype", "kernel"):
            check_identifier(data["scheduler"][name], where, f"{field}.scheduler.{name}")
    try:
        return NodeAnnotation.from_dict(data)
    except QuantizationError as e:  # a QuantSpec whose values contradict each other
        raise fail(where, f"{field}", f"holds an invalid quantization spec: {e}") from None


def _one_of(value, allowed, where: str, field: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or value not in allowed:
        raise fail(where, field, f"is {str(value)[:80]!r}; allowed: {', '.join(allowed)}"
                   + (" or null" if optional else ""))
