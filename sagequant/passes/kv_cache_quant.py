"""kv_cache_quant: choose how each attention layer's KV cache is stored, from the KVQuantPlan.

Sets the kv_dtype argument of every paged_attention node (written by the kv_cache pass): the
plan's dtype (int8 / fp8 e4m3, 1 byte per element plus per (block, head, group) scales), or
"none" (16-bit / float) for the plan's high-precision layers. The op quantizes on write and the
attention kernel dequantizes on read, so the graph says exactly which layers' KV is quantized.
Validates the plan against the model: exempt layers must exist, group_size must divide head_dim.
"""
from __future__ import annotations

from ..ir.graph import QuantGraph
from ..ir.kv_plan import build_kv_plan
from ..ir.paged_attention import paged_attention
from .manager import PassContext, PassResult, register_pass

KV_DTYPE_ARG = 6  # paged_attention(q, k, v, layer, scale, window, kv_dtype)


@register_pass("kv_cache_quant", "per-layer KV cache dtype (int8 / fp8 / none) from the KV plan",
               requires=("kv_cache",))
def kv_cache_quant(graph: QuantGraph, ctx: PassContext) -> PassResult:
    plan = build_kv_plan(ctx.config)
    attns = graph.nodes(paged_attention)
    plan.validate_layers(len(attns))
    changed = 0
    for node in attns:
        k = node.args[1]
        if "val" in k.meta:
            plan.check_head_dim(int(k.meta["val"].shape[-1]))
        dtype = plan.layer_dtype(node.args[3])
        args = list(node.args) + ["none"] * (KV_DTYPE_ARG + 1 - len(node.args))
        if args[KV_DTYPE_ARG] != dtype:
            args[KV_DTYPE_ARG] = dtype
            node.args = tuple(args)
            changed += 1
    graph.recompile()
    quantized = sum(1 for n in attns if n.args[KV_DTYPE_ARG] != "none")
    return PassResult(graph, bool(changed), {"kv_quantized_layers": quantized,
                                             "kv_high_precision_layers": len(attns) - quantized,
                                             "kv_dtype": plan.dtype})
