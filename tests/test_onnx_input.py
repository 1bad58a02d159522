"""ONNX models as input (frontends/onnx): a tiny llama exported by torch.onnx, quantized through
sagequant.compile, run in onnxruntime.

Parity: the ONNX-input path and the torch path quantize the same weights with the same QuantSpecs
and calibrate the same activations (observers on onnxruntime outputs vs on the fx graph), so
their logits agree to fp32 rounding: TORCH_PATH_ATOL (measured ~2e-7). With fp8 activations
FP8_ATOL: the torch reference kernel accumulates in float64, onnxruntime in float32, and where that
last-bit difference meets an fp8 rounding midpoint one activation code moves by one fp8 step
(measured 2.6e-4 on logits of magnitude ~0.5; see test_export_onnx.py).
"""
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import sagequant as sq
from sagequant.frontends.onnx import OnnxCompiledModel, OnnxInputError
from sagequant.frontends.onnx.balance import smoothquant
from sagequant.frontends.onnx.calibrate import collect, run_logits
from sagequant.frontends.onnx.graph import find_linears, norm_groups, scope_names

TORCH_PATH_ATOL = 1e-5
FP8_ATOL = 5e-3


@pytest.fixture(scope="module")
def onnx_path(tiny, tmp_path_factory):
    """The tiny llama as torch.onnx (dynamo) exports it: logits from input_ids."""
    from torch.export import Dim

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    path = tmp_path_factory.mktemp("onnx_in") / "tiny_llama.onnx"
    with torch.no_grad():
        program = torch.onnx.export(Logits(tiny("llama")).eval(), (torch.randint(0, 128, (2, 8)),), dynamo=True,
                                    input_names=["input_ids"], output_names=["logits"], optimize=True,
                                    dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},), verbose=False)
    onnx.save(program.model_proto, str(path))
    return path


@pytest.mark.parametrize("cfg", [
    dict(weight_dtype="int4", activation_dtype="a16", group_size=32),
    dict(weight_dtype="int8", activation_dtype="int8", group_size=None),
    dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None, activation_scale="static_per_tensor"),
    dict(weight_dtype="int8", activation_dtype="int8", group_size=None, activation_scale="static_per_tensor",
         calibration="percentile"),
])
def test_matches_the_torch_path(onnx_path, tiny, calib_ids, eval_ids, cfg):
    config = sq.QuantConfig(guard="off", **cfg)
    cm = sq.compile(onnx_path, config, calibration_data=calib_ids)
    assert isinstance(cm, OnnxCompiledModel)
    rep = cm.report()
    assert rep["quantized_layers"] == 14 and rep["kept_in_high_precision"] == ["m.lm_head"]
    torch_side = sq.compile(tiny("llama"), config, calibration_data=calib_ids)
    atol = FP8_ATOL if config.activation_format and "fp8" in config.activation_format else TORCH_PATH_ATOL
    assert float((cm(eval_ids) - torch_side(eval_ids)).abs().max()) < atol


def test_emitted_forms_and_layer_names(onnx_path, calib_ids, eval_ids, tmp_path):
    cm = sq.compile(str(onnx_path), sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=32,
                                                    overrides={"down_proj": "skip"}))
    assert "m.model.layers.1.mlp.down_proj" in cm.report()["kept_in_high_precision"]
    ops = [n.op_type for n in cm.model.graph.node]
    assert ops.count("DequantizeLinear") == 12 and ops.count("MatMul") == 12 + 3 + 4  # + 3 float, + 4 attention
    nbits = onnx.load(str(cm.export(tmp_path / "m.onnx", weight_format="matmulnbits")))
    assert sum(n.op_type == "MatMulNBits" for n in nbits.graph.node) == 12
    from sagequant.backends.export import onnxruntime_session, run_logits
    assert torch.allclose(run_logits(onnxruntime_session(tmp_path / "m.onnx"), eval_ids), cm(eval_ids), atol=1e-5)


