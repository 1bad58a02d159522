"""convert: round-to-nearest weight quantization into packed storage, expressed as Q/DQ:
each quantized linear reads its weight through sagequant::dequantize_weight(codes, scale, zp).

The float weight attribute is replaced by three buffers next to it: <layer>.qweight (codes,
packed two int4 per byte), <layer>.scales and, for asymmetric formats, <layer>.zeros. With
QuantConfig.nf4_double_quant the NF4 scales are themselves stored quantized
(<layer>.scales_q / scales_scale / scales_zero) and dequantized by a second dequantize_weight
node feeding the first, so the graph states exactly what the kernel reads.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..ir import ops  # noqa: F401  (registers sagequant::dequantize_weight)
from ..calibration.datasets import CalibrationDataError
from ..ir.annotations import CalibrationRecord
from ..ir.graph import QuantGraph
from ..ir.quant_spec import (SCALE_DOUBLE_QUANT, SCALE_DTYPES, block_lengths, dequantize,
                             double_quantize_scales, quantize, weight_qparams)
from ..progress import track
from .manager import PassContext, PassResult, define_pass

ATEN = torch.ops.aten


def storage_prefix(weight_attr: str) -> str:
    return weight_attr[: -len(".weight")] if weight_attr.endswith(".weight") else weight_attr


@define_pass("convert", "quantize weights (RTN) into packed storage behind dequantize nodes",
               requires=("annotate",))
def convert(graph: QuantGraph, ctx: PassContext) -> PassResult:
    converted, float_bytes, quant_bytes = 0, 0, 0
    for node in track(list(graph.annotated()), "convert", unit="layer",
                      note=lambda n: graph.annotation(n).layer):
        if not is_convertible(graph, node):
            continue
        weight = graph.attr(node.args[1])
        tensors = quantized_tensors(graph, node, ctx.config)
        rewrite_linear(graph, node, tensors)
        converted += 1
        float_bytes += weight.numel() * weight.element_size()
        quant_bytes += sum(t.numel() * t.element_size() for k, t in tensors.items() if k != "input_scale")
    graph.recompile()
    return PassResult(graph, converted > 0, {"converted": converted, "float_weight_bytes": float_bytes,
                                             "quantized_weight_bytes": quant_bytes})


def is_convertible(graph: QuantGraph, node) -> bool:
    ann = graph.annotation(node)
    return ann is not None and ann.quantized and node.target == ATEN.linear.default


def quantized_tensors(graph: QuantGraph, node, config) -> dict[str, torch.Tensor]:
    """The stored form of one quantized linear, by suffix (qweight, scales | scales_q +
    scales_scale + scales_zero, zeros, input_scale); records the weight's range on its annotation."""
    ann = graph.annotation(node)
    weight = graph.attr(node.args[1]).detach()
    what = f"weight of {ann.layer}"
    if ann.weight_qparams is not None:  # scales chosen by GPTQ: round onto exactly that grid
        scale, zero_point = ann.weight_qparams
        qt = quantize(weight, ann.weight_spec, scale=scale, zero_point=zero_point, what=what)
    else:
        scale, zero_point = weight_qparams(weight, ann.weight_spec, ann.clip_ratio,
                                           config.weight_observer, what)
        qt = quantize(weight, ann.weight_spec, scale=scale, zero_point=zero_point, what=what)
    records = {**ann.calibration, "weight": _weight_record(weight, ann.clip_ratio, config.weight_observer)}
    scale_q = None
    if config.nf4_double_quant and ann.weight_spec.format == "nf4":
        scale_q = double_quantize_scales(qt.scale, what=f"scales of {ann.layer}")
        # Re-encode against the scales the kernel will actually read.
        scale = dequantize(scale_q).reshape(qt.scale.shape).to(qt.scale.dtype)
        qt = quantize(weight, ann.weight_spec, scale=scale, what=what)
    tensors = {"qweight": qt.data}
    if scale_q is None:
        tensors["scales"] = qt.scale
    else:
        tensors.update({"scales_q": scale_q.data, "scales_scale": scale_q.scale,
                        "scales_zero": scale_q.zero_point})
    if qt.zero_point is not None:
        tensors["zeros"] = qt.zero_point
    if ann.input_spec is not None and not ann.input_spec.dynamic:
        tensors["input_scale"] = static_input_scale(ann, "the static activation scale")
        records["input"] = replace(records["input"], scale=float(tensors["input_scale"]))
    graph.update_annotation(node, weight_qparams=None, calibration=records)
    return tensors


