"""ONNX export (backends/export.py, backends/onnxruntime): graph structure by exact op counts and
initializer types, parity with the torch path in onnxruntime, ragged groups, and refusals.

Parity tolerance: logits of onnxruntime (CPUExecutionProvider) vs CompiledModel.__call__ on the
same ids agree to PARITY_ATOL absolute (measured: ~3e-7 on these tiny models, fp32 rounding
only — the exported weights dequantize to exactly the torch path's weights, the activation
quantization rounds the same way) and on every argmax. FP8 activations: FP8_RTOL relative
(a rare one-step code flip, explained at its test).
"""
import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from sagequant.backends.onnxruntime.capture import capture
from sagequant.backends.onnxruntime.matmulnbits import pack_weight
from sagequant.backends.onnxruntime.qlinear import ExportError, QLinearInfo
from sagequant.ir.quant_spec import QuantSpec
from sagequant.backends.export import export, onnxruntime_session, parity, to_onnx

PARITY_ATOL = 1e-5
FP8_RTOL = 2e-2  # models with fp8 activations: see test_w8a8_fp8_dynamic_and_grouped
MIXED = dict(weight_dtype="int4", activation_dtype="a16", group_size=32,
             overrides={"down_proj": {"symmetric": False},
                        "v_proj": {"weight_dtype": "int8", "group_size": None},
                        "o_proj": {"group_size": None, "per_channel": False}})


@pytest.fixture(scope="module")
def mixed(compiled, helpers):
    """Qwen2 (q/k/v biases) with ragged shapes: hidden 80 = 32+32+16, intermediate 99 (odd, groups
    32,32,32,3). int4 g32 everywhere except down_proj (uint4 + zero points), v_proj (int8
    per-channel, W8A16) and o_proj (int4, one scale per tensor); lm_head stays float. Captured once, emitted many times."""
    cm = compiled("qwen2", model_kw=helpers.RAGGED, **MIXED)
    return cm, capture(cm.graph)


def _ops(model, domain=None) -> dict:
    return dict(collections.Counter(n.op_type for n in model.graph.node
                                    if domain is None or n.domain == domain))


def _inits(model) -> dict:
    return {t.name: t for t in model.graph.initializer}


def _node(model, name):
    return next(n for n in model.graph.node if n.name == name)


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_capture_keeps_one_placeholder_per_quantized_layer(mixed):
    cm, cap = mixed
    placeholders = [n for n in cap.graph.node if n.domain == "sagequant"]
    assert len(placeholders) == 14 == cm.report()["quantized_layers"]
    layers = {_attrs(n)["layer"].decode() for n in placeholders}
    assert layers == set(cm.kernel_bindings)
    assert next(o.version for o in cap.opset_import if o.domain == "") == 21


def test_qdq_structure(mixed):
    cm, cap = mixed
    m = to_onnx(cm, "onnx", "qdq", captured=cap)
    ops = _ops(m)
    assert ops["DequantizeLinear"] == 14 and "QuantizeLinear" not in ops
    assert ops["MatMul"] == 14 + 5  # 14 quantized + 4 attention matmuls + float lm_head
    assert not any(n.domain for n in m.graph.node)  # standard ONNX only
    assert {o.domain for o in m.opset_import} == {""}
    inits = _inits(m)
    q = _node(m, "model.layers.0.self_attn.q_proj/weight_dq")  # [K=80, N=64], groups 32,32,16
    w, s = inits[q.input[0]], numpy_helper.to_array(inits[q.input[1]])
    assert w.data_type == TensorProto.INT4 and list(w.dims) == [80, 64]
    assert _attrs(q) == {"axis": 0, "block_size": 32} and s.shape == (3, 64) and s.dtype == np.float32
    assert len(q.input) == 2  # symmetric: no zero point
    down = _node(m, "model.layers.0.mlp.down_proj/weight_dq")  # K=99: groups 32,32,32,3
    assert inits[down.input[0]].data_type == TensorProto.UINT4 and list(inits[down.input[0]].dims) == [99, 80]
    zp = inits[down.input[2]]
    assert zp.data_type == TensorProto.UINT4 and list(zp.dims) == [4, 80]
    v = _node(m, "model.layers.0.self_attn.v_proj/weight_dq")
    assert inits[v.input[0]].data_type == TensorProto.INT8 and _attrs(v) == {"axis": 1}
    assert numpy_helper.to_array(inits[v.input[1]]).shape == (32,)
    o = _node(m, "model.layers.0.self_attn.o_proj/weight_dq")  # per-tensor: scalar scale, no axis
    assert inits[o.input[0]].data_type == TensorProto.INT4 and _attrs(o) == {}
    assert numpy_helper.to_array(inits[o.input[1]]).shape == ()
    # the codes are ours, transposed: ONNX's flat nibble packing read back gives the same ints
    ann_scales = cm.graph.attr("model.model.layers.0.self_attn.q_proj.scales").float().numpy()
    np.testing.assert_array_equal(s, ann_scales.T)


