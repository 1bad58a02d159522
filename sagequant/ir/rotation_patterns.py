"""Graph patterns of the rotate pass, on the canonical graph (rms_norm collapsed, every projection
one aten.linear): the residual stream of a pre-norm decoder and the ops that read and write it.

  stream   the token embedding's output, followed through value-preserving ops (casts, slices of
           non-channel dims, reshapes keeping the channel dim, multiplies by a scalar) and through
           the residual adds
  readers  sagequant::rms_norm of a stream tensor whose output only linears read (q/k/v,
           gate/up, the head)
  writers  the linear added into the stream (o_proj: its input comes from attention; down_proj:
           its input is an MLP activation, where the online rotation goes)
  heads    v_proj -> scaled_dot_product_attention (value) -> o_proj, through ops that move whole
           head_dim rows only, for the per-head rotation

Anything else reading the stream (a LayerNorm, which subtracts the mean; a post-norm on a
writer's output, as in Gemma 2/3; an output of hidden states) cannot commute with a rotation: the
match fails with a RotationMatchError naming the node, instead of rotating a different function.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import UnsupportedError
from .graph import QuantGraph

ATEN = torch.ops.aten
RMS_NORM = torch.ops.sagequant.rms_norm.default
SDPA = ATEN.scaled_dot_product_attention.default
_SAME = (ATEN.to.dtype, ATEN.to.dtype_layout, ATEN._to_copy.default, ATEN.type_as.default,
         ATEN.clone.default, ATEN.alias.default, ATEN.contiguous.default)
_RESHAPES = (ATEN.view.default, ATEN.reshape.default, ATEN._unsafe_view.default)
_ROW_MOVES = _SAME + _RESHAPES + (ATEN.transpose.int, ATEN.permute.default, ATEN.expand.default,
                                  ATEN.slice.Tensor, ATEN.unsqueeze.default, ATEN.squeeze.dim)
_ACTIVATIONS = (ATEN.mul.Tensor, ATEN.silu.default, ATEN.gelu.default, ATEN.relu.default)
_SHAPE_ONLY = (ATEN.sym_size.int,)


class RotationMatchError(UnsupportedError):
    """The graph is not a pre-norm residual decoder the rotate pass can rotate; names the node."""


@dataclass
class HeadPair:
    v_proj: fx.Node
    o_proj: fx.Node
    head_dim: int
    kv_heads: int
    heads: int


@dataclass
class RotationMatch:
    embedding: fx.Node
    hidden: int
    norms: list[tuple[fx.Node, list[fx.Node]]] = field(default_factory=list)  # norm, its linears
    writers: list[fx.Node] = field(default_factory=list)                       # o_proj, down_proj
    mlp_writers: list[fx.Node] = field(default_factory=list)                   # down_proj
    heads: list[HeadPair] = field(default_factory=list)


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if val is not None else None


def _last(node) -> int | None:
    shape = _shape(node)
    return shape[-1] if shape and isinstance(shape[-1], int) else None  # None: unknown or symbolic


def _touches_last(node: fx.Node) -> bool:
    """Does this row-moving op move elements within the last dim (so it would mix a rotation)?"""
    src = node.args[0]
    ndim = len(_shape(src) or ())
    if not ndim:
        return True  # no shape recorded: assume the worst
    t = node.target
    if t == ATEN.transpose.int:
        return ndim - 1 in (node.args[1] % ndim, node.args[2] % ndim)
    if t == ATEN.permute.default:
        return node.args[1][-1] % ndim != ndim - 1
    if t == ATEN.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else 0
        return dim % ndim == ndim - 1
    if t in _RESHAPES:  # splitting or merging whole rows of the last dim keeps each row intact
        a, b = _last(src), _last(node)
        return not (a and b and (a % b == 0 or b % a == 0))
    if t in (ATEN.expand.default, ATEN.unsqueeze.default, ATEN.squeeze.dim):
        return _last(node) != _last(src)
    return False


def _is_scalar(a) -> bool:
    if isinstance(a, (int, float)):
        return True
    shape = _shape(a)
    return shape is not None and all(isinstance(s, int) and s == 1 for s in shape)


def _stream_step(node: fx.Node, src: fx.Node) -> bool:
    """node keeps src's channels as they are (so node's output is a stream tensor too)."""
    if node.target in _SAME:
        return node.args[0] is src
    if node.target in _RESHAPES + (ATEN.slice.Tensor,):
        return node.args[0] is src and _last(node) == _last(src) and not _touches_last(node)
    if node.target in (ATEN.mul.Tensor, ATEN.div.Tensor):  # Gemma's sqrt(hidden) embedding scale
        a, b = node.args[:2]
        if a is src:
            return _is_scalar(b)
        return node.target == ATEN.mul.Tensor and b is src and _is_scalar(a)
    return False


def _reads_only_meta(node: fx.Node, src: fx.Node) -> bool:
    """node reads src's shape or dtype only (sym_size; type_as(other, src))."""
    return node.target in _SHAPE_ONLY or node.target == ATEN.type_as.default and node.args[0] is not src


