"""Explicit-quantization ONNX for TensorRT, the rules it follows, a checker for them, and the
engine build.

TensorRT's documented rules for Q/DQ networks (TensorRT 10 "Explicit Quantization" and the
IQuantizeLayer / IDequantizeLayer references) that this emitter writes and `check_rules` checks:
  R1  quantization is symmetric: zero points absent or all zero; scales are build-time constants
      (initializers) with strictly positive values;
  R2  quantized types: INT8 and FP8 (E4M3) for weights and activations, INT4 for weights only
      (weight-only quantization);
  R3  activations: per-tensor scale (a scalar) only, as a QuantizeLinear -> DequantizeLinear pair
      on the GEMM input, so TensorRT fuses the pair into the quantized MatMul;
  R4  pre-quantized weights reach the GEMM through a DequantizeLinear on the initializer; INT8 /
      FP8 weights are per-channel on the output channel — the weight is stored [out, in] and the
      DQ has axis 0 (then a Transpose feeds MatMul) — or per-tensor;
  R5  block quantization (INT4 weight-only here): the scale has the weight's rank and the blocked
      axis (one of the last two) must be divisible by the block size — no ragged last block;
  R6  a GEMM whose weight is INT8 / FP8 has a Q/DQ-quantized activation input (both operands
      quantized); an INT4 weight-only GEMM takes the 16/32-bit activation as is;
  R7  only standard ONNX ops (no com.microsoft MatMulNBits, no MatMulInteger / QLinearMatMul),
      opset >= 21 when INT4 is present, >= 19 for FP8, >= 13 for per-axis.
Schemes outside these rules (W8A16, FP8-W8A16, asymmetric weights, grouped INT8 weights, dynamic
per-token activations, NF4, ragged INT4 groups) are refused, naming the layer and what to change.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..onnxruntime.emit import activation_qdq_static, act_dtype, add_bias, layer, weight_dequantize
from ..onnxruntime.qlinear import ExportError, QLinearInfo

FORMAT = "TensorRT explicit-quantization ONNX"


def check_tensorrt(info: QLinearInfo) -> None:
    spec, act = info.spec, info.act_spec
    if not spec.symmetric:
        raise info.error(FORMAT, "TensorRT quantization is symmetric only (R1); this weight has zero points",
                         "compile with symmetric=True")
    if act is None:
        if spec.format != "int4":
            raise info.error(FORMAT, f"TensorRT's weight-only quantization is INT4 only (R2), not {spec.format}",
                             "export W4A16 (int4), W8A8-INT8 or W8A8-FP8 to TensorRT, or use format='onnx'")
        if spec.granularity == "per_group" and info.in_features % spec.group_size:
            raise info.error(FORMAT, f"in_features {info.in_features} is not a multiple of group_size "
                             f"{spec.group_size} (ragged last block), and TensorRT block quantization "
                             "needs whole blocks (R5)",
                             "compile with a group size dividing every in_features, or export to format='onnx'")
    else:
        if act.dynamic:
            raise info.error(FORMAT, "TensorRT explicit quantization takes static per-tensor activation "
                             "scales (R3); this layer quantizes activations per token at run time",
                             "compile with activation_scale='static_per_tensor' and calibration data")
        if spec.format not in ("int8", "fp8_e4m3") or act.format != spec.format:
            raise info.error(FORMAT, "TensorRT quantizes weights and activations as INT8 or FP8 E4M3 (R2)")
        if spec.granularity == "per_group":
            raise info.error(FORMAT, f"{spec.format} weights must be per-channel or per-tensor (R4), not "
                             f"grouped (group_size {spec.group_size})", "compile with group_size=None")


def emit_tensorrt(graph, node, info: QLinearInfo):
    check_tensorrt(info)
    act = info.act_spec
    dtype = act_dtype(node)
    x = node.inputs[0]
    if act is not None:
        x = activation_qdq_static(graph, x, info, dtype)
    w = weight_dequantize(graph, info, dtype, "NK", FORMAT)
    y = layer(graph, "MatMul", [x, w], f"{info.layer}/matmul", dtype=dtype)
    return add_bias(graph, y, node, info, dtype)


# ---- the rule checker ------------------------------------------------------------------------

_QTYPES = {"INT8": "int8", "FLOAT8E4M3FN": "fp8", "INT4": "int4"}
_NOT_TRT = {"MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeLinear", "MatMulIntegerToFloat"}


def check_rules(model) -> list[str]:
    """Every violation of R1-R7 in `model` (an onnx.ModelProto), one line each; [] when clean."""
    from onnx import TensorProto, numpy_helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    bad: list[str] = []
    has = set()

    def arr(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    for n in g.node:
        if n.domain not in ("", "ai.onnx"):
            bad.append(f"R7 {n.name}: {n.domain}::{n.op_type} is not a standard ONNX op")
        if n.op_type in _NOT_TRT:
            bad.append(f"R7 {n.name}: {n.op_type} is not part of a TensorRT Q/DQ network")
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale_name = n.input[1]
        scale = arr(scale_name)
        if scale is None:
            bad.append(f"R1 {n.name}: scale {scale_name} is not an initializer (build-time constant)")
            continue
        if not bool((scale.astype(np.float64) > 0).all()):
            bad.append(f"R1 {n.name}: scale has non-positive values")
        if len(n.input) > 2 and n.input[2]:
            zp = arr(n.input[2])
            if zp is None or np.any(zp.astype(np.float64) != 0):
                bad.append(f"R1 {n.name}: zero point is not an all-zero constant")
        qtype = _quantized_type(n, inits, producer, TensorProto)
        if qtype not in _QTYPES:
            bad.append(f"R2 {n.name}: quantized type {qtype} (TensorRT takes INT8, FP8 E4M3, INT4)")
            continue
        has.add(_QTYPES[qtype])
        attrs = {a.name: a for a in n.attribute}
        axis = attrs["axis"].i if "axis" in attrs else 1
        block = attrs["block_size"].i if "block_size" in attrs else 0
        is_weight = n.op_type == "DequantizeLinear" and n.input[0] in inits
        if not is_weight:
            if scale.ndim != 0 and scale.size != 1:
                bad.append(f"R3 {n.name}: activation scale has shape {list(scale.shape)}, must be per-tensor")
            if _QTYPES[qtype] == "int4":
                bad.append(f"R2 {n.name}: INT4 is weight-only, not for activations")
            if n.op_type == "QuantizeLinear" and not all(c.op_type == "DequantizeLinear" for c in consumers.get(n.output[0], [])):
                bad.append(f"R3 {n.name}: a QuantizeLinear must feed DequantizeLinear only")
            continue
        w = arr(n.input[0])
        if block:
            has.add("block")
            if _QTYPES[qtype] != "int4":
                bad.append(f"R5 {n.name}: block quantization of {qtype} weights (INT4 only)")
            if scale.ndim != w.ndim or axis % w.ndim not in (w.ndim - 1, w.ndim - 2):
                bad.append(f"R5 {n.name}: block scale must have the weight's rank and block one of the last two axes")
            elif w.shape[axis] % block:
                bad.append(f"R5 {n.name}: axis {axis} of length {w.shape[axis]} is not a multiple of block {block}")
        elif scale.ndim == 1 and scale.size > 1:
            has.add("axis")
            if axis % w.ndim != 0:
                bad.append(f"R4 {n.name}: per-channel weight DQ has axis {axis}, TensorRT wants the output "
                           "channel on axis 0 of an [out, in] weight")
        gemms = _gemm_consumers(n, consumers)
        if not gemms:
            bad.append(f"R4 {n.name}: weight DequantizeLinear does not feed a MatMul/Gemm")
        for gemm, w_input in gemms:
            other = [i for i in gemm.input[:2] if i != w_input]
            act_dq = other and producer.get(other[0]) is not None and producer[other[0]].op_type == "DequantizeLinear"
            if _QTYPES[qtype] == "int4" and act_dq:
                bad.append(f"R6 {gemm.name}: INT4 weight-only GEMM has a quantized activation")
            if _QTYPES[qtype] != "int4" and not act_dq:
                bad.append(f"R6 {gemm.name}: {qtype} weight GEMM lacks a Q/DQ activation input")
    need = 21 if "int4" in has or "block" in has else 19 if "fp8" in has else 13 if "axis" in has else 10
    if has and opset < need:
        bad.append(f"R7 model opset {opset} < {need} needed for {sorted(has)}")
    return bad


def _quantized_type(n, inits, producer, TensorProto) -> str:
    if n.op_type == "DequantizeLinear":
        src = n.input[0]
        if src in inits:
            return TensorProto.DataType.Name(inits[src].data_type)
        q = producer.get(src)
        if q is not None and q.op_type == "QuantizeLinear" and len(q.input) > 2 and q.input[2] in inits:
            return TensorProto.DataType.Name(inits[q.input[2]].data_type)
        return "unknown"
    if len(n.input) > 2 and n.input[2] in inits:
        return TensorProto.DataType.Name(inits[n.input[2]].data_type)
    return "UINT8"  # QuantizeLinear without a zero point quantizes to uint8


def _gemm_consumers(dq, consumers) -> list:
    out = []
    for c in consumers.get(dq.output[0], []):
        if c.op_type == "Transpose":
            out += [(g, c.output[0]) for g in consumers.get(c.output[0], []) if g.op_type in ("MatMul", "Gemm")]
        elif c.op_type in ("MatMul", "Gemm"):
            out.append((c, dq.output[0]))
    return out


# ---- the engine --------------------------------------------------------------------------------

def tensorrt_missing() -> str | None:
    """What this machine lacks to build a TensorRT engine, or None."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the `tensorrt` Python package is not installed (pip install tensorrt, on a "
                       "machine with an NVIDIA driver)")
    import torch
    if not torch.cuda.is_available():
        missing.append("no NVIDIA GPU is visible (torch.cuda.is_available() is False"
                       + ("; this torch is a CPU-only build)" if torch.version.cuda is None else ")"))
    return "; ".join(missing) or None


def build_engine(onnx_path: str | Path, engine_path: str | Path, max_batch: int = 8,
                 max_seq: int = 2048, opt_seq: int = 128, overwrite: bool = False) -> Path:
    """Parse the explicit-quantization ONNX (strongly typed network) and serialize an engine."""
    why = tensorrt_missing()
    if why:
        raise ExportError(f"cannot build a TensorRT engine: {why}. The explicit-quantization ONNX "
                          f"was written to {str(onnx_path)!r}; build it where TensorRT runs, e.g. "
                          f"`trtexec --onnx={onnx_path} --stronglyTyped --saveEngine={engine_path}`")
    import tensorrt as trt  # pragma: no cover - needs a GPU machine with TensorRT
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input_ids", (1, 1), (1, opt_seq), (max_batch, max_seq))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    from ...safe_write import output_file
    with output_file(engine_path, overwrite, what="TensorRT engine") as tmp:
        tmp.write_bytes(bytes(blob))
    return Path(engine_path)
