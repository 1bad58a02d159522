"""The one driver: passes/pipeline.py builds every entry point's pass list from a config and a mode;
a pass the config does not select is left out with its reason; the artifact records the pipeline."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sagequant as sq
from sagequant.passes.pipeline import (LAYERWISE, ONNX, PTQ, QAT, STEP_GRAPH, PTQ_PASSES, Pipeline,
                                       build_pipeline)
from sagequant.tools.cli import main as cli

PACKAGE = Path(__file__).resolve().parents[1] / "sagequant"


def test_ptq_pipeline_lists_what_the_config_selects_and_why_not_the_rest():
    p = build_pipeline(sq.QuantConfig(calibration="gptq", guard="off", fuse_qdq=False), PTQ)
    assert p.names == ["canonicalize", "annotate", "insert_observers", "calibrate", "gptq", "convert",
                       "lower", "schedule"]
    assert {o.name: o.reason for o in p.omitted} == {
        "rotate": "QuantConfig.rotate='off'",
        "mixed_precision": "no target_bits_per_weight / target_max_delta_loss",
        "smoothquant": "calibration=gptq", "awq": "calibration=gptq",
        "guard": "QuantConfig.guard='off'", "fuse_norm_qdq": "QuantConfig.fuse_qdq=False"}
    gptq = p.passes[p.names.index("gptq")]
    assert gptq.options == {"gptq_block_size": 128, "gptq_damp": 0.01, "gptq_act_order": False,
                            "gptq_static_groups": False, "gptq_true_sequential": False, "sink_tokens": 0, "gptq_row_energy_cap": None,
                            "gptq_sink_weight": 1.0, "gptq_select_blocks": 0}
    text = p.describe()
    assert "5. gptq" in text and "gptq_damp=0.01" in text and "guard             QuantConfig.guard='off'" in text


def test_guard_needs_held_back_data_and_the_float_model():
    cfg = sq.QuantConfig(calibration="smoothquant+awq", weight_dtype="int8", activation_dtype="int8",
                         target_bits_per_weight=6.0, rotate="hadamard")
    assert "guard" not in build_pipeline(cfg, PTQ).names
    assert build_pipeline(cfg, PTQ).omitted_reason("guard").startswith("no calibration data")
    assert build_pipeline(cfg, PTQ, held_back=True).omitted_reason("guard") == "no float model to compare with"
    full = build_pipeline(cfg, PTQ, held_back=True, reference=True)
    assert full.names == [p for p in PTQ_PASSES if p != "gptq"]
    assert [(o.name, o.reason) for o in full.omitted] == [("gptq", "calibration=smoothquant+awq")]


def test_qat_trains_between_the_passes_before_convert_and_the_rest():
    p = build_pipeline(sq.QuantConfig(enable_qat=True, weight_dtype="int4", activation_dtype="a16"), QAT)
    cut = p.names.index("qat_train")
    assert p.names[cut - 1:cut + 2] == ["fake_quant", "qat_train", "fold_fake_quant"]
    assert p.names[cut + 2:] == ["convert", "lower", "schedule", "fuse_norm_qdq"]
    assert "guard" not in p.names and p.omitted_reason("guard") is None  # not a QAT pass at all


def test_layerwise_runs_calibration_and_convert_block_by_block_inside_one_pass():
    p = build_pipeline(sq.QuantConfig(calibration="gptq", fuse_qdq=False), LAYERWISE)
    assert p.names == ["canonicalize", "annotate", "layerwise", "lower", "schedule"]
    assert p.passes[2].options["calibration"] == "gptq"
    assert p.omitted_reason("fuse_norm_qdq") == "QuantConfig.fuse_qdq=False"


def test_step_graph_and_onnx_modes():
    assert build_pipeline(sq.QuantConfig(kv_cache_dtype="int8"), STEP_GRAPH).names == ["kv_cache", "kv_cache_quant"]
    onnx = build_pipeline(sq.QuantConfig(weight_dtype="int8", activation_dtype="int8", calibration="smoothquant",
                                         activation_scale="static_per_tensor"), ONNX)
    assert onnx.names == ["load", "annotate", "smoothquant", "calibrate", "quantize"]
    dynamic = build_pipeline(sq.QuantConfig(), ONNX)
    assert dynamic.names == ["load", "annotate", "quantize"]
    assert "dynamic_per_token" in dynamic.omitted_reason("calibrate")
    with pytest.raises(ValueError, match="modes: ptq, qat, layerwise, step_graph, onnx"):
        build_pipeline(sq.QuantConfig(), "jit")


def test_stop_after_an_omitted_pass_says_why(tiny):
    with pytest.raises(ValueError, match=r"stop_after='awq': that pass is not in this pipeline \(calibration=minmax\)"):
        sq.compile(tiny("llama"), sq.QuantConfig(group_size=32), stop_after="awq")


def test_compile_records_its_pipeline_in_the_artifact(tiny, calib_ids, tmp_path, capsys):
    cfg = sq.QuantConfig(group_size=32, guard="report")
    cm = sq.compile(tiny("llama"), cfg, calibration_data=list(calib_ids.split(1)) * 2)
    assert [h["pass"] for h in cm.pass_history] == cm.pipeline.names
    assert "guard" in cm.pipeline.names
    loaded = sq.load(cm.save(tmp_path / "a"))
    assert loaded.pipeline == cm.pipeline and loaded.pipeline.to_dict() == cm.pipeline.to_dict()
    assert Pipeline.from_dict(cm.pipeline.to_dict()) == cm.pipeline
    assert cli(["inspect", "--artifact", str(tmp_path / "a"), "--pipeline"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"pipeline (ptq): {len(cm.pipeline.names)} passes")
    assert "awq               calibration=minmax" in out and "group_size" not in out


def test_report_says_why_an_omitted_pass_did_not_run(tiny):
    cm = sq.compile(tiny("llama"), sq.QuantConfig(group_size=32, guard="off"))
    assert cm.report()["accuracy_guard"] == {"skipped": "QuantConfig.guard='off'"}
    assert cm.report()["mixed_precision"] == {"skipped": "no target_bits_per_weight / target_max_delta_loss"}


def _pass_manager_constructions():
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "PassManager":
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def test_only_the_driver_constructs_pass_managers():
    assert [f.split(":")[0] for f in _pass_manager_constructions()] == ["passes/pipeline.py"]
