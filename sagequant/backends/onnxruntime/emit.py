"""Graph-surgery helpers every emitter shares: walk the captured model's placeholders, build
initializers in ONNX's quantized types, and the Q/DQ building blocks (weight DequantizeLinear,
activation Q/DQ, dynamic per-token quantization).

ONNX 4-bit tensors pack two elements per byte over the *flattened* tensor, first element in the
low nibble (the same nibble order as ours, but ours pads every row); onnx-graphsurgeon cannot
write them, so they travel as ready TensorProtos (LazyValues).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ...progress import track
from .qlinear import DOMAIN, OP_TYPE, ExportError, QLinearInfo, decode

MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # opset 21 needs IR 10; every onnxruntime since 1.18 reads it


def storage_dtype(fmt: str):
    import ml_dtypes
    table = {"int4": ml_dtypes.int4, "uint4": ml_dtypes.uint4, "int8": np.int8, "uint8": np.uint8,
             "fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
    return table.get(fmt)


def constant(name: str, values: np.ndarray):
    """A graphsurgeon Constant (0-d stays 0-d); 4-bit arrays go through onnx's own packing."""
    import onnx_graphsurgeon as gs
    from onnx import numpy_helper
    from onnx_graphsurgeon.ir.tensor import LazyValues
    values = np.array(values, order="C")  # not ascontiguousarray: it turns a scalar into shape [1]
    if values.dtype.name in ("int4", "uint4"):
        return gs.Constant(name, LazyValues(numpy_helper.from_array(values, name)))
    return gs.Constant(name, values)


def act_dtype(node) -> np.dtype:
    """Float type of the placeholder's activation input (float32 when the graph does not say)."""
    dt = getattr(node.inputs[0], "dtype", None)
    try:
        dt = np.dtype(dt)
    except TypeError:
        return np.dtype(np.float32)
    return dt if dt.kind == "f" else np.dtype(np.float32)