def test_qdq_parity(mixed, eval_ids):
    cm, cap = mixed
    res = parity(cm, onnxruntime_session(to_onnx(cm, "onnx", "qdq", captured=cap)), eval_ids)
    assert res["max_abs"] < PARITY_ATOL and res["argmax_agree"] == 1.0, res


def test_matmulnbits_structure(mixed):
    cm, cap = mixed
    m = to_onnx(cm, "onnx", "matmulnbits", captured=cap)
    assert _ops(m, "com.microsoft") == {"MatMulNBits": 14}
    assert "DequantizeLinear" not in _ops(m) and _ops(m)["MatMul"] == 5
    assert any(o.domain == "com.microsoft" for o in m.opset_import)
    inits = _inits(m)
    q = _node(m, "model.layers.0.self_attn.q_proj/matmulnbits")
    assert _attrs(q) == {"K": 80, "N": 64, "bits": 4, "block_size": 32, "accuracy_level": 0}
    assert list(inits[q.input[1]].dims) == [64, 3, 16]  # ragged K=80: 3 whole blocks of 16 bytes
    assert len(q.input) == 3  # symmetric int4: default zero point 8
    down = _node(m, "model.layers.0.mlp.down_proj/matmulnbits")
    assert _attrs(down)["K"] == 99 and list(inits[down.input[1]].dims) == [80, 4, 16]
    assert list(inits[down.input[3]].dims) == [80 * 2]  # 4 zero points per row, two per byte
    v = _node(m, "model.layers.0.self_attn.v_proj/matmulnbits")  # per-channel int8: one block
    assert _attrs(v)["bits"] == 8 and _attrs(v)["block_size"] == 128
    assert list(inits[v.input[1]].dims) == [32, 1, 128]
    o = _node(m, "model.layers.0.self_attn.o_proj/matmulnbits")  # per-tensor int4, K=64
    assert _attrs(o)["block_size"] == 64 and list(inits[o.input[1]].dims) == [80, 1, 32]


def test_matmulnbits_parity_and_accuracy_level(mixed, eval_ids):
    cm, cap = mixed
    res = parity(cm, onnxruntime_session(to_onnx(cm, "onnx", "matmulnbits", captured=cap)), eval_ids)
    assert res["max_abs"] < PARITY_ATOL and res["argmax_agree"] == 1.0, res
    # accuracy_level 4 quantizes activations to int8 inside the kernel: close, not exact
    fast = parity(cm, onnxruntime_session(to_onnx(cm, "onnx", "matmulnbits", accuracy_level=4,
                                                  captured=cap)), eval_ids)
    assert PARITY_ATOL < fast["max_abs"] and fast["max_rel"] < 0.05, fast


