"""Graph patterns shared by the smoothing passes (SmoothQuant, AWQ): "balance groups" — a
producer whose output channels can absorb a per-channel scale s, and the quantized linears that
consume exactly that output, whose weight columns absorb s in return.

  norm  -> linear, linear, ...      rms_norm / layer_norm output read only by linears (q/k/v,
                                    gate/up, GPT-2 c_attn / c_fc): the norm weight (and bias) / s
  linear -> mul(act(.), .) -> linear  up_proj -> down_proj in gated MLPs: up_proj rows / s

Also the linears that read an attention op's input (q/k/v, found back from
scaled_dot_product_attention), whose GPTQ Hessians weight the attention-sink position.

Matched on graph structure and op meaning, never on module names; a producer whose output has
any other reader (a residual add, a non-linear op) does not form a group, because scaling it
would change that reader.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import UnsupportedError
from .graph import QuantGraph

ATEN = torch.ops.aten
RMS_NORM = "rms_norm"
LAYER_NORM = "layer_norm"
LINEAR = "linear"


@dataclass
class BalanceGroup:
    kind: str                      # rms_norm | layer_norm | linear (the producer's kind)
    producer: fx.Node              # the norm node, or the producing linear node
    consumers: list[fx.Node] = field(default_factory=list)  # quantized linear nodes sharing one input

    @property
    def input_node(self) -> fx.Node:
        return self.consumers[0].args[0]

    def describe(self, graph: QuantGraph) -> str:
        names = ", ".join(graph.annotation(c).layer for c in self.consumers)
        prod = graph.annotation(self.producer).layer if self.kind == LINEAR else self.producer.name
        return f"{self.kind} {prod} -> [{names}]"


def _is_quantized_linear(graph: QuantGraph, node) -> bool:
    ann = graph.annotation(node) if isinstance(node, fx.Node) else None
    return node.target == ATEN.linear.default and ann is not None and ann.quantized


_RESHAPES = (ATEN.view.default, ATEN.reshape.default, ATEN._unsafe_view.default)


def _linear_readers(graph: QuantGraph, node: fx.Node) -> list[fx.Node] | None:
    """The quantized linears reading node's channels, looking through reshapes that keep the last
    (channel) dim (GPT-2 flattens to [-1, C] before its projections); None if anything else reads it."""
    found = []
    for u in node.users:
        if _is_quantized_linear(graph, u) and u.args[0] is node:
            found.append(u)
        elif u.target in _RESHAPES and _keeps_last_dim(node, u):
            inner = _linear_readers(graph, u)
            if not inner:
                return None
            found.extend(inner)
        else:
            return None
    return found or None


def _keeps_last_dim(src: fx.Node, reshape: fx.Node) -> bool:
    a, b = src.meta.get("val"), reshape.meta.get("val")
    return a is not None and b is not None and a.shape[-1] == b.shape[-1]


def balance_groups(graph: QuantGraph) -> list[BalanceGroup]:
    groups = []
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target == torch.ops.sagequant.rms_norm.default:
            kind = RMS_NORM
        elif node.target == ATEN.layer_norm.default and len(node.args) > 2 and node.args[2] is not None:
            kind = LAYER_NORM
        else:
            continue
        consumers = _linear_readers(graph, node)
        if consumers:
            groups.append(BalanceGroup(kind, node, consumers))
    for down in graph.nodes(ATEN.linear.default):
        if not _is_quantized_linear(graph, down):
            continue
        mul = down.args[0]
        if not (isinstance(mul, fx.Node) and mul.target == ATEN.mul.Tensor and len(mul.users) == 1):
            continue
        ups = [a for a in mul.args if isinstance(a, fx.Node) and _is_quantized_linear(graph, a)
               and len(a.users) == 1]
        if len(ups) == 1:
            groups.append(BalanceGroup(LINEAR, ups[0], [down]))
    return groups


# Ops that act on each token's row alone (a module of them over rows needs no sequence).
_TOKEN_WISE = {ATEN.silu.default, ATEN.gelu.default, ATEN.relu.default, ATEN.sigmoid.default, ATEN.tanh.default,
               ATEN.mul.Tensor, ATEN.add.Tensor, ATEN.pow.Tensor_Scalar}


@dataclass
class TokenWiseModule:
    """The ops from a balance group's consumers to the one linear they all end in, each acting on
    a token's row alone (SwiGLU: silu(gate) * up -> down_proj)."""

    consumers: list[fx.Node]
    ops: list[fx.Node]             # in graph order
    output: fx.Node                # the linear whose output is the module's