def _linear_readers(node: fx.Node) -> list[fx.Node]:
    """The linears reading node's channels (through value-preserving ops); raises on any other reader."""
    found = []
    for u in node.users:
        if u.target == ATEN.linear.default and u.args[0] is node:
            found.append(u)
        elif _reads_only_meta(u, node):
            continue
        elif u.target in _SAME + _RESHAPES + (ATEN.slice.Tensor,) and _stream_step(u, node):
            found.extend(_linear_readers(u))
        else:
            raise RotationMatchError(f"rotate: the norm output {node.name} is read by {u.name} "
                                     f"({_op(u)}); only linears may read a rotated norm's output")
    return found


def _writer(add: fx.Node, operand) -> fx.Node:
    """The linear whose output (through casts) is `operand` of a residual add."""
    cur = operand
    while isinstance(cur, fx.Node) and cur.target in _SAME and len(cur.users) == 1:
        cur = cur.args[0]
    if not (isinstance(cur, fx.Node) and cur.target == ATEN.linear.default and len(cur.users) == 1):
        name = operand.name if isinstance(operand, fx.Node) else repr(operand)
        what = "a normalised sub-layer output (post-norm, as in Gemma 2/3)" if isinstance(cur, fx.Node) \
            and cur.target == RMS_NORM else (_op(cur) if isinstance(cur, fx.Node) else "a constant")
        raise RotationMatchError(f"rotate: residual add {add.name} adds {name}, which is {what}, not "
                                 "the output of a linear read by nothing else; rotate supports pre-norm "
                                 "decoders (Llama, Qwen2, Mistral style)")
    return cur


def _back_to_attention(x: fx.Node) -> fx.Node | None:
    cur = x
    while cur.target in _ROW_MOVES:
        cur = cur.args[0]
    return cur if cur.target == SDPA else None


