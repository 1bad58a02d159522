"""Accuracy guard (passes/guard.py): held-back split, numbers against float64 references, a broken
layer caught and named, report/artifact round trip, bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

import sagequant as sq
from sagequant.calibration.datasets import CalibrationDataError
from sagequant.config import ConfigError
from sagequant.passes.guard import AccuracyGuardError

BROKEN = "model.layers.1.mlp.down_proj"


def _reference_numbers(model, compiled, ids):
    """KL(float || quantized), top-1 agreement and delta loss over ids, computed independently."""
    kl = agree = nll_f = nll_q = 0.0
    positions = targets = 0
    with torch.inference_mode():
        for row in ids:
            x = row[None]
            pf = model(input_ids=x, use_cache=False).logits.double().log_softmax(-1)[0]
            pq = compiled(x).double().log_softmax(-1)[0]
            kl += float(torch.nn.functional.kl_div(pq, pf, log_target=True, reduction="sum"))
            agree += float((pf.argmax(-1) == pq.argmax(-1)).sum())
            positions += pf.shape[0]
            nll_f -= float(pf[:-1].gather(-1, row[1:, None]).sum())
            nll_q -= float(pq[:-1].gather(-1, row[1:, None]).sum())
            targets += row.numel() - 1
    return kl / positions, agree / positions, (nll_q - nll_f) / targets


def test_guard_numbers_match_float64_reference_on_the_last_rows(tiny, compiled, calib_ids):
    cm = compiled("llama", group_size=32)
    g = cm.report()["accuracy_guard"]
    assert g["passed"] and g["violations"] == [] and g["mode"] == "enforce"
    # The split is explicit: the last guard_samples rows are held back, the rest calibrate.
    assert g["held_back"]["sequences"] == 2 and g["held_back"]["calibration_sequences"] == 2
    assert g["held_back"]["tokens"] == calib_ids[2:].numel()
    calibrate = next(p for p in cm.report()["passes"] if p["pass"] == "calibrate")
    assert calibrate["stats"]["batches"] == 2
    kl, top1, dloss = _reference_numbers(tiny("llama"), cm, calib_ids[2:])
    assert g["kl"] == pytest.approx(kl, rel=1e-6, abs=1e-12)
    assert g["top1_agreement"] == pytest.approx(top1)
    assert g["delta_loss"] == pytest.approx(dloss, rel=1e-6, abs=1e-12)
    assert g["kl"] > 0  # W4 changes the logits: a guard measuring nothing would read 0
    # paired standard errors over the 2 held-back sequences: positive, smaller than the means
    assert 0 < g["kl_se"] < g["kl"] and g["delta_loss_se"] > 0 and g["top1_flip_se"] >= 0
    assert g["bounds"] == {"max_kl": 1.5, "max_delta_loss": 1.5, "min_top1": 0.3}
    worst = g["worst_layers"]
    assert len(worst) == 5 and worst == sorted(worst, key=lambda r: r["local_sqnr_db"])
    assert all(math.isfinite(r["local_sqnr_db"]) and r["min_layer_sqnr_db"] == 6.0 for r in worst)


def test_guard_numbers_survive_save_and_load(compiled, tmp_path):
    cm = compiled("llama", group_size=32)
    loaded = sq.load(cm.save(tmp_path / "art"))
    assert loaded.report()["accuracy_guard"] == cm.report()["accuracy_guard"]  # JSON keeps floats exact


def test_broken_scale_in_one_layer_fails_compile_naming_it(tiny, calib_ids):
    # clip_ratio 0.02 forces that layer's weight scales 50x too small: almost every weight clips.
    cfg = sq.QuantConfig(group_size=32, overrides={BROKEN: {"clip_ratio": 0.02}})
    with pytest.raises(AccuracyGuardError) as info:
        sq.compile(tiny("llama"), cfg, calibration_data=calib_ids)
    err = info.value
    assert err.result["layers_below_bound"] == [BROKEN]
    assert err.result["worst_layers"][0]["layer"] == BROKEN
    assert err.result["worst_layers"][0]["local_sqnr_db"] < 3 < err.result["worst_layers"][1]["local_sqnr_db"]
    msg = str(err)
    assert BROKEN in msg and "min_layer_sqnr_db" in msg and "guard='report'" in msg
    assert any("'guard'" in note for note in err.__notes__)


def test_report_mode_records_the_violation_and_compiles(tiny, calib_ids):
    cfg = sq.QuantConfig(group_size=32, overrides={BROKEN: {"clip_ratio": 0.02}}, guard="report")
    g = sq.compile(tiny("llama"), cfg, calibration_data=calib_ids).report()["accuracy_guard"]
    assert not g["passed"] and g["layers_below_bound"] == [BROKEN] and g["mode"] == "report"


def test_model_level_bound_names_the_metric(tiny, calib_ids):
    cfg = sq.QuantConfig(group_size=32, guard_bounds={"max_kl": 1e-9})
    with pytest.raises(AccuracyGuardError, match=r"kl .* outside max_kl 1e-09"):
        sq.compile(tiny("llama"), cfg, calibration_data=calib_ids)


def test_guard_off_calibrates_on_everything_and_records_why(compiled):
    cm = compiled("llama", group_size=32, guard="off")
    assert cm.report()["accuracy_guard"] == {"skipped": "QuantConfig.guard='off'"}
    calibrate = next(p for p in cm.report()["passes"] if p["pass"] == "calibrate")
    assert calibrate["stats"]["batches"] == 4


def test_no_calibration_data_warns_and_reports_not_run(tiny):
    with pytest.warns(UserWarning, match="accuracy guard not run"):
        cm = sq.compile(tiny("llama"), sq.QuantConfig(group_size=32))
    assert "no calibration data" in cm.report()["accuracy_guard"]["skipped"]


@pytest.mark.parametrize("rows, cols, guard_samples, match", [
    (2, 16, 2, "holds back the last 2"),        # nothing left to calibrate on
    (3, 4, 2, "6 next-token targets"),          # held back, but too short to measure
])
def test_held_back_data_too_small_is_a_clear_error(tiny, rows, cols, guard_samples, match):
    ids = torch.randint(0, 128, (rows, cols), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CalibrationDataError, match=match):
        sq.compile(tiny("llama"), sq.QuantConfig(group_size=32, guard_samples=guard_samples),
                   calibration_data=ids)


@pytest.mark.parametrize("bad", [
    {"guard_bounds": {"max_kl": float("nan")}}, {"guard_bounds": {"max_kl": "0.1"}},
    {"guard_bounds": {"kl": 0.1}}, {"guard_bounds": {"min_top1": 1.5}}, {"guard_bounds": [0.1]},
    {"guard": "strict"}, {"guard_samples": 0},
])
def test_bad_guard_config_is_rejected_by_name(bad):
    field = next(iter(bad))
    with pytest.raises(ConfigError, match=f"QuantConfig.{field}"):
        sq.QuantConfig(**bad)


def test_smoothquant_folded_layers_are_compared_in_the_graphs_space(compiled):
    # The fold rescales inputs (and producer outputs) per channel; compared against the unfolded
    # float layer without undoing it, every folded layer read about -28 dB here.
    cm = compiled("llama", weight_dtype="int8", activation_dtype="int8", group_size=None,
                  activation_scale="static_per_tensor", calibration="smoothquant")
    g = cm.report()["accuracy_guard"]
    assert g["passed"] and g["worst_layers"][0]["local_sqnr_db"] > 20
