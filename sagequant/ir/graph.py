"""QuantGraph: the one IR every pass reads and rewrites — an ATen-level torch.fx GraphModule
whose parameters are attributes (so passes can replace weights), plus model metadata."""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .annotations import META_KEY, NodeAnnotation
from ..errors import CompileError

ATEN = torch.ops.aten


class GraphVerificationError(CompileError):
    """The graph breaks an invariant (dangling node, missing tensor, bad annotation)."""


class QuantGraph:
    def __init__(self, gm: fx.GraphModule, model_info: dict | None = None):
        self.gm = gm
        # What the frontend knew about the source model (architecture, HF config dict, vocab).
        self.model_info = dict(model_info or {})
        # The compile's KVQuantPlan, on the cache-aware step graph (runtime/step_graph.py), which
        # kv_cache_quant and the engine read.
        self.kv_plan = None

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.gm(input_ids)

    # ---- node queries ---------------------------------------------------------------------
    def nodes(self, target=None) -> list[fx.Node]:
        return [n for n in self.graph.nodes
                if n.op == "call_function" and (target is None or n.target == target)]

    def annotated(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if META_KEY in n.meta]

    @staticmethod
    def annotation(node: fx.Node) -> NodeAnnotation | None:
        return node.meta.get(META_KEY)

    @staticmethod
    def update_annotation(node: fx.Node, **changes) -> NodeAnnotation:
        """Annotations are frozen: a pass records what it decided as a new one on the node."""
        ann = dataclasses.replace(node.meta[META_KEY], **changes)
        node.meta[META_KEY] = ann
        return ann

    def attr(self, node_or_name) -> torch.Tensor:
        name = node_or_name.target if isinstance(node_or_name, fx.Node) else node_or_name
        obj = self.gm
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def set_attr(self, name: str, value: torch.Tensor) -> None:
        """Register (or replace) a tensor attribute at a dotted path, creating parents as needed."""
        *parents, leaf = name.split(".")
        mod = self.gm
        for part in parents:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        if leaf in mod._parameters:   # (a Parameter set back earlier sits in _buffers)
            del mod._parameters[leaf]
        if leaf in mod._buffers:
            del mod._buffers[leaf]
        mod.register_buffer(leaf, value)

    def get_attr_node(self, name: str, before: fx.Node) -> fx.Node:
        with self.graph.inserting_before(before):
            return self.graph.get_attr(name)

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor the graph reads through get_attr, by attribute path."""
        out = {}
        for n in self.graph.nodes:
            if n.op == "get_attr":
                out[n.target] = self.attr(n)
        return out

    def recompile(self) -> None:
        self.graph.eliminate_dead_code()
        self.graph.lint()
        self.gm.recompile()
        self._drop_unused_attrs()

    def _drop_unused_attrs(self) -> None:
        used = {n.target for n in self.graph.nodes if n.op == "get_attr"}
        for name, _ in list(self.gm.named_parameters()) + list(self.gm.named_buffers()):
            if name not in used:
                *parents, leaf = name.split(".")
                mod = self.gm.get_submodule(".".join(parents)) if parents else self.gm
                mod._parameters.pop(leaf, None)
                mod._buffers.pop(leaf, None)

    # ---- checks and printing ----------------------------------------------------------------
    def verify(self) -> None:
        """Structural invariants every pass must keep; raises naming the offending node."""
        try:
            self.graph.lint()
        except Exception as e:  # fx raises bare RuntimeErrors; say it is a graph problem
            raise GraphVerificationError(f"graph lint failed: {e}") from e
        for n in self.graph.nodes:
            if n.op == "get_attr":
                try:
                    self.attr(n)
                except AttributeError:
                    raise GraphVerificationError(
                        f"node {n.name} reads missing attribute {n.target!r}") from None
            ann = n.meta.get(META_KEY)
            if ann is not None and not isinstance(ann, NodeAnnotation):
                raise GraphVerificationError(f"node {n.name}: meta[{META_KEY!r}] is "
                                             f"{type(ann).__name__}, not NodeAnnotation")
        outputs = [n for n in self.graph.nodes if n.op == "output"]
        if len(outputs) != 1:
            raise GraphVerificationError(f"graph must have one output node, has {len(outputs)}")

    def format(self, annotated_only: bool = False) -> str:
        """Readable IR: one line per node; quantization annotations inline."""
        lines = []
        for n in self.graph.nodes:
            ann = n.meta.get(META_KEY)
            if annotated_only and ann is None:
                continue
            args = ", ".join(_fmt_arg(a) for a in n.args)
            kw = "".join(f", {k}={_fmt_arg(v)}" for k, v in n.kwargs.items())
            target = n.target if isinstance(n.target, str) else _target_name(n.target)
            line = f"%{n.name} = {n.op}[{target}]({args}{kw})"
            if ann is not None:
                line += "  # " + _fmt_annotation(ann)
            lines.append(line)
        return "\n".join(lines)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op == "call_function":
                key = _target_name(n.target)
                counts[key] = counts.get(key, 0) + 1
        return counts


def _target_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def _fmt_arg(a) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_fmt_arg(x) for x in a) + "]"
    if isinstance(a, str) and len(a) > 60:
        return repr(a[:57] + "...")
    return repr(a)


def _fmt_annotation(ann: NodeAnnotation) -> str:
    parts = [ann.layer]
    if ann.quantized:
        parts.append(f"{ann.scheme} w={ann.weight_spec.describe()}")
        if ann.input_spec:
            parts.append(f"x={ann.input_spec.describe()}")
    else:
        parts.append(f"float ({ann.skip_reason})")
    for name, rec in ann.calibration.items():
        parts.append(f"cal[{name}]={rec.observer} [{rec.min:.3g}, {rec.max:.3g}] clip={rec.clip:.3g}")
    if ann.kernel:
        parts.append(f"kernel={ann.kernel.backend}:{ann.kernel.kernel}")
    return " | ".join(parts)
