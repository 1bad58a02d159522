"""insert_observers + calibrate: one observer per quantized linear, records equal to the true
ranges of each linear's input, percentile/clip_ratio semantics, and loud errors on bad data."""
import numpy as np
import pytest
import torch

import sagequant as sq
from sagequant.calibration.datasets import CalibrationDataError
from sagequant.calibration.observers import MinMaxObserver, PercentileObserver
from sagequant.ir.formats import QuantizationError
from sagequant.passes import PassContext, PassManager
from sagequant.passes.insert_observers import OBSERVER_PREFIX

Q0 = "model.layers.0.self_attn.q_proj"


def _batches():
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (2, 7), generator=g), torch.randint(0, 128, (12,), generator=g),
            torch.randint(0, 128, (1, 16), generator=g)]


def _reference_ranges(model, batches):
    """min/max of every nn.Linear's input over all batches, via forward pre-hooks on eager."""
    seen, handles = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, args, name=name):
                x = args[0].detach()
                lo, hi = seen.get(name, (float("inf"), float("-inf")))
                seen[name] = (min(lo, float(x.min())), max(hi, float(x.max())))
            handles.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(b if b.dim() == 2 else b.unsqueeze(0))
    for h in handles:
        h.remove()
    return seen


def _observers(graph):
    return [n for n in graph.graph.nodes if n.op == "call_module"]


def test_one_observer_per_quantized_linear(traced):
    _, graph = traced("llama")
    cfg = sq.QuantConfig(group_size=32, overrides={"layers.1.mlp.*": "skip"})
    ctx = PassContext(cfg, [b if b.dim() == 2 else b.unsqueeze(0) for b in _batches()])
    pm = PassManager(["canonicalize", "annotate", "insert_observers"])
    graph = pm.run(graph, ctx)
    quantized = [n for n in graph.annotated() if graph.annotation(n).quantized]
    obs = _observers(graph)
    assert len(quantized) == 11 and len(obs) == 11
    assert pm.history[-1]["stats"] == {"observers": 11}
    for o in obs:
        assert str(o.target).startswith(OBSERVER_PREFIX)
        (user,) = o.users
        assert graph.annotation(user).quantized and user.args[0] is o
        assert isinstance(graph.gm.get_submodule(o.target), MinMaxObserver)
    # Float layers read their input directly.
    for n in graph.annotated():
        if not graph.annotation(n).quantized:
            assert n.args[0].op != "call_module"
    # Observers are identity on the data path.
    ids = torch.randint(0, 128, (1, 6))
    graph.gm(ids)
    PassManager(["calibrate"]).run(graph, ctx)
    assert _observers(graph) == []
    assert not [n for n, _ in graph.gm.named_modules() if n.startswith(OBSERVER_PREFIX)]
    assert ctx.ran[-1] == "calibrate"


def test_records_equal_true_input_ranges(tiny):
    model = tiny("llama")
    batches = _batches()
    ref = _reference_ranges(model, batches)
    # guard="off": no sequence is held back for the accuracy guard, so all three calibrate.
    cm = sq.compile(model, sq.QuantConfig(group_size=32, guard="off"), calibration_data=batches)
    recs = cm.calibration_records
    assert sorted(recs) == sorted(n for n in ref if n != "lm_head")
    n_tokens = 2 * 7 + 12 + 16
    for layer, (lo, hi) in ref.items():
        if layer == "lm_head":
            continue
        r = recs[layer]["input"]
        assert r["observer"] == "minmax" and r["tensor"] == "input"
        assert r["min"] == pytest.approx(lo, rel=1e-6, abs=1e-7), layer
        assert r["max"] == pytest.approx(hi, rel=1e-6, abs=1e-7), layer
        assert r["absmax"] == pytest.approx(max(-lo, hi), rel=1e-6)
        assert r["clip"] == pytest.approx(r["absmax"])
        assert r["num_samples"] == 3
        in_features = model.get_submodule(layer).in_features
        assert r["num_values"] == n_tokens * in_features
    passes = {p["pass"]: p for p in cm.report()["passes"]}
    assert passes["calibrate"]["stats"] == {"records": 14, "batches": 3, "observed_batches": 3,
                                            "tokens": n_tokens}
    assert not _observers(cm.graph)


def test_weight_only_without_data_has_no_input_records(tiny):
    cm = sq.compile(tiny("llama"), sq.QuantConfig(group_size=32))
    recs = cm.calibration_records
    assert len(recs) == 14
    assert all(set(r) == {"weight"} for r in recs.values())
    assert not _observers(cm.graph)


def test_percentile_observer_ignores_outliers():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 50_000, generator=g) for _ in range(3)]
    batches[1][0, :5] = 100.0
    batches[2][3, 17] = -250.0
    mm, pc = MinMaxObserver("x"), PercentileObserver("x", 99.9)
    for b in batches:
        assert mm(b) is b and pc(b) is b
    r_mm, r_pc = mm.record("input", 1.0), pc.record("input", 1.0)
    assert r_mm.clip == 250.0 and r_mm.min == -250.0 and r_mm.max == 100.0
    expected = np.mean([np.percentile(np.abs(b.double().numpy()), 99.9) for b in batches])
    assert r_pc.clip == pytest.approx(expected, rel=1e-5)
    assert r_pc.clip < 4.0 < r_mm.clip  # the outliers do not stretch the percentile range
    assert r_pc.percentile == 99.9 and r_pc.observer == "percentile"
    assert (r_pc.min, r_pc.max) == (r_mm.min, r_mm.max)
    assert r_pc.num_samples == 3 and r_pc.num_values == 3 * 200_000