def token_wise_module(group: BalanceGroup) -> TokenWiseModule | None:
    """The TokenWiseModule from `group`'s consumers, or None when their outputs reach anything
    but token-wise ops feeding one linear (q/k/v reach attention; GPT-2's MLP reshapes first)."""
    inside, ops, outputs = set(group.consumers), [], []
    for node in group.consumers[0].graph.nodes:   # graph order: an op's inputs come before it
        reads = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        if node in inside or not any(a in inside for a in reads):
            continue
        if node.target == ATEN.linear.default and node.args[0] in inside and all(
                a.op == "get_attr" for a in reads[1:]):
            outputs.append(node)
        elif node.target in _TOKEN_WISE and all(a in inside for a in reads):
            inside.add(node)
            ops.append(node)
        else:
            return None
    return TokenWiseModule(list(group.consumers), ops, outputs[0]) if len(outputs) == 1 else None


def linear_reached(group: BalanceGroup, nodes: list[fx.Node]) -> fx.Node | None:
    """The one linear that `group`'s consumers' outputs reach through other ops among `nodes` (a
    segment: q/k/v -> attention -> o_proj), or None when they reach none or several."""
    members, seen, found, todo = set(nodes), set(group.consumers), set(), list(group.consumers)
    while todo:
        for u in todo.pop().users:
            if u in seen or u not in members:
                continue
            seen.add(u)
            if u.target == ATEN.linear.default:
                found.add(u)
            else:
                todo.append(u)
    return found.pop() if len(found) == 1 else None


SDPA = ATEN.scaled_dot_product_attention.default


class AttentionInputError(UnsupportedError):
    """No attention op, or an attention op whose q/k/v do not come from linears of one input."""


def attention_inputs(graph: QuantGraph) -> list[tuple[fx.Node, list[fx.Node]]]:
    """(attention, the quantized linears reading its input) for every scaled_dot_product_attention:
    the linears its query / key / value come from (walking back through reshapes, rotary, q/k
    norms, repeat_kv — any op but a linear), which must all read one value (q/k/v of Llama read
    input_layernorm's output; GPT-2's one c_attn)."""
    attentions = list(graph.nodes(SDPA))
    if not attentions:
        raise AttentionInputError("no aten.scaled_dot_product_attention in the graph, so no linears "
                                  "read an attention input; supported: graphs with SDPA attention")
    found, order = [], {n: i for i, n in enumerate(graph.graph.nodes)}
    for sdpa in attentions:
        linears, todo, seen = [], [a for a in sdpa.args[:3] if isinstance(a, fx.Node)], set()
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node.target == ATEN.linear.default:
                linears.append(node)
            elif node.op == "call_function":
                todo.extend(a for a in node.all_input_nodes)
        inputs = {n.args[0] for n in linears}
        if len(inputs) != 1:
            names = ", ".join(graph.annotation(n).layer if graph.annotation(n) else n.name for n in linears)
            raise AttentionInputError(f"attention {sdpa.name}: its query/key/value come from linears "
                                      f"[{names or 'none'}] reading {len(inputs)} different inputs; "
                                      "supported: q/k/v projections of one shared input")
        found.append((sdpa, sorted({n for n in linears if _is_quantized_linear(graph, n)}, key=order.__getitem__)))
    return found


def attention_input_linears(graph: QuantGraph) -> list[fx.Node]:
    """Every quantized linear that reads an attention input (attention_inputs), in graph order."""
    return list(dict.fromkeys(n for _, linears in attention_inputs(graph) for n in linears))


def sequence_source(node: fx.Node) -> fx.Node | None:
    """node if its value is [..., seq, features], else the value of that form that channel-keeping
    reshapes flattened into it (GPT-2 views [batch, seq, C] as [-1, C] before c_attn); None if
    neither is known."""
    while True:
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if val is not None and val.dim() >= 3:
            return node
        if not (isinstance(node, fx.Node) and node.target in _RESHAPES and _keeps_last_dim(node.args[0], node)):
            return None
        node = node.args[0]