def rewrite_linear(graph: QuantGraph, node, tensors: dict[str, torch.Tensor]) -> None:
    """Store `tensors` next to the float weight and make the linear read them through
    dequantize_weight (and quantize its input when the annotation says so). The float weight
    attribute only has to give shape and dtype (it may be a meta placeholder)."""
    ann = graph.annotation(node)
    w_node = node.args[1]
    weight = graph.attr(w_node)
    prefix = storage_prefix(w_node.target)
    for suffix, tensor in tensors.items():
        graph.set_attr(f"{prefix}.{suffix}", tensor)
    with graph.graph.inserting_before(node):
        qweight = graph.graph.get_attr(f"{prefix}.qweight")
        scales = (graph.graph.get_attr(f"{prefix}.scales") if "scales" in tensors
                  else _dequantize_scales_node(graph, prefix, weight, ann.weight_spec))
        zp = graph.graph.get_attr(f"{prefix}.zeros") if "zeros" in tensors else None
        dq = graph.graph.call_function(
            torch.ops.sagequant.dequantize_weight.default,
            (qweight, scales, zp, ann.weight_spec.encode(), list(weight.shape), weight.dtype))
    node.replace_input_with(w_node, dq)
    if ann.input_spec is not None:
        _quantize_input(graph, node, ann, prefix, "input_scale" in tensors)


def _dequantize_scales_node(graph: QuantGraph, prefix: str, weight: torch.Tensor, spec):
    """dequantize_weight(scales_q, scales_scale, scales_zero) reshaped to the scales' shape:
    one scale per output row and weight block."""
    shape = [weight.shape[0], len(block_lengths(weight.shape[-1], spec))]
    args = [graph.graph.get_attr(f"{prefix}.{s}") for s in ("scales_q", "scales_scale", "scales_zero")]
    flat = graph.graph.call_function(
        torch.ops.sagequant.dequantize_weight.default,
        (*args, SCALE_DOUBLE_QUANT.encode(), [1, shape[0] * shape[1]], SCALE_DTYPES[spec.scale_dtype]))
    return graph.graph.call_function(ATEN.reshape.default, (flat, shape))


def static_input_scale(ann, needed_by: str) -> torch.Tensor:
    """[[scale]] of a static activation from its calibration record's clip (symmetric)."""
    record = ann.calibration.get("input")
    if record is None:
        raise CalibrationDataError(f"{ann.layer}: {needed_by} needs a calibration record of its "
                                   "input; run calibrate with data first")
    clip = record.clip if record.clip > 0 else 1.0
    return ann.input_spec.fmt.symmetric_scale(torch.tensor([[clip]], dtype=torch.float32))


def _quantize_input(graph: QuantGraph, node, ann, prefix: str, static: bool) -> None:
    """Q/DQ on the activation input: dynamic per-token, or the static scale calibration chose."""
    scale_node = None
    if static:
        with graph.graph.inserting_before(node):
            scale_node = graph.graph.get_attr(f"{prefix}.input_scale")
    x = node.args[0]
    with graph.graph.inserting_before(node):
        fq = graph.graph.call_function(torch.ops.sagequant.fake_quantize_activation.default,
                                       (x, ann.input_spec.encode(), scale_node))
    node.replace_input_with(x, fq)


def _weight_record(weight: torch.Tensor, clip_ratio: float, observer: str) -> CalibrationRecord:
    lo, hi = float(weight.min()), float(weight.max())
    absmax = max(abs(lo), abs(hi))
    return CalibrationRecord(tensor="weight", observer=observer, min=lo, max=hi, absmax=absmax,
                             clip=absmax * clip_ratio, num_samples=1, num_values=weight.numel())