def test_percentile_clip_below_minmax_in_compile(fresh_tiny, calib_ids):
    model = fresh_tiny("llama")
    with torch.no_grad():  # an activation outlier: one embedding channel of token 7 is huge
        model.model.embed_tokens.weight[7, 3] = 50.0
    data = calib_ids.clone()
    data[0, 4] = 7
    mm = sq.compile(model, sq.QuantConfig(group_size=32), calibration_data=data).calibration_records
    pc = sq.compile(model, sq.QuantConfig(group_size=32, calibration="percentile"),
                    calibration_data=data).calibration_records
    for layer in mm:
        a, b = mm[layer]["input"], pc[layer]["input"]
        assert b["observer"] == "percentile"
        assert (a["min"], a["max"]) == (b["min"], b["max"])
        assert b["clip"] < a["clip"], layer
    assert pc[Q0]["input"]["clip"] < 0.75 * mm[Q0]["input"]["clip"]


def test_clip_ratio_scales_clip(tiny, compiled):
    model = tiny("llama")
    full, half = compiled("llama", group_size=32), compiled("llama", group_size=32, clip_ratio=0.5)
    rf, rh = full.calibration_records, half.calibration_records
    for layer in rf:
        for t in ("input", "weight"):
            assert rh[layer][t]["absmax"] == rf[layer][t]["absmax"]
            assert rh[layer][t]["clip"] == pytest.approx(0.5 * rf[layer][t]["clip"], rel=1e-7)
    # The weight scales follow the clipped range: fp32(0.5 * group absmax / 7.5), int4 using all 16 levels.
    node = next(n for n in half.graph.annotated() if half.graph.annotation(n).layer == Q0)
    scales = half.graph.attr(node.args[2])
    w = model.get_submodule(Q0).weight.detach().double()
    absmax = w.abs().reshape(w.shape[0], -1, 32).amax(-1)
    torch.testing.assert_close(scales, (0.5 * absmax / 7.5).float(), rtol=0, atol=0)


def test_clip_ratio_override_per_layer(tiny, calib_ids):
    # A 0.25 clip damages that layer (local SQNR ~4.5 dB): the guard would rightly refuse it.
    cfg = sq.QuantConfig(group_size=32, overrides={"layers.0.mlp.up_proj": {"clip_ratio": 0.25}},
                         guard="report")
    recs = sq.compile(tiny("llama"), cfg, calibration_data=calib_ids).calibration_records
    up0, up1 = recs["model.layers.0.mlp.up_proj"]["input"], recs["model.layers.1.mlp.up_proj"]["input"]
    assert up0["clip"] == pytest.approx(0.25 * up0["absmax"])
    assert up1["clip"] == pytest.approx(up1["absmax"])


def test_nan_activation_names_the_layer_input(fresh_tiny, calib_ids):
    model = fresh_tiny("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[9, 0] = float("nan")
    clean = calib_ids.clone()
    clean[clean == 9] = 10
    # guard="off": row 2 would otherwise be held back from calibration for the accuracy guard.
    cfg = sq.QuantConfig(group_size=32, guard="off")
    sq.compile(model, cfg, calibration_data=clean)  # token 9 unused: fine
    poisoned = clean.clone()
    poisoned[2, 5] = 9
    with pytest.raises(QuantizationError) as info:
        sq.compile(model, cfg, calibration_data=poisoned)
    msg = str(info.value)
    assert "input of model.layers.0.self_attn.q_proj" in msg
    assert "NaN" in msg and "batch 2" in msg
    assert any("'calibrate'" in note for note in info.value.__notes__)


@pytest.mark.parametrize("data", [[], (), torch.empty(0, 8, dtype=torch.long)])
def test_empty_calibration_data(tiny, data):
    with pytest.raises(CalibrationDataError, match="empty"):
        sq.compile(tiny("llama"), sq.QuantConfig(group_size=32), calibration_data=data)


def test_calibrate_pass_rejects_empty_batch_list(traced):
    _, graph = traced("llama")
    pm = PassManager(["canonicalize", "annotate", "insert_observers", "calibrate"])
    with pytest.raises(CalibrationDataError, match="empty"):
        pm.run(graph, PassContext(sq.QuantConfig(group_size=32), []))


def test_static_activation_scales_need_data(tiny):
    kw = {"activation_scale": "static_per_tensor"} if hasattr(sq.QuantConfig(), "activation_scale") else {}
    cfg = sq.QuantConfig(weight_dtype="int8", activation_dtype="int8", group_size=None, **kw)
    with pytest.raises(CalibrationDataError, match="calibration data"):
        sq.compile(tiny("llama"), cfg)


def test_float_calibration_tensor_rejected(tiny):
    with pytest.raises(CalibrationDataError, match="integers"):
        sq.compile(tiny("llama"), sq.QuantConfig(), calibration_data=torch.rand(2, 8))


def test_range_only_records_observe_a_few_batches_static_scales_all(fresh_tiny):
    from sagequant.passes.calibrate import RANGE_ONLY_BATCHES
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, 128, (RANGE_ONLY_BATCHES + 5, 12), generator=g)
    model = fresh_tiny("llama")
    weight_only = sq.compile(model, sq.QuantConfig(group_size=32, guard="off"), calibration_data=data)
    static = sq.compile(model, sq.QuantConfig(weight_dtype="int8", activation_dtype="int8", group_size=None,
                                              activation_scale="static_per_tensor", guard="off"),
                        calibration_data=data)
    stats = lambda cm: next(h["stats"] for h in cm.pass_history if h["pass"] == "calibrate")
    assert stats(weight_only)["observed_batches"] == RANGE_ONLY_BATCHES
    assert stats(static)["observed_batches"] == len(data)
    for cm, n in ((weight_only, RANGE_ONLY_BATCHES), (static, len(data))):
        assert {r["input"]["num_samples"] for r in cm.calibration_records.values()} == {n}
