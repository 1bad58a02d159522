"""kv_cache_quant: choose how each attention layer's KV cache is stored, from the KVQuantPlan.

Sets the kv_dtype argument of every paged_attention node (written by the kv_cache pass): the
plan's dtype (int8 / fp8 e4m3, 1 byte per element plus per (block, head, group) scales), or
"none" (16-bit / float) for the plan's high-precision layers. The op quantizes on write and the
attention kernel dequantizes on read, so the graph says exactly which layers' KV is quantized.
Validates the plan against the model: exempt layers must exist, group_size must divide head_dim.
"""
from __future__ import annotations

from dataclasses import replace

from ..ir.graph import QuantGraph
from ..ir.paged_attention import AttentionCall, paged_attention
from .manager import PassContext, PassResult, define_pass


@define_pass("kv_cache_quant", "per-layer KV cache dtype (int8 / fp8 / none) from the KV plan",
               requires=("kv_cache",))
def kv_cache_quant(graph: QuantGraph, ctx: PassContext) -> PassResult:
    plan = graph.kv_plan
    if plan is None:
        raise ValueError("kv_cache_quant reads the KV plan the graph carries (QuantGraph.kv_plan, set "
                         "by runtime/step_graph.py from the compiled model); this graph has none")
    attns = graph.nodes(paged_attention)
    plan.validate_layers(len(attns))
    changed = 0
    for node in attns:
        call = AttentionCall.of(node)
        if "val" in call.k.meta:
            plan.check_head_dim(int(call.k.meta["val"].shape[-1]))
        dtype = plan.layer_dtype(call.layer)
        if call.kv_dtype != dtype or len(node.args) < len(call.args()):
            node.args = replace(call, kv_dtype=dtype).args()
            changed += call.kv_dtype != dtype
    graph.recompile()
    quantized = sum(1 for n in attns if AttentionCall.of(n).kv_dtype != "none")
    return PassResult(graph, bool(changed), {"kv_quantized_layers": quantized,
                                             "kv_high_precision_layers": len(attns) - quantized,
                                             "kv_dtype": plan.dtype})
