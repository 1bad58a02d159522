"""Capture: a lowered QuantGraph -> ONNX (torch.onnx dynamo exporter), every quantized linear
kept as one `sagequant::QLinear` placeholder that carries its codes, scales and QuantSpec.

Each lowered kernel node (whatever backend's kernel the registry bound) is first rewritten, on a
copy of the fx graph that shares the weights, into `sagequant::export_linear`, an export-only op
whose arguments are the lowering convention's plus the layer name; the exporter translates it
(and `sagequant::rms_norm`) through `custom_translation_table`. Emitters then rewrite the
placeholders (qdq.py, matmulnbits.py, backends/tensorrt).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import torch
import torch.fx as fx

from ...ir.annotations import META_KEY
from ...ir.graph import QuantGraph
from ...ir.lowered import LinearCall
from ...ir.quant_spec import QuantizedTensor, QuantSpec, dequantize, quantize
from ...lowering.unfuse import unfuse_norm_qdq
from ...progress import phase
from .qlinear import DOMAIN, OP_TYPE, ExportError

OPSET = 21  # block-quantized DequantizeLinear and INT4/UINT4 tensors need opset 21
ATEN = torch.ops.aten


@torch.library.custom_op("sagequant::export_linear", mutates_args=())
def export_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor | None, bias: torch.Tensor | None,
                  act_scale: torch.Tensor | None, spec: str, shape: list[int], act_spec: str,
                  layer: str) -> torch.Tensor:
    """Export-only stand-in for a lowered quantized linear; computes what the reference kernels do."""
    w = dequantize(QuantizedTensor(qweight, scales, zeros, tuple(shape), QuantSpec.decode(spec)), x.dtype)
    if act_spec:
        x = dequantize(quantize(x, QuantSpec.decode(act_spec), scale=act_scale, what=layer), x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@export_linear.register_fake
def _export_linear_fake(x, qweight, scales, zeros, bias, act_scale, spec, shape, act_spec, layer):
    return x.new_empty((*x.shape[:-1], shape[0]))


# sagequant ops the capture knows how to export; anything else is refused by name.
_DEQUANTIZE = "sagequant.dequantize_weight"
_FAKE_QUANT = "sagequant.fake_quantize_activation"


def capture(graph: QuantGraph, example_seq_len: int = 8) -> "onnx.ModelProto":  # noqa: F821
    """ONNX of the lowered graph: input `input_ids` int64 [batch, seq], output `logits`."""
    gm = _export_module(graph)
    from torch.export import Dim
    example = torch.randint(0, min(int(graph.model_info.get("vocab_size") or 2), 1000),
                            (2, example_seq_len))
    table = {torch.ops.sagequant.export_linear.default: _translate_qlinear,
             torch.ops.sagequant.rms_norm.default: _translate_rms_norm}
    try:
        # The bar is made first: it keeps the real stderr, which _quiet then swaps out.
        with phase("export: capture (torch.onnx)", total=1, unit="graph") as step, _quiet():
            program = torch.onnx.export(
                gm, (example,), dynamo=True, opset_version=OPSET, optimize=True,
                dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},),
                input_names=["input_ids"], output_names=["logits"], custom_translation_table=table)
            step.advance()
    except Exception as e:  # the exporter wraps everything in its own errors; keep the first line
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        summary = next((ln for ln in lines if "Error" in ln and "translat" in ln.lower()), lines[0] if lines else "")
        raise ExportError(f"torch.onnx could not export the lowered graph: {type(e).__name__}: "
                          f"{summary[:600]}") from e
    return program.model_proto


def _export_module(graph: QuantGraph) -> fx.GraphModule:
    """A GraphModule over a copy of the graph (weights shared) with kernels as export_linear."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph.graph, env)
    new.output(out)
    unfuse_norm_qdq(new)  # every emitter writes its own activation Q/DQ placement
    for node in list(new.nodes):
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name in (_DEQUANTIZE, _FAKE_QUANT):
            raise ExportError(f"node {node.name} is {name}: the graph was not lowered (the pipeline "
                              "stopped before `lower`); export needs a fully compiled model")
        ann = node.meta.get(META_KEY)
        if ann is not None and ann.quantized and ann.kernel is not None and node.target != ATEN.linear.default:
            _to_export_linear(new, node, ann)
        elif name.startswith("sagequant.") and name not in ("sagequant.rms_norm", "sagequant.export_linear"):
            raise ExportError(f"node {node.name} calls {name}, which has no ONNX translation; "
                              "exportable sagequant ops: rms_norm and lowered quantized linears")
    new.lint()
    return fx.GraphModule(graph.gm, new)


