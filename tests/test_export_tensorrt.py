"""TensorRT explicit-quantization export: the Q/DQ placement rules (R1-R7 in
backends/tensorrt/explicit_quant.py) checked on the graph, the graph run in onnxruntime against
the torch path (tolerance PARITY_ATOL, as for the ONNX export), refusals, and the engine build's
error when TensorRT or a GPU is missing."""
import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sagequant.backends.onnxruntime.capture import capture
from sagequant.backends.onnxruntime.qlinear import ExportError
from sagequant.backends.tensorrt.explicit_quant import check_rules, tensorrt_missing
from sagequant.backends.export import export, onnxruntime_session, parity, to_onnx

PARITY_ATOL = 1e-5


@pytest.fixture(scope="module")
def w4(compiled):
    cm = compiled("llama", weight_dtype="int4", activation_dtype="a16", group_size=32)  # K = 64 / 96
    return cm, capture(cm.graph)


@pytest.fixture(scope="module")
def w8a8(compiled):
    cm = compiled("llama", weight_dtype="int8", activation_dtype="int8", group_size=None,
                  activation_scale="static_per_tensor")
    return cm, capture(cm.graph)


def _ops(m):
    return dict(collections.Counter(n.op_type for n in m.graph.node))


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_int4_weight_only_blocks(w4, eval_ids):
    cm, cap = w4
    m = to_onnx(cm, "tensorrt", captured=cap)
    assert check_rules(m) == []
    ops = _ops(m)
    assert ops["DequantizeLinear"] == 14 and "QuantizeLinear" not in ops  # weight-only: no act Q/DQ
    inits = {t.name: t for t in m.graph.initializer}
    dq = _node(m, "model.layers.0.mlp.down_proj/weight_dq")  # stored [out=64, in=96], blocks on in
    w = inits[dq.input[0]]
    assert w.data_type == TensorProto.INT4 and list(w.dims) == [64, 96]
    assert _attrs(dq) == {"axis": 1, "block_size": 32} and len(dq.input) == 2
    assert numpy_helper.to_array(inits[dq.input[1]]).shape == (64, 3)
    (t,) = [n for n in m.graph.node if dq.output[0] in n.input]
    assert t.op_type == "Transpose" and _attrs(t) == {"perm": [1, 0]}
    (mm,) = [n for n in m.graph.node if t.output[0] in n.input]
    assert mm.op_type == "MatMul" and mm.input[1] == t.output[0]
    res = parity(cm, onnxruntime_session(m), eval_ids)
    assert res["max_abs"] < PARITY_ATOL and res["argmax_agree"] == 1.0, res


def test_w8a8_int8_static(w8a8, eval_ids):
    cm, cap = w8a8
    m = to_onnx(cm, "tensorrt", captured=cap)
    assert check_rules(m) == []
    ops = _ops(m)
    # one Q/DQ pair per distinct activation (q/k/v share the norm's, gate/up theirs): 8 for 14 GEMMs
    assert ops["QuantizeLinear"] == 8 and ops["DequantizeLinear"] == 8 + 14
    k_mm = _node(m, "model.layers.0.self_attn.k_proj/matmul")
    assert k_mm.input[0] == _node(m, "model.layers.0.self_attn.q_proj/input_dq").output[0]
    inits = {t.name: t for t in m.graph.initializer}
    dq = _node(m, "model.layers.0.self_attn.q_proj/weight_dq")
    assert inits[dq.input[0]].data_type == TensorProto.INT8 and list(inits[dq.input[0]].dims) == [64, 64]
    assert _attrs(dq) == {"axis": 0}  # per output channel of the [out, in] weight
    assert numpy_helper.to_array(inits[dq.input[1]]).shape == (64,)
    q = _node(m, "model.layers.0.self_attn.q_proj/input_q")
    assert numpy_helper.to_array(inits[q.input[1]]).shape == ()  # per-tensor activation scale
    assert inits[q.input[2]].data_type == TensorProto.INT8 and not numpy_helper.to_array(inits[q.input[2]]).any()
    mm = _node(m, "model.layers.0.self_attn.q_proj/matmul")
    assert mm.input[0] == _node(m, "model.layers.0.self_attn.q_proj/input_dq").output[0]
    res = parity(cm, onnxruntime_session(m), eval_ids)
    assert res["max_abs"] < PARITY_ATOL and res["argmax_agree"] == 1.0, res


def test_rule_checker_catches_violations(w8a8):
    cm, cap = w8a8
    # the ONNX-Runtime-flavoured export keeps [in, out] weights with per-channel axis 1: R4
    qdq = to_onnx(cm, "onnx", "qdq", captured=cap)
    assert sum(v.startswith("R4 ") and "axis 1" in v for v in check_rules(qdq)) == 14
    m = to_onnx(cm, "tensorrt", captured=cap)
    inits = {t.name: t for t in m.graph.initializer}
    q = _node(m, "model.layers.0.self_attn.q_proj/input_q")
    inits[q.input[2]].CopyFrom(numpy_helper.from_array(np.array(3, np.int8), q.input[2]))  # R1
    dq = _node(m, "model.layers.0.self_attn.k_proj/weight_dq")
    scale = numpy_helper.to_array(inits[dq.input[1]]).copy()
    scale[0] = 0.0
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale, dq.input[1]))  # R1
    v = check_rules(m)
    assert any(x.startswith("R1 model.layers.0.self_attn.q_proj/input_q: zero point") for x in v)
    assert any(x.startswith("R1 model.layers.0.self_attn.k_proj/weight_dq: scale has non-positive") for x in v)
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", name="mnb")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 21)])
    assert any(x.startswith("R7 mnb") for x in check_rules(bad))


@pytest.mark.parametrize("cfg, match", [
    (dict(model_kw="ragged", weight_dtype="int4", activation_dtype="a16", group_size=32),
     r"q_proj .*in_features 80 is not a multiple of group_size 32 .*whole blocks \(R5\)"),
    (dict(weight_dtype="int8", activation_dtype="int8", group_size=None),
     r"static per-tensor activation scales \(R3\).*activation_scale='static_per_tensor'"),
    (dict(weight_dtype="int8", activation_dtype="a16", group_size=None),
     r"weight-only quantization is INT4 only \(R2\), not int8"),
    (dict(weight_dtype="int4", activation_dtype="a16", group_size=32, symmetric=False),
     r"symmetric only \(R1\)"),
    (dict(weight_dtype="int8", activation_dtype="int8", group_size=32, activation_scale="static_per_tensor"),
     r"per-channel or per-tensor \(R4\), not grouped"),
])
def test_refusals_name_layer_and_rule(compiled, helpers, cfg, match):
    cfg = dict(cfg)
    model_kw = helpers.RAGGED if cfg.pop("model_kw", None) == "ragged" else None
    cm = compiled("llama", model_kw=model_kw, **cfg)
    with pytest.raises(ExportError, match="cannot export layer model.layers.0.self_attn.q_proj .*TensorRT"):
        to_onnx(cm, "tensorrt")
    with pytest.raises(ExportError, match=match):
        to_onnx(cm, "tensorrt")


@pytest.mark.skipif(tensorrt_missing() is None, reason="TensorRT and a GPU are present")
def test_engine_build_says_what_is_missing(w4, tmp_path):
    cm, cap = w4
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"cannot build a TensorRT engine: .*(tensorrt|GPU).*trtexec"):
        export(cm, out, format="tensorrt", engine_path=tmp_path / "m.plan", captured=cap)
    assert out.exists() and check_rules(onnx.load(str(out))) == []  # the ONNX is written first
