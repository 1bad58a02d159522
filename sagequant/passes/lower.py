"""lower: replace each dequantize_weight -> linear pair with the kernel node the registry picks
for (scheme, backend, priority), and record the KernelBinding on the node."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..ir import ops  # noqa: F401  (registers the Q/DQ ops matched here)
from ..ir.annotations import KernelBinding
from ..ir.graph import QuantGraph
from ..ir.lowered import LinearCall
from ..ir.quant_spec import QuantSpec
from ..lowering.registry import REGISTRY
from .manager import PassContext, PassResult, define_pass

ATEN = torch.ops.aten
FAKE_QUANT = torch.ops.sagequant.fake_quantize_activation.default


@define_pass("lower", "bind quantized linears to registry kernels (explicit fallback only)",
               requires=("convert",))
def lower(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    lowered, by_kernel = 0, {}
    for node in graph.annotated():
        ann = graph.annotation(node)
        if not ann.quantized or node.target != ATEN.linear.default:
            continue
        x, dq = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        if getattr(dq, "target", None) != torch.ops.sagequant.dequantize_weight.default:
            raise RuntimeError(f"linear {ann.layer} is annotated as quantized but its weight is not "
                               "a dequantize_weight node; run convert before lower")
        qweight, scales, zeros, spec_text, shape, act_dtype = dq.args
        spec = QuantSpec.decode(spec_text)
        kernel, fallback_from = REGISTRY.select(ann.scheme, cfg.backend, cfg.priority, spec,
                                                in_features=shape[1], layer=ann.layer,
                                                fallback=cfg.fallback)
        fq = x if getattr(x, "target", None) == FAKE_QUANT else None
        if kernel.activation_quant != (fq is not None):
            raise RuntimeError(f"{ann.layer}: kernel {kernel.name} "
                               f"{'expects' if kernel.activation_quant else 'cannot take'} a quantized "
                               "activation input; annotate/convert disagree with the registry row")
        call = LinearCall(x, qweight, scales, zeros, bias, spec_text, shape)
        if fq is not None:  # fake_quantize_activation(x, act_spec, act_scale)
            call = replace(call, x=fq.args[0], act_spec=fq.args[1], act_scale=fq.args[2])
        with graph.graph.inserting_before(node):
            knode = graph.graph.call_function(kernel.op, call.args())
        knode.meta.update(node.meta)
        binding = KernelBinding(kernel=kernel.name, backend=kernel.backend, scheme=ann.scheme,
                                priority=cfg.priority, fallback_from=fallback_from,
                                attrs={"format": spec.format, "group_size": spec.group_size,
                                       "ragged_last_group": bool(spec.group_size and shape[1] % spec.group_size),
                                       "packed": spec.fmt.packed, "in_features": shape[1],
                                       "activation_bytes": act_dtype.itemsize,
                                       "activation": fq.args[1] if fq is not None else None,
                                       "out_features": shape[0],
                                       **kernel.binding_attrs(spec, shape)})
        graph.update_annotation(knode, kernel=binding)
        node.replace_all_uses_with(knode)
        graph.graph.erase_node(node)
        for consumed in (dq, fq):
            if consumed is not None and not consumed.users:
                graph.graph.erase_node(consumed)
        lowered += 1
        by_kernel[kernel.name] = by_kernel.get(kernel.name, 0) + 1
    graph.recompile()
    return PassResult(graph, lowered > 0, {"lowered": lowered, "kernels": by_kernel})