def rewrite(model, emit_node: Callable, metadata: dict | None = None):
    """Replace every sagequant::QLinear placeholder via emit_node(graph, node, info) -> Variable
    that carries the layer's output; returns the rewritten onnx.ModelProto."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger.logger import G_LOGGER, LoggerSuppress
    with LoggerSuppress(G_LOGGER, G_LOGGER.ERROR):  # its warnings are about dtypes we handle
        return _rewrite(gs, onnx, model, emit_node, metadata)


def _rewrite(gs, onnx, model, emit_node, metadata):
    graph = gs.import_onnx(model)
    placeholders = [n for n in graph.nodes if n.domain == DOMAIN and n.op == OP_TYPE]
    first_emitted = len(graph.nodes)
    for node in track(placeholders, "export: emit", unit="layer", note=lambda n: n.name):
        info = decode(node)
        out = node.outputs[0]
        result = emit_node(graph, node, info)
        node.outputs.clear()
        node.inputs.clear()
        # Hand the placeholder's output tensor (its name, shape, consumers) to the new last node.
        producer = result.inputs[0]
        producer.outputs[producer.outputs.index(result)] = out
    emitted = graph.nodes[first_emitted:]
    graph.toposort()
    share_identical_nodes(graph, emitted)
    graph.cleanup().toposort()
    exported = gs.export_onnx(graph, do_type_check=True)
    used = {n.domain for n in exported.graph.node}
    keep = [o for o in exported.opset_import if o.domain != DOMAIN and (o.domain in ("", "ai.onnx") or o.domain in used)]
    del exported.opset_import[:]
    exported.opset_import.extend(keep)
    if MS_DOMAIN in used and not any(o.domain == MS_DOMAIN for o in keep):
        exported.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    exported.ir_version = IR_VERSION
    for key, value in (metadata or {}).items():
        exported.metadata_props.add(key=key, value=str(value))
    left = [n.name for n in exported.graph.node if n.domain == DOMAIN]
    if left:
        raise ExportError(f"internal: placeholders left after emission: {left[:3]}")
    return exported


def share_identical_nodes(graph, candidates) -> int:
    """Common-subexpression elimination over the emitted nodes: a node with the same op, attributes
    and inputs (constants compared by value) as an earlier one is dropped and its consumers read the
    earlier output. Layers reading one tensor (q/k/v after a norm) thereby share one activation
    Q/DQ pair (or one per-token quantizer) instead of re-quantizing it per GEMM — the placement
    TensorRT's explicit quantization expects and the cancelling Q->DQ->Q chains gone.
    `graph` must be topologically sorted. Returns the number of nodes removed."""
    import onnx_graphsurgeon as gs
    candidates = set(map(id, candidates))
    seen: dict[tuple, object] = {}
    removed = 0
    for node in list(graph.nodes):
        if id(node) not in candidates or len(node.outputs) != 1:
            continue
        key = (node.op, node.domain, repr(sorted(node.attrs.items())),
               tuple(_input_key(gs, t) for t in node.inputs))
        kept = seen.setdefault(key, node)
        dup = node.outputs[0]
        if kept is node or dup in graph.outputs:
            continue
        for consumer in list(dup.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dup:
                    consumer.inputs[i] = kept.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        removed += 1
    return removed


_SMALL_CONSTANT = 64  # scales and zero points are compared by value; weights are never shared


def _input_key(gs, t):
    from onnx_graphsurgeon.ir.tensor import LazyValues
    if isinstance(t, gs.Constant) and np.prod(t.shape or ()) <= _SMALL_CONSTANT:
        if isinstance(t._values, LazyValues):  # 4-bit protos: reading .values would unpack them
            proto = t._values.tensor
            return ("proto", proto.data_type, tuple(proto.dims), proto.raw_data)
        values = np.asarray(t.values)
        return ("const", str(values.dtype), values.shape, values.tobytes())
    return ("tensor", id(t))


def layer(graph, op: str, inputs: list, name: str, attrs: dict | None = None, dtype=None,
          domain: str | None = None):
    """Add one node with one output Variable named after the node."""
    import onnx_graphsurgeon as gs
    out = gs.Variable(f"{name}_out", dtype=dtype)
    graph.nodes.append(gs.Node(op=op, name=name, inputs=inputs, outputs=[out], attrs=attrs or {},
                               domain=domain))
    return out


# ---- Q/DQ building blocks ----------------------------------------------------------------------

def weight_dequantize(graph, info: QLinearInfo, dtype: np.dtype, layout: str, fmt_name: str):
    """DequantizeLinear of the stored weight: layout "KN" ([in, out], feeds MatMul directly,
    blocks along axis 0 — the form ONNX Runtime fuses into MatMulNBits) or "NK" ([out, in],
    per-channel axis 0 / blocks along axis 1, followed by a Transpose — TensorRT's form)."""
    spec = info.spec
    np_dtype = storage_dtype(spec.format)
    if np_dtype is None:
        raise info.error(fmt_name, f"weight format {spec.format} has no ONNX tensor type",
                         "exportable weight formats: int4, uint4, int8, uint8, fp8_e4m3, fp8_e5m2")
    codes = info.codes.astype(np_dtype)
    scales = info.scales.astype(dtype)
    zeros = None if info.zeros is None else info.zeros.astype(np_dtype)
    attrs = {}
    if spec.granularity == "per_group":
        attrs = {"axis": 0 if layout == "KN" else 1, "block_size": spec.group_size}
        scale_arr = scales.T if layout == "KN" else scales
        zero_arr = None if zeros is None else (zeros.T if layout == "KN" else zeros)
    elif spec.granularity == "per_tensor":
        scale_arr = scales.reshape(-1)[:1].reshape(())
        zero_arr = None if zeros is None else zeros.reshape(-1)[:1].reshape(())
    else:  # per_channel: one scale per output channel
        attrs = {"axis": 1 if layout == "KN" else 0}
        scale_arr = scales.reshape(-1)
        zero_arr = None if zeros is None else zeros.reshape(-1)
    w = codes.T if layout == "KN" else codes
    prefix = info.layer
    inputs = [constant(f"{prefix}.weight_quantized", w), constant(f"{prefix}.weight_scale", scale_arr)]
    if zero_arr is not None:
        inputs.append(constant(f"{prefix}.weight_zero_point", zero_arr))
    out = layer(graph, "DequantizeLinear", inputs, f"{prefix}/weight_dq", attrs, dtype=dtype)
    if layout == "NK":
        out = layer(graph, "Transpose", [out], f"{prefix}/weight_transpose", {"perm": [1, 0]}, dtype=dtype)
    return out


def activation_qdq_static(graph, x, info: QLinearInfo, dtype: np.dtype):
    """QuantizeLinear -> DequantizeLinear with the calibrated per-tensor scale, zero point 0."""
    spec = info.act_spec
    if info.act_scale is None:
        raise info.error("ONNX", "static activation quantization without a calibrated scale")
    zp_dtype = storage_dtype(spec.format)
    scale = constant(f"{info.layer}.input_scale", np.asarray(info.act_scale, dtype=dtype).reshape(()))
    zero = constant(f"{info.layer}.input_zero_point", np.zeros((), dtype=zp_dtype))
    q = layer(graph, "QuantizeLinear", [x, scale, zero], f"{info.layer}/input_q", dtype=zp_dtype)
    return layer(graph, "DequantizeLinear", [q, scale, zero], f"{info.layer}/input_dq", dtype=dtype)


def activation_per_token(graph, x, info: QLinearInfo, dtype: np.dtype):
    """Dynamic per-token quantization, as QuantSpec computes it: scale = absmax(row) / qmax (1 for
    an all-zero row, at least the smallest normal float), codes = saturate(round_half_even(x / s)).
    Returns (codes as float, scale [.., 1]); the caller multiplies back or feeds an integer GEMM."""
    from onnx import TensorProto
    spec, p = info.act_spec, f"{info.layer}/input_pt"
    fmt = spec.fmt
    c = lambda n, v: constant(f"{info.layer}.input_{n}", np.asarray(v, dtype=dtype).reshape(()))  # noqa: E731
    axes = constant(f"{info.layer}.input_axes", np.asarray([-1], dtype=np.int64))
    absmax = layer(graph, "ReduceMax", [layer(graph, "Abs", [x], f"{p}/abs", dtype=dtype), axes],
                   f"{p}/absmax", {"keepdims": 1}, dtype=dtype)
    raw = layer(graph, "Div", [absmax, c("qmax", fmt.qmax)], f"{p}/scale_raw", dtype=dtype)
    positive = layer(graph, "Greater", [absmax, c("zero", 0.0)], f"{p}/positive", dtype=np.bool_)
    scale = layer(graph, "Where", [positive, raw, c("one", 1.0)], f"{p}/scale_nz", dtype=dtype)
    scale = layer(graph, "Max", [scale, c("tiny", np.finfo(np.float32).tiny)], f"{p}/scale", dtype=dtype)
    scaled = layer(graph, "Div", [x, scale], f"{p}/scaled", dtype=dtype)
    if fmt.kind == "int":
        codes = layer(graph, "Clip", [layer(graph, "Round", [scaled], f"{p}/round", dtype=dtype),
                                      c("qmin", fmt.qmin), c("qmax_clip", fmt.qmax)], f"{p}/codes", dtype=dtype)
    elif fmt.kind == "float":
        onnx_type = {"fp8_e4m3": TensorProto.FLOAT8E4M3FN, "fp8_e5m2": TensorProto.FLOAT8E5M2}[spec.format]
        clipped = layer(graph, "Clip", [scaled, c("neg_max", -fmt.qmax), c("pos_max", fmt.qmax)],
                        f"{p}/clip", dtype=dtype)
        fp8 = layer(graph, "Cast", [clipped], f"{p}/to_fp8", {"to": onnx_type}, dtype=storage_dtype(spec.format))
        codes = layer(graph, "Cast", [fp8], f"{p}/codes", {"to": _onnx_float(dtype)}, dtype=dtype)
    else:
        raise info.error("ONNX", f"activation format {spec.format} has no ONNX quantization")
    return codes, scale


def _onnx_float(dtype: np.dtype) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def add_bias(graph, y, node, info: QLinearInfo, dtype):
    if len(node.inputs) > 4 and node.inputs[4] is not None and node.inputs[4].name:
        return layer(graph, "Add", [y, node.inputs[4]], f"{info.layer}/bias", dtype=dtype)
    return y