def test_matmulnbits_packing_matches_a_hand_layout():
    # one row, K=5, block 16: codes -8..-4 -> unsigned 0..4, padded with the zero point 8
    spec = QuantSpec("int4", "per_group", 16)
    info = QLinearInfo("l", spec, None, 1, 5, codes=np.array([[-8, -7, -6, -5, -4]]),
                       scales=np.array([[0.5]], np.float32), zeros=None, act_scale=None)
    b, s, zp = pack_weight(info, 4, 16)
    assert b.shape == (1, 1, 8) and zp is None and s.tolist() == [0.5]
    assert b[0, 0].tolist() == [0x10, 0x32, 0x84, 0x88, 0x88, 0x88, 0x88, 0x88]
    # asymmetric uint4, 3 blocks: zero points 1, 2, 3 -> bytes 0x21, 0x03; padding uses zp 3
    info = QLinearInfo("l", QuantSpec("uint4", "per_group", 16, symmetric=False), None, 1, 40,
                       codes=np.full((1, 40), 5), scales=np.ones((1, 3), np.float32),
                       zeros=np.array([[1, 2, 3]]), act_scale=None)
    b, _, zp = pack_weight(info, 4, 16)
    assert zp.tolist() == [0x21, 0x03] and b[0, 2, 4:].tolist() == [0x33] * 4


@pytest.mark.parametrize("scheme", [
    dict(activation_scale="static_per_tensor"),
    dict(activation_scale="dynamic_per_token"),
])
def test_w8a8_int8(compiled, eval_ids, scheme):
    cm = compiled("llama", weight_dtype="int8", activation_dtype="int8", group_size=None, **scheme)
    m = to_onnx(cm, "onnx", "qdq")
    ops = _ops(m)
    # 14 quantized linears read 8 distinct activations (per layer: input norm -> q/k/v, attention
    # -> o_proj, post norm -> gate/up, gated MLP -> down_proj): one quantizer each, shared.
    if scheme["activation_scale"] == "static_per_tensor":
        # Q/DQ on each quantized activation (per-tensor scale), per-channel DQ on each weight
        assert ops["QuantizeLinear"] == 8 and ops["DequantizeLinear"] == 8 + 14
        q = _node(m, "model.layers.0.self_attn.q_proj/input_q")
        scale = numpy_helper.to_array(_inits(m)[q.input[1]])
        zero = _inits(m)[q.input[2]]
        assert scale.shape == () and zero.data_type == TensorProto.INT8
        record = cm.calibration_records["model.layers.0.self_attn.q_proj"]["input"]
        assert float(scale) == pytest.approx(record["scale"], rel=1e-7)
    else:
        # per-token codes from the row's absmax, a uint8 (code + 128, zero point 128) x int8 -> int32
        # GEMM, then the scales
        assert ops["MatMulInteger"] == 14 and "DequantizeLinear" not in ops
        assert ops["ReduceMax"] == 8 and ops["Round"] == 8
        mmi = _node(m, "model.layers.0.self_attn.q_proj/matmul_integer")
        assert int(numpy_helper.to_array(_inits(m)[mmi.input[2]])) == 128
    res = parity(cm, onnxruntime_session(m), eval_ids)
    assert res["max_abs"] < PARITY_ATOL and res["argmax_agree"] == 1.0, res


def test_w8a8_fp8_dynamic_and_grouped(compiled, eval_ids):
    """FP8 activations per token (Cast to float8e4m3fn and back) with fp8 weights in blocks.

    Each layer matches the reference kernel to fp32 rounding given the same input, but the
    reference accumulates in float64 and onnxruntime in float32: when that 1-ulp difference lands
    on an fp8 rounding midpoint, one activation code moves by one fp8 step (1/16 relative) and
    the change propagates. Tolerance: max_rel < FP8_RTOL, argmax agreement >= 0.95."""
    cm = compiled("llama", weight_dtype="fp8", activation_dtype="fp8", group_size=32)
    m = to_onnx(cm, "onnx", "qdq")
    inits = _inits(m)
    q = _node(m, "model.layers.0.self_attn.q_proj/weight_dq")
    assert inits[q.input[0]].data_type == TensorProto.FLOAT8E4M3FN and _attrs(q)["block_size"] == 32
    assert _ops(m)["Cast"] >= 2 * 8  # to float8 and back, once per distinct activation (shared)
    res = parity(cm, onnxruntime_session(m), eval_ids)
    assert res["max_rel"] < FP8_RTOL and res["argmax_agree"] >= 0.95, res