def _to_export_linear(graph: fx.Graph, node: fx.Node, ann) -> None:
    c = LinearCall.of(node)
    act_spec, act_scale = (c.act_spec, c.act_scale) if ann.input_spec is not None else ("", None)
    with graph.inserting_before(node):
        new = graph.call_function(torch.ops.sagequant.export_linear.default,
                                  (c.x, c.qweight, c.scales, c.zeros, c.bias, act_scale, c.spec,
                                   list(c.shape), act_spec, ann.layer))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _op_name(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}"
    return getattr(target, "__name__", str(target))


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress lines and deprecation warnings; exports are silent."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch.onnx").level
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


# ---- translations (onnxscript, traced by the exporter) ----------------------------------------

_SCHEMA = None


def _qlinear_op():
    """An onnxscript Op for the placeholder, with a schema so the exporter can record it."""
    global _SCHEMA
    import onnxscript
    from onnx.defs import OpSchema
    if _SCHEMA is None:
        opt = OpSchema.FormalParameterOption.Optional
        floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
        _SCHEMA = OpSchema(
            OP_TYPE, DOMAIN, 1,
            doc="A quantized linear of a sagequant graph, before an emitter rewrites it.",
            inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("QWeight", "TQ"),
                    OpSchema.FormalParameter("Scales", "TS"),
                    OpSchema.FormalParameter("Zeros", "TZ", param_option=opt),
                    OpSchema.FormalParameter("Bias", "T", param_option=opt),
                    OpSchema.FormalParameter("ActScale", "TA", param_option=opt)],
            outputs=[OpSchema.FormalParameter("Y", "T")],
            type_constraints=[
                ("T", floats, "activations"),
                ("TQ", ["tensor(uint8)", "tensor(int8)", "tensor(float8e4m3fn)", "tensor(float8e5m2)"], "codes"),
                ("TS", floats, "weight scales"),
                ("TZ", ["tensor(int32)", "tensor(int64)", "tensor(uint8)", "tensor(int8)"], "zero points"),
                ("TA", floats, "activation scale")],
            attributes=[OpSchema.Attribute("layer", OpSchema.AttrType.STRING, "layer name"),
                        OpSchema.Attribute("spec", OpSchema.AttrType.STRING, "weight QuantSpec JSON"),
                        OpSchema.Attribute("shape", OpSchema.AttrType.INTS, "[out, in]"),
                        OpSchema.Attribute("act_spec", OpSchema.AttrType.STRING, "activation QuantSpec JSON")])
    return onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), OP_TYPE, _SCHEMA)


def _translate_qlinear(x, qweight, scales, zeros, bias, act_scale, spec, shape, act_spec, layer):
    return _qlinear_op()(x, qweight, scales, zeros, bias, act_scale, layer=layer, spec=spec,
                         shape=[int(v) for v in shape], act_spec=act_spec)


def _translate_rms_norm(x, weight, eps, weight_offset):
    """sagequant::rms_norm: fp32 x * 1/sqrt(mean(x^2) + eps), cast back, times (w + offset)."""
    from onnxscript import opset18 as op
    from onnx import TensorProto
    xf = op.Cast(x, to=TensorProto.FLOAT)
    mean = op.ReduceMean(op.Mul(xf, xf), op.Constant(value_ints=[-1]), keepdims=1)
    inv = op.Reciprocal(op.Sqrt(op.Add(mean, op.Constant(value_float=float(eps)))))
    normed = op.CastLike(op.Mul(xf, inv), x)
    if weight_offset:
        scale = op.Add(op.Cast(weight, to=TensorProto.FLOAT), op.Constant(value_float=float(weight_offset)))
        return op.Mul(op.Cast(normed, to=TensorProto.FLOAT), scale)
    return op.Mul(normed, op.CastLike(weight, normed))
