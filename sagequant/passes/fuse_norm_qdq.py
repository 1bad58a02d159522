"""fuse_norm_qdq: quantize each activation once, next to the norm that produces it.

After `lower`, every W8A8 kernel quantizes its own float input, so the RMSNorm output read by
q/k/v (or gate/up) is quantized three (two) times with the same spec and scale: the second and
third Q are Q -> DQ -> Q chains that cancel. This pass
  fuse_qdq  groups the W8A8 kernels reading the same tensor with the same activation spec and
            scale, computes (codes, scale) once with `sagequant::quantize_activation`, and switches
            each kernel to its registry row's `prequantized_op`, which reads the codes directly;
  fuse_ln   when that tensor is an RMSNorm output read by nothing else, folds the norm into the
            quantizer: one `sagequant::rms_norm_quantize` node emits the quantized tensor and its
            scale, and the float norm output is never materialized.
The rewrite is exact: the quantizer is QuantSpec's, the kernel's GEMM is unchanged, so logits are
bit-identical. Kernels whose registry row has no prequantized form (e.g. a GPU kernel with its
own fused per-token quantizer) are left as they are and listed in the stats with that reason.
Runs last, after `schedule` (and the accuracy checks): they see the one-kernel-per-linear form.
The inverse rewrite is lowering/unfuse.py (export capture and per-layer error analysis read the
one-kernel-per-linear form).
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx

from ..ir import activation_ops  # noqa: F401  (registers the ops written here)
from ..ir.graph import QuantGraph
from ..ir.lowered import LinearCall
from ..lowering.registry import REGISTRY
from .manager import PassContext, PassResult, define_pass

RMS_NORM = torch.ops.sagequant.rms_norm.default
QUANTIZE = torch.ops.sagequant.quantize_activation.default
NORM_QUANTIZE = torch.ops.sagequant.rms_norm_quantize.default


@define_pass("fuse_norm_qdq", "quantize each activation once (shared by its GEMMs), fused into "
               "the RMSNorm that produces it (fuse_qdq, fuse_ln)", requires=("lower",))
def fuse_norm_qdq(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    groups, unfused = _shared_inputs(graph)
    stats = {"quantizers": 0, "norms_fused": 0, "kernels": 0, "requantizations_removed": 0,
             "unfused": unfused}
    for (x, act_spec, _), consumers in groups.items():
        scale = LinearCall.of(consumers[0]).act_scale
        fuse_norm = (cfg.fuse_ln and getattr(x, "target", None) == RMS_NORM
                     and set(x.users) == set(consumers))
        with graph.graph.inserting_before(consumers[0]):
            if fuse_norm:
                q = graph.graph.call_function(NORM_QUANTIZE, (*x.args, act_spec, scale))
            else:
                q = graph.graph.call_function(QUANTIZE, (x, act_spec, scale))
            codes = graph.graph.call_function(operator.getitem, (q, 0))
            x_scale = graph.graph.call_function(operator.getitem, (q, 1))
        for node in consumers:
            _to_prequantized(graph, node, codes, x_scale)
        if fuse_norm:
            graph.graph.erase_node(x)
        stats["quantizers"] += 1
        stats["norms_fused"] += fuse_norm
        stats["kernels"] += len(consumers)
        stats["requantizations_removed"] += len(consumers) - 1
    graph.recompile()
    return PassResult(graph, bool(groups), stats)


def _shared_inputs(graph: QuantGraph) -> tuple[dict, dict]:
    """{(input node, act_spec, static scale bytes): [W8A8 kernel nodes]}, and the kernels left
    alone, by layer, with the reason."""
    groups: dict[tuple, list[fx.Node]] = {}
    unfused: dict[str, str] = {}
    for node in graph.annotated():
        ann = graph.annotation(node)
        if ann.kernel is None or ann.input_spec is None:
            continue
        kernel = next((k for k in REGISTRY.candidates(ann.scheme, ann.kernel.backend, ann.kernel.priority)
                       if k.name == ann.kernel.kernel), None)
        if kernel is None or kernel.prequantized_op is None or node.target != kernel.op:
            unfused[ann.layer] = (f"kernel {ann.kernel.backend}:{ann.kernel.kernel} quantizes its own "
                                  "input (no prequantized form in the registry)")
            continue
        call = LinearCall.of(node)
        x, act_spec, scale = call.x, call.act_spec, call.act_scale
        scale_key = None if scale is None else graph.attr(scale).detach().cpu().numpy().tobytes()
        groups.setdefault((x, act_spec, scale_key), []).append(node)
    return groups, unfused


def _to_prequantized(graph: QuantGraph, node: fx.Node, codes: fx.Node, x_scale: fx.Node) -> None:
    ann = graph.annotation(node)
    kernel = next(k for k in REGISTRY.candidates(ann.scheme, ann.kernel.backend, ann.kernel.priority)
                  if k.name == ann.kernel.kernel)
    val = node.meta.get("val")
    if val is None:
        raise RuntimeError(f"{ann.layer}: the lowered node has no output metadata (meta['val']), so "
                           "its output dtype is unknown; fuse_norm_qdq runs on graphs from `lower`")
    call = replace(LinearCall.of(node), x=codes, act_scale=None, x_scale=x_scale, out_dtype=val.dtype,
                   prequantized=True)
    with graph.graph.inserting_before(node):
        new = graph.graph.call_function(kernel.prequantized_op, call.args())
    new.meta.update(node.meta)
    graph.update_annotation(new, kernel=replace(ann.kernel, attrs={**ann.kernel.attrs, "input": "prequantized"}))
    node.replace_all_uses_with(new)
    graph.graph.erase_node(node)