def test_export_writes_file_and_metadata(mixed, tmp_path, eval_ids):
    cm, cap = mixed
    out = export(cm, tmp_path / "sub" / "m.onnx", weight_format="matmulnbits", captured=cap)
    assert out.exists() and not list(out.parent.glob(".*tmp*"))
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["sagequant.scheme"] == "W4A16" and meta["sagequant.weight_format"] == "matmulnbits"
    assert parity(cm, onnxruntime_session(out), eval_ids)["max_abs"] < PARITY_ATOL


def test_loaded_artifact_exports_the_same(mixed, tmp_path):
    import sagequant as sq
    cm, _ = mixed
    cm.save(tmp_path / "art")
    back = sq.load(tmp_path / "art")
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))
    res = parity(back, onnxruntime_session(back.export(tmp_path / "b.onnx", weight_format="matmulnbits")), ids)
    assert res["max_abs"] < PARITY_ATOL


# ---- refusals: clear errors, before the (slow) capture ------------------------------------------

def test_nf4_is_refused_naming_scheme_and_formats(compiled):
    cm = compiled("llama", weight_dtype="nf4", activation_dtype="a16", group_size=32)
    with pytest.raises(ExportError, match=r"model\.layers\.0\.self_attn\.q_proj .*nf4.*NF4 .*int4/uint4"):
        to_onnx(cm, "onnx", "qdq")
    with pytest.raises(ExportError, match="MatMulNBits takes 4- or 8-bit integer weights, not nf4"):
        to_onnx(cm, "onnx", "matmulnbits")


def test_matmulnbits_refusals(compiled):
    cm = compiled("llama", weight_dtype="int4", activation_dtype="a16", group_size=24)
    with pytest.raises(ExportError, match=r"q_proj .*power of two >= 16, group_size is 24.*weight_format='qdq'"):
        to_onnx(cm, "onnx", "matmulnbits")
    w8a8 = compiled("llama", weight_dtype="int8", activation_dtype="int8", group_size=None)
    with pytest.raises(ExportError, match="MatMulNBits is weight-only"):
        to_onnx(w8a8, "onnx", "matmulnbits")
    fp8 = compiled("llama", weight_dtype="fp8", activation_dtype="a16", group_size=None)
    with pytest.raises(ExportError, match="not fp8_e4m3"):
        to_onnx(fp8, "onnx", "matmulnbits")


def test_bad_arguments(mixed):
    cm, _ = mixed
    with pytest.raises(ExportError, match="format='onnnx' is not supported; valid: onnx, tensorrt"):
        cm.export("x.onnx", format="onnnx")
    with pytest.raises(ExportError, match="weight_format='int4' is not supported; valid: qdq, matmulnbits"):
        cm.export("x.onnx", weight_format="int4")
    with pytest.raises(ExportError, match="TensorRT does not read"):
        cm.export("x.onnx", format="tensorrt", weight_format="matmulnbits")
    with pytest.raises(ExportError, match="accuracy_level=7"):
        cm.export("x.onnx", weight_format="matmulnbits", accuracy_level=7)


def test_unlowered_graph_is_refused(tiny, calib_ids):
    import sagequant as sq
    cm = sq.compile(tiny("llama"), sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=32),
                    calibration_data=calib_ids, stop_after="convert")
    with pytest.raises(ExportError, match="dequantize_weight: the graph was not lowered"):
        capture(cm.graph)