def test_smoothquant_fold_is_exact_and_awq_never_worse_than_rtn(onnx_path, calib_ids, eval_ids):
    import onnx_graphsurgeon as gs
    model = onnx.load(str(onnx_path))
    graph = gs.import_onnx(model)
    linears = find_linears(graph, scope_names(model))
    groups = norm_groups(graph, linears, {lin.name for lin in linears if lin.name != "m.lm_head"})
    assert [len(g.linears) for g in groups] == [3, 2, 3, 2]  # q/k/v and gate/up; float lm_head: not
    cfg = sq.QuantConfig(weight_dtype="int8", activation_dtype="int8", group_size=None)
    stats = collect(model, [g.linears[0] for g in groups], list(calib_ids.split(1)), cfg)
    smoothquant(groups, stats, 0.5)
    before = run_logits(model, eval_ids)
    after = run_logits(gs.export_onnx(graph), eval_ids)
    assert not np.allclose(numpy_helper.to_array(model.graph.initializer[1]),
                           groups[0].gamma.values)  # the norm scale did change
    assert torch.allclose(before, after, atol=1e-5)
    cm = sq.compile(onnx_path, sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=32,
                                              calibration="awq", awq_grid=4), calibration_data=calib_ids)
    awq = next(h for h in cm.pass_history if h["pass"] == "awq")["stats"]
    assert awq["groups"] == 4 and all(g["loss"] <= g["rtn_loss"] for g in awq["per_group"].values())
    assert awq["clipped_layers"] == 14 and awq["clip_loss_awq"] <= awq["clip_loss_rtn"]


def test_corrupt_and_truncated_files(onnx_path, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(OnnxInputError, match="not a readable ONNX model|invalid"):
        sq.compile(bad, sq.QuantConfig())
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_path.read_bytes()[:5000])
    with pytest.raises(OnnxInputError, match="cut.onnx"):
        sq.compile(cut, sq.QuantConfig())
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        sq.compile(tmp_path / "missing.onnx", sq.QuantConfig())


def _tiny_graph(op_type: str, domain: str = ""):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node(op_type, ["y"], ["z"], name="odd", domain=domain)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 4])], [w])
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(g, opset_imports=opsets)


@pytest.mark.parametrize("op, domain, named", [("MyFancyNorm", "acme.ops", "acme.ops::MyFancyNorm"),
                                               ("NonMaxSuppression", "", "NonMaxSuppression")])
def test_unknown_ops_are_named(op, domain, named):
    with pytest.raises(OnnxInputError, match=f"does not know op {named} \\(node odd\\)"):
        sq.compile(_tiny_graph(op, domain), sq.QuantConfig())


def test_bad_configs_and_inputs(onnx_path, calib_ids):
    with pytest.raises(sq.ConfigError, match="calibration='gptq' is not available for ONNX"):
        sq.compile(onnx_path, sq.QuantConfig(calibration="gptq"), calibration_data=calib_ids)
    with pytest.raises(sq.ConfigError, match="stop_after apply to the torch pipeline"):
        sq.compile(onnx_path, sq.QuantConfig(), stop_after="lower")
    from sagequant.calibration.datasets import CalibrationDataError
    with pytest.raises(CalibrationDataError, match="static activation scales.*needs calibration data"):
        sq.compile(onnx_path, sq.QuantConfig(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                             activation_scale="static_per_tensor"))
    with pytest.raises(sq.ConfigError, match="pattern 'nope' matches no linear"):
        sq.compile(onnx_path, sq.QuantConfig(ignore=["nope"]))
    from sagequant.backends.onnxruntime.qlinear import ExportError
    with pytest.raises(ExportError, match="NF4"):
        sq.compile(onnx_path, sq.QuantConfig(weight_dtype="nf4", activation_dtype="a16", group_size=32))


def test_tied_embedding_head_through_a_transpose_is_a_linear():
    """x @ Transpose(E), as torch.onnx writes a tied lm_head, is found with weight E^T [in, out]."""
    import onnx_graphsurgeon as gs
    e = np.arange(32, dtype=np.float32).reshape(8, 4)
    nodes = [helper.make_node("Transpose", ["embed.weight"], ["e_t"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "e_t"], ["y"], name="head")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
                          [numpy_helper.from_array(e, "embed.weight")])
    (lin,) = find_linears(gs.import_onnx(helper.make_model(g)), {})
    assert lin.name == "embed" and np.array_equal(lin.weight_out_in(), e)
