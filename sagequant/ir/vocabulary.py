"""The closed vocabulary a saved graph.json may use, checked before any torch.fx code exists.

torch.fx turns node names, placeholder / get_attr / call_method targets and kwargs keys into
Python source (GraphModule.recompile), so a string from an untrusted file that reached the Graph
unchecked could become code. Everything here refuses by default: names are plain identifiers,
targets are dotted identifier paths, and no part of either is a dunder; argument values are of a
closed set of JSON shapes. Each refusal is a GraphSerializationError naming the node and field.
"""
from __future__ import annotations

import keyword
import operator
import re
from dataclasses import MISSING, fields

import torch

from ..errors import ArtifactError

GRAPH_FORMAT = 1
# Python callables a graph may call besides torch ops (export emits these for SymInt math / tuples).
PY_TARGETS = {f"operator.{n}": getattr(operator, n) for n in
              ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "eq", "ne", "lt",
               "le", "gt", "ge", "and_", "or_")}
PY_TARGETS.update({f"torch.{n}": getattr(torch, n) for n in ("sym_max", "sym_min", "sym_not",
                                                             "sym_float", "sym_int", "sym_sqrt")})

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
PATH_PART = re.compile(r"[A-Za-z0-9_]+\Z")  # after the first part: module indices such as layers.0
NODE_OPS = ("placeholder", "get_attr", "call_function", "call_method", "output")
# Inputs a sagequant graph may declare, in this order: the tokens, then (after the kv-cache pass)
# the positions the engine passes.
MODEL_INPUTS = ("input_ids", "position_ids")
# Tensor methods a graph may call: pure shape / dtype / layout operations.
CALL_METHODS = frozenset({"view", "reshape", "contiguous", "to", "size", "dim", "transpose",
                          "permute", "unsqueeze", "squeeze", "expand", "flatten", "float", "half",
                          "bfloat16", "type_as", "clone", "t"})
OP_NAMESPACES = ("aten", "sagequant")
MAX_STRING = 4096
MAX_INT = 1 << 63
DEVICE = re.compile(r"(cpu|meta|cuda(:[0-9]{1,3})?)\Z")
CONSTANT_STRING = re.compile(r'[A-Za-z0-9_.:,{}\[\]" +-]*\Z')


class GraphSerializationError(ArtifactError, ValueError):
    """A graph cannot be written, or a graph.json is outside the closed vocabulary."""


def fail(where: str, field: str, why: str) -> GraphSerializationError:
    """`where` names the file and the place in it, e.g. "graph.json node #12 'linear_3'"."""
    return GraphSerializationError(f"{where}: field {field!r} {why}")


def check_identifier(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise fail(where, field, f"must be a string, got {type(value).__name__}")
    if not IDENTIFIER.match(value) or keyword.iskeyword(value) or value.startswith("__"):
        raise fail(where, field, f"{_short(value)} is not a plain identifier ([A-Za-z_][A-Za-z0-9_]*, "
                                 "no keyword, no leading '__')")
    return value


def check_path(value, where: str, field: str) -> str:
    """A dotted attribute path such as model.layers.0.mlp.down_proj.qweight."""
    if not isinstance(value, str):
        raise fail(where, field, f"must be a string, got {type(value).__name__}")
    parts = value.split(".")
    ok = (len(value) <= MAX_STRING and IDENTIFIER.match(parts[0]) is not None
          and all(PATH_PART.match(p) for p in parts[1:])
          and not any(p.startswith("__") or keyword.iskeyword(p) for p in parts))
    if not ok:
        raise fail(where, field, f"{_short(value)} is not a dotted identifier path (parts "
                                 "[A-Za-z0-9_]+, the first not a digit, none starting with '__')")
    return value


def check_string(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise fail(where, field, f"must be a string, got {type(value).__name__}")
    if len(value) > MAX_STRING or any(ord(c) < 32 for c in value):
        raise fail(where, field, f"{_short(value)} is not a short printable string "
                                 f"(at most {MAX_STRING} characters, no control characters)")
    return value


def check_constant_string(value, where: str, field: str) -> str:
    """A string constant argument of an op (a layout name, a QuantSpec's compact JSON): short, and
    only the characters those use, so no Python syntax can hide in one."""
    if not isinstance(value, str) or len(value) > MAX_STRING or not CONSTANT_STRING.match(value):
        raise fail(where, field, f"{_short(value)} is not a constant of the closed vocabulary "
                                 "(letters, digits and _ . : , - + { } [ ] \" and space)")
    return value


def check_scalar(value, where: str, field: str):
    """None, bool, a bounded int, a finite float, or a short string."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -MAX_INT <= value < MAX_INT:
            raise fail(where, field, f"integer {value} is out of the int64 range")
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise fail(where, field, "is not a finite number")
        return value
    if isinstance(value, str):
        return check_string(value, where, field)
    raise fail(where, field, f"has type {type(value).__name__}; allowed: null, bool, int, float, "
                             "string, list and the tagged objects node/tuple/dtype/device/layout/"
                             "memory_format")


def check_json_value(value, where: str, field: str, depth: int = 0):
    """Free-form metadata (hf_config, stats, report): JSON scalars, lists and objects; its strings
    never reach generated code, so any text is fine."""
    if depth > 32:
        raise fail(where, field, "is nested deeper than 32 levels")
    if isinstance(value, list):
        return [check_json_value(v, where, f"{field}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: check_json_value(v, where, f"{field}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, str):
        return value
    return check_scalar(value, where, field)


def check_record(cls, data, where: str, field: str) -> dict:
    """A dataclass record (CalibrationRecord, KernelBinding, ...): an object with exactly the
    class's fields (those with defaults may be left out), each of the declared JSON type."""
    if not isinstance(data, dict):
        raise fail(where, field, f"must be an object ({cls.__name__}), got {type(data).__name__}")
    declared = {f.name: f for f in fields(cls) if f.init}
    unknown = [k for k in data if k not in declared]
    if unknown:
        raise fail(where, f"{field}.{str(unknown[0])[:80]}", f"is not a field of {cls.__name__}; "
                                                          f"fields: {', '.join(declared)}")
    for name, f in declared.items():
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise fail(where, f"{field}.{name}", "is missing")
            continue
        _check_declared(data[name], str(f.type), where, f"{field}.{name}")
    return data


def _check_declared(value, type_text: str, where: str, field: str) -> None:
    kinds = [t.strip() for t in type_text.split("|")]
    if value is None:
        if "None" in kinds:
            return
        raise fail(where, field, f"must not be null (type {type_text})")
    for kind in kinds:
        if kind == "str" and isinstance(value, str):
            check_string(value, where, field)
            return
        if kind == "bool" and isinstance(value, bool):
            return
        if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
            check_scalar(value, where, field)
            return
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            check_scalar(value, where, field)
            return
        if kind == "dict" and isinstance(value, dict):
            check_json_value(value, where, field)
            return
    raise fail(where, field, f"has type {type(value).__name__}; expected {type_text}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
