"""canonicalize: collapse ATen spellings into named ops so later passes match on meaning.

- RMSNorm, spelled pow -> mean -> add(eps) -> rsqrt -> mul -> [to] -> mul(weight) (Llama, Qwen2,
  Mistral) or with a (1 + weight) scale (Gemma), becomes sagequant::rms_norm(x, w, eps, offset).
- A Conv1D-style addmm(bias, x, W[in, out]) (GPT-2) becomes aten.linear(x, W^T, bias), so every
  projection is one aten.linear with a [out, in] weight.
- LayerNorm already is one op (aten.layer_norm) after export and stays as it is.
- Export's runtime metadata assertions are dropped: they pin dtype/device and block rewrites.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.graph import QuantGraph
from ..ir import ops  # noqa: F401  (registers sagequant::rms_norm)
from .manager import PassContext, PassResult, define_pass

ATEN = torch.ops.aten
_CASTS = (ATEN.to.dtype, ATEN.type_as.default, ATEN._to_copy.default)


@define_pass("canonicalize", "collapse RMSNorm and Conv1D-addmm into named ops; drop export asserts")
def canonicalize(graph: QuantGraph, ctx: PassContext) -> PassResult:
    asserts = _drop_asserts(graph)
    norms = _collapse_rms_norms(graph)
    addmms = _addmm_to_linear(graph)
    graph.recompile()
    stats = {"rms_norm": norms, "addmm_to_linear": addmms, "asserts_dropped": asserts,
             "linear": len(graph.nodes(ATEN.linear.default)),
             "layer_norm": len(graph.nodes(ATEN.layer_norm.default))}
    return PassResult(graph, bool(asserts or norms or addmms), stats)


def _drop_asserts(graph: QuantGraph) -> int:
    dropped = 0
    for n in graph.nodes(ATEN._assert_tensor_metadata.default):
        graph.graph.erase_node(n)
        dropped += 1
    return dropped


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _strip_casts(node):
    while _is(node, *_CASTS):
        node = node.args[0]
    return node


def _match_rms_core(rsqrt: fx.Node):
    """rsqrt(add(mean(pow(x, 2), [-1], keepdim), eps)) -> (x, eps), else None."""
    add = rsqrt.args[0]
    if not _is(add, ATEN.add.Tensor, ATEN.add.Scalar) or not isinstance(add.args[1], float):
        return None
    mean = add.args[0]
    if not _is(mean, ATEN.mean.dim) or list(mean.args[1]) not in ([-1],) or not (
            len(mean.args) > 2 and mean.args[2]):
        return None
    pw = mean.args[0]
    if not _is(pw, ATEN.pow.Tensor_Scalar) or pw.args[1] != 2:
        return None
    return pw.args[0], add.args[1]


def _weight_operand(node):
    """get_attr weight, optionally cast, optionally (w + c): -> (get_attr node, offset)."""
    offset = 0.0
    node = _strip_casts(node)
    if _is(node, ATEN.add.Tensor) and isinstance(node.args[1], (int, float)):
        offset = float(node.args[1])
        node = _strip_casts(node.args[0])
    if isinstance(node, fx.Node) and node.op == "get_attr":
        return node, offset
    return None


def _collapse_rms_norms(graph: QuantGraph) -> int:
    count = 0
    for rsqrt in graph.nodes(ATEN.rsqrt.default):
        core = _match_rms_core(rsqrt)
        if core is None:
            continue
        x, eps = core
        normed = next((u for u in rsqrt.users if _is(u, ATEN.mul.Tensor) and x in u.args), None)
        if normed is None:
            continue
        # Follow the single-user cast chain to the multiply by the weight.
        cur = normed
        while len(cur.users) == 1 and _is(next(iter(cur.users)), *_CASTS):
            cur = next(iter(cur.users))
        if len(cur.users) != 1:
            continue
        mul_w = next(iter(cur.users))
        if not _is(mul_w, ATEN.mul.Tensor):
            continue
        other = mul_w.args[1] if mul_w.args[0] is cur else mul_w.args[0]
        weight = _weight_operand(other)
        if weight is None:
            continue
        w_node, offset = weight
        # The norm's own upcast (x.to(float32)) is inside sagequant::rms_norm; feeding it the
        # uncast input keeps the output in the model's dtype (bf16/fp16 models), as HF returns.
        with graph.graph.inserting_before(mul_w):
            fused = graph.graph.call_function(torch.ops.sagequant.rms_norm.default,
                                              (_strip_casts(x), w_node, float(eps), offset))
        fused.meta.update({k: v for k, v in mul_w.meta.items() if k in ("nn_module_stack", "val")})
        mul_w.replace_all_uses_with(fused)
        count += 1
    graph.graph.eliminate_dead_code()
    return count


def _addmm_to_linear(graph: QuantGraph) -> int:
    count = 0
    for addmm in graph.nodes(ATEN.addmm.default):
        bias, x, w = addmm.args[:3]
        if addmm.kwargs or not (isinstance(w, fx.Node) and w.op == "get_attr") or len(w.users) != 1:
            continue
        # Store the weight as [out, in] like nn.Linear, so every later pass sees one layout.
        graph.set_attr(w.target, graph.attr(w).detach().t().contiguous())
        with graph.graph.inserting_before(addmm):
            lin = graph.graph.call_function(ATEN.linear.default, (x, w, bias))
        lin.meta.update(addmm.meta)
        addmm.replace_all_uses_with(lin)
        graph.graph.erase_node(addmm)
        count += 1
    return count
