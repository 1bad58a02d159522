"""unfuse_norm_qdq: the inverse of the fuse_norm_qdq pass, for readers of the one-kernel-per-linear
form (export capture, the compressed-tensors checkpoint, per-layer error analysis): every kernel
reading shared (codes, scale) becomes again the quantizing kernel on the float tensor. The registry
knows which quantizing kernel a prequantized op belongs to."""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from ..ir import activation_ops  # noqa: F401  (registers the ops matched here)
from ..ir.lowered import LinearCall
from .registry import REGISTRY

RMS_NORM = torch.ops.sagequant.rms_norm.default
QUANTIZE = torch.ops.sagequant.quantize_activation.default
NORM_QUANTIZE = torch.ops.sagequant.rms_norm_quantize.default


def _quantizing_kernel(prequantized_op):
    """The registry kernel that quantizes its own input and has this op as its prequantized form."""
    for key in REGISTRY.keys():
        for kernel in REGISTRY.candidates(*key):
            if kernel.prequantized_op == prequantized_op:
                return kernel.op
    raise RuntimeError(f"{prequantized_op} reads a quantized activation but no registry kernel has "
                       "it as its prequantized form")


def unfuse_norm_qdq(graph: fx.Graph) -> int:
    """Undo fuse_norm_qdq in place: every kernel reading shared (codes, scale) is again the
    quantizing kernel on the float tensor (an RMSNorm output is recomputed where it was fused).
    Returns the number of kernels rewritten."""
    floats: dict[fx.Node, fx.Node] = {}
    rewritten = 0
    for node in list(graph.nodes):
        item = node.args[0] if node.op == "call_function" and node.args else None
        quantizer = item.args[0] if getattr(item, "target", None) is operator.getitem else None
        if getattr(quantizer, "target", None) not in (QUANTIZE, NORM_QUANTIZE):
            continue
        if quantizer not in floats:
            if quantizer.target == NORM_QUANTIZE:
                with graph.inserting_before(quantizer):
                    floats[quantizer] = graph.call_function(RMS_NORM, tuple(quantizer.args[:4]))
            else:
                floats[quantizer] = quantizer.args[0]
        call = replace(LinearCall.of(node), x=floats[quantizer], act_scale=quantizer.args[-1],
                       x_scale=None, out_dtype=None, prequantized=False)
        with graph.inserting_before(node):
            kernel = graph.call_function(_quantizing_kernel(node.target), call.args())
        kernel.meta.update(node.meta)
        node.replace_all_uses_with(kernel)
        graph.erase_node(node)
        rewritten += 1
    for quantizer in floats:
        for item in list(quantizer.users):
            graph.erase_node(item)
        graph.erase_node(quantizer)
    return rewritten


def unfused_copy(graph: fx.Graph) -> fx.Graph:
    """A copy of `graph` (same get_attr targets and node annotations) with the fusion undone, for
    readers of the one-kernel-per-linear form (kernel args: x, qweight, scales, zeros, bias, ...)."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    unfuse_norm_qdq(copy)
    return copy