def match_rotation(graph: QuantGraph, heads: bool = True) -> RotationMatch:
    embeds = graph.nodes(ATEN.embedding.default)
    if len(embeds) != 1 or embeds[0].args[0].op != "get_attr":
        raise RotationMatchError(f"rotate: expected one token embedding (aten.embedding of a weight), "
                                 f"found {len(embeds)} ({', '.join(e.name for e in embeds)}); learned "
                                 "position embeddings (GPT-2 style) are not supported")
    emb = embeds[0]
    found = RotationMatch(emb, int(graph.attr(emb.args[0]).shape[1]))
    stream, adds, todo = {emb}, [], [emb]
    while todo:
        src = todo.pop()
        for u in src.users:
            if u in stream or _reads_only_meta(u, src):
                continue
            if u.target == RMS_NORM and u.args[0] is src:
                found.norms.append((u, _linear_readers(u)))
                continue
            if u.target == ATEN.add.Tensor:
                adds.append(u)
            elif not _stream_step(u, src):
                why = " (a LayerNorm subtracts the mean, which no rotation keeps)" \
                    if u.target == ATEN.layer_norm.default else ""
                raise RotationMatchError(f"rotate: the residual stream tensor {src.name} is read by "
                                         f"{u.name} ({_op(u)}), which does not commute with a rotation{why}")
            stream.add(u)
            todo.append(u)
    for add in adds:
        for operand in add.args[:2]:
            if operand not in stream:
                found.writers.append(_writer(add, operand))
    if not found.norms or not found.writers:
        raise RotationMatchError(f"rotate: found {len(found.norms)} RMSNorms and {len(found.writers)} "
                                 "residual writers on the embedding's residual stream; nothing to rotate")
    for lin in found.writers:
        x = lin.args[0]
        sdpa = _back_to_attention(x)
        if sdpa is not None:
            if heads:
                found.heads.append(_head_pair(sdpa, lin))
        elif x.target in _ACTIVATIONS:
            found.mlp_writers.append(lin)
        else:
            raise RotationMatchError(f"rotate: residual writer {lin.name} reads {x.name} ({_op(x)}): "
                                     "neither an attention output nor an MLP activation")
    _check_widths(graph, found)
    return found


def _head_pair(sdpa: fx.Node, o_proj: fx.Node) -> HeadPair:
    head_dim = _last(sdpa)
    cur = sdpa.args[2]
    while cur.target in _ROW_MOVES and len(cur.users) == 1:
        if _last(cur) != head_dim or _touches_last(cur):
            break
        cur = cur.args[0]
    if cur.target != ATEN.linear.default or len(cur.users) != 1:
        raise RotationMatchError(f"rotate: the value input of {sdpa.name} does not come from one "
                                 f"linear through head-preserving ops (stopped at {cur.name}, {_op(cur)}); "
                                 "set QuantConfig.rotate_heads=False")
    chain = o_proj.args[0]
    while chain is not sdpa:
        inner = chain is not o_proj.args[0]
        if len(chain.users) != 1 or chain.target not in _ROW_MOVES or _touches_last(chain) or (
                inner and _last(chain) != head_dim):
            raise RotationMatchError(f"rotate: {chain.name} ({_op(chain)}) between {sdpa.name} and "
                                     f"{o_proj.name} mixes head channels; set QuantConfig.rotate_heads=False")
        chain = chain.args[0]
    v_out, o_in = _last(cur), _last(o_proj.args[0])
    if v_out % head_dim or o_in % head_dim:
        raise RotationMatchError(f"rotate: {cur.name} ({v_out}) / {o_proj.name} ({o_in}) widths are "
                                 f"not multiples of head_dim {head_dim}")
    return HeadPair(cur, o_proj, head_dim, v_out // head_dim, o_in // head_dim)


def _check_widths(graph: QuantGraph, found: RotationMatch) -> None:
    d = found.hidden
    bad = [(lin, "in") for _, readers in found.norms for lin in readers
           if graph.attr(lin.args[1]).shape[1] != d]
    bad += [(lin, "out") for lin in found.writers if graph.attr(lin.args[1]).shape[0] != d]
    if bad:
        lin, side = bad[0]
        raise RotationMatchError(f"rotate: {lin.name} has {side}_features "
                                 f"{tuple(graph.attr(lin.args[1]).shape)}, not the hidden size {d}")
    for lin in [l for _, r in found.norms for l in r] + found.writers:
        for arg in lin.args[1:3]:
            if arg is not None and arg.op != "get_attr":
                raise RotationMatchError(f"rotate: {lin.name} reads {arg.name}, not a graph parameter")


def _op(node: fx.Node) -> str:
    t = node.target
    return t.name() if isinstance(t, torch._ops.OpOverload) else str(t)
