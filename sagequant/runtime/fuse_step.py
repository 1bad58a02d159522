"""Fuse a step graph's non-GEMM glue into the ops of backends/cuda/fused.py (one kernel each on
CUDA, the same ATen math elsewhere), so a decode step launches a few kernels per layer instead
of ~30:

  add(a, b) -> rms_norm          add_rms_norm(a, b, w, eps): the sum's other readers take its
                                 second output (the residual stream)
  q*cos + rotate_half(q)*sin     rotary_embedding(q, cos, sin)
  paged_attention(rot q, rot k)  paged_attention(q, k, ..., cos=, sin=): rotary moves into the
                                 attention prologue (one launch with the cache write at decode)
  silu(g) * u                    silu_mul(g, u)
  linears reading one input      one linear over the weights concatenated along N (q/k/v,
                                 gate/up), each old output a slice of the new one: fewer, fuller
                                 GEMM launches at decode, one activation quantization for W8A8

Only the exact Hugging Face spellings are matched (the ones torch.export gives for Llama-family
layers); anything else is left as it is, so an unmatched model still runs unfused.
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from ..backends.cuda import fused  # noqa: F401  (registers the fused ops)
from ..ir.graph import QuantGraph
from ..ir.paged_attention import AttentionCall, paged_attention

aten = torch.ops.aten
RMS_NORM = torch.ops.sagequant.rms_norm.default
ADD_RMS_NORM = torch.ops.sagequant.add_rms_norm.default
ROTARY = torch.ops.sagequant.rotary_embedding.default
SILU_MUL = torch.ops.sagequant.silu_mul.default
_BIG = 2 ** 62  # export's slice "to the end" is sys.maxsize


def fuse_step(graph: QuantGraph, merge_linears: bool = True) -> dict[str, int]:
    """Rewrite `graph` in place; returns how many of each fusion it made. merge_linears=False
    leaves the linears as they are: merging concatenates their weights into new tensors, which
    costs that much memory wherever the originals stay alive (the compiled model's own device)."""
    g = graph.graph
    counts = {"merged_linears": _merge_parallel_linears(graph) if merge_linears else 0,
              "add_rms_norm": _fuse_norms(g), "rotary_embedding": _fuse_rotary(g),
              "silu_mul": _fuse_silu_mul(g)}
    counts["rotary_in_attention"] = _rotary_into_attention(g)
    g.eliminate_dead_code()
    graph.recompile()
    return counts


# Linear ops whose weight tensors all have out_features first (rows of the output), so that
# concatenating them along dim 0 is the linear over the concatenated outputs. Value: positions
# of the weight tensors, of the [N, K] shape argument (None: none), and of args that must be None.
_LINEARS = {aten.linear.default: ((1, 2), None, ())}
for _name, _none in (("cuda_weight_only_linear", ()), ("weight_only_linear_ref", ()),
                     ("cuda_w8a8_fp8_linear", (8,)), ("cuda_w8a8_int8_linear", (8,)),
                     ("w8a8_linear_ref", (8,))):
    _op = getattr(torch.ops.sagequant, _name, None)
    if _op is not None:
        _LINEARS[_op.default] = ((1, 2, 3, 4), 6, _none)
LINEAR_OPS = frozenset(_LINEARS)   # linear ops over [..., in_features] (the lm_head among them)


def _call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target == target


def _fuse_norms(g: fx.Graph) -> int:
    done = 0
    for norm in list(g.nodes):
        if not _call(norm, RMS_NORM) or len(norm.args) != 4 or norm.args[3] != 0 or norm.kwargs:
            continue
        add, weight, eps = norm.args[0], norm.args[1], norm.args[2]
        if not (_call(add, aten.add.Tensor) and len(add.args) == 2 and not add.kwargs
                and all(isinstance(a, fx.Node) for a in add.args)):
            continue
        order = {n: i for i, n in enumerate(g.nodes)}
        if isinstance(weight, fx.Node) and order[weight] > order[add]:
            if weight.op != "get_attr":
                continue
            add.prepend(weight)  # a get_attr has no inputs: safe to read it earlier
        with g.inserting_after(add):
            both = g.call_function(ADD_RMS_NORM, (add.args[0], add.args[1], weight, eps))
        with g.inserting_after(both):
            normed = g.call_function(operator.getitem, (both, 0))
        with g.inserting_after(normed):
            total = g.call_function(operator.getitem, (both, 1))
        norm.replace_all_uses_with(normed)
        add.replace_all_uses_with(total)
        g.erase_node(norm)
        g.erase_node(add)
        done += 1
    return done


def _merge_key(graph: QuantGraph, node: fx.Node):
    """What must be equal for two linears to merge (None: this one cannot): the op, its input,
    its non-tensor args; its weight tensors must be get_attrs with out_features rows."""
    spec = _LINEARS.get(node.target) if node.op == "call_function" else None
    if spec is None or node.kwargs:
        return None
    tensors, shape_at, must_be_none = spec
    args = list(node.args) + [None] * (max(tensors) + 1 - len(node.args))
    if any(args[i] is not None for i in must_be_none if i < len(args)):
        return None
    rows = None
    for i in tensors:
        a = args[i]
        if a is None:
            continue
        if not (isinstance(a, fx.Node) and a.op == "get_attr"):
            return None
        t = graph.attr(a)
        rows = t.shape[0] if rows is None else rows
        if t.dim() == 0 or t.shape[0] != rows:
            return None
    if shape_at is not None and args[shape_at][0] != rows:
        return None
    fixed = tuple(repr(a) if i not in tensors else a is None
                  for i, a in enumerate(args) if i not in (0, shape_at))
    return node.target, args[0], fixed


def _merge_parallel_linears(graph: QuantGraph) -> int:
    g, groups = graph.graph, {}
    for node in g.nodes:
        key = _merge_key(graph, node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    merged = 0
    for (target, _, _), nodes in groups.items():
        if len(nodes) < 2:
            continue
        tensors, shape_at, _ = _LINEARS[target]
        first = nodes[0]
        args = list(first.args)
        for i in tensors:
            if i < len(args) and args[i] is not None:
                name = f"{args[i].target}_merged{len(nodes)}"
                graph.set_attr(name, torch.cat([graph.attr(n.args[i]) for n in nodes], dim=0))
                args[i] = graph.get_attr_node(name, first)
        sizes = [graph.attr(n.args[1]).shape[0] for n in nodes]
        if shape_at is not None:
            args[shape_at] = [sum(sizes), first.args[shape_at][1]]
        with g.inserting_before(first):
            new = g.call_function(target, tuple(args))
        start = 0
        for n, size in zip(nodes, sizes):
            with g.inserting_after(new):
                part = g.call_function(aten.slice.Tensor, (new, -1, start, start + size))
            n.replace_all_uses_with(part)
            g.erase_node(n)
            start += size
        merged += len(nodes)
    return merged


def _half_slice(node, x, start: int, end: int) -> bool:
    if not (_call(node, aten.slice.Tensor) and node.args[0] is x and len(node.args) == 4):
        return False
    _, dim, lo, hi = node.args
    return dim in (3, -1) and lo == start and (hi == end or (end is None and hi >= _BIG))


def _rotary_parts(add):
    """(x, cos, sin) when `add` is x * cos + cat([-x[..., h:], x[..., :h]], -1) * sin."""
    if not (_call(add, aten.add.Tensor) and len(add.args) == 2 and not add.kwargs):
        return None
    m1, m2 = add.args
    if not (_call(m1, aten.mul.Tensor) and _call(m2, aten.mul.Tensor)):
        return None
    x, cos = m1.args
    cat, sin = m2.args
    if not (_call(cat, aten.cat.default) and len(cat.args) == 2 and cat.args[1] in (3, -1)):
        return None
    parts = cat.args[0]
    if len(parts) != 2 or not _call(parts[0], aten.neg.default):
        return None
    hi_half, lo_half = parts[0].args[0], parts[1]
    if not (isinstance(hi_half, fx.Node) and _call(hi_half, aten.slice.Tensor)):
        return None
    half = hi_half.args[2]
    if not (isinstance(half, int) and _half_slice(hi_half, x, half, None) and _half_slice(lo_half, x, 0, half)):
        return None
    val = x.meta.get("val")
    if val is not None and (val.dim() != 4 or val.shape[-1] != 2 * half):
        return None
    return x, cos, sin


def _replace_matches(g: fx.Graph, op, match) -> int:
    """Replace every node for which match(node) gives the args of one `op` call by that call."""
    done = 0
    for node in list(g.nodes):
        args = match(node)
        if args is None:
            continue
        with g.inserting_before(node):
            new = g.call_function(op, args)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        done += 1
    return done


def _fuse_rotary(g: fx.Graph) -> int:
    return _replace_matches(g, ROTARY, _rotary_parts)


def _silu_mul_args(mul):
    if not (_call(mul, aten.mul.Tensor) and len(mul.args) == 2 and not mul.kwargs):
        return None
    act, up = mul.args
    if not (_call(act, aten.silu.default) and len(act.users) == 1 and isinstance(up, fx.Node)):
        return None
    return (act.args[0], up)


def _fuse_silu_mul(g: fx.Graph) -> int:
    return _replace_matches(g, SILU_MUL, _silu_mul_args)


def _rotary_into_attention(g: fx.Graph) -> int:
    done = 0
    for attn in list(g.nodes):
        if not _call(attn, paged_attention) or attn.kwargs:
            continue
        call = AttentionCall.of(attn)
        q, k = call.q, call.k
        if not (_call(q, ROTARY) and _call(k, ROTARY) and q.args[1:] == k.args[1:]
                and len(q.users) == 1 and len(k.users) == 1):
            continue
        rotated = replace(call, q=q.args[0], k=k.args[0], cos=q.args[1], sin=q.args[2])
        attn.args, attn.kwargs = rotated.args(), rotated.kwargs()
        done += 1
    return done

