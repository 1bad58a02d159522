"""Observers beyond minmax/percentile: moving average, MSE-optimal clip, entropy (histogram)
calibration — each checked against a direct float64 computation on the same data."""
import numpy as np
import pytest
import torch

import sagequant as sq
from sagequant.calibration.observers import (EntropyHistogramObserver, MovingAverageMinMaxObserver,
                                             MSEObserver, _AbsHistogram, observer_for)
from sagequant.config import ConfigError
from sagequant.ir.formats import FORMATS, QuantizationError


def _heavy_tailed_batches(seed=0, n=3):
    torch.manual_seed(seed)
    return [torch.distributions.StudentT(3.0).sample((8, 4096)) for _ in range(n)]


def _fq_mse(x: np.ndarray, clip: float, fmt) -> float:
    """float64 mean squared error of symmetric quantize-dequantize with range `clip`."""
    scale = clip / fmt.qmax
    if fmt.kind == "int":
        deq = np.clip(np.round(x / scale), fmt.qmin, fmt.qmax) * scale
    else:
        t = torch.from_numpy(np.clip(x / scale, -fmt.qmax, fmt.qmax))
        deq = t.to(fmt.storage_dtype).double().numpy() * scale
    return float(np.mean((deq - x) ** 2))


def test_moving_average_is_an_ema_of_batch_ranges():
    obs = MovingAverageMinMaxObserver("x")
    for lo, hi in [(-1.0, 2.0), (-3.0, 10.0), (-2.0, 4.0)]:
        obs(torch.tensor([lo, 0.0, hi]))
    c = obs.averaging_constant
    hi = 2.0 + c * (10.0 - 2.0)
    hi = hi + c * (4.0 - hi)
    lo = -1.0 + c * (-3.0 + 1.0)
    lo = lo + c * (-2.0 - lo)
    rec = obs.record("input", 1.0)
    assert rec.clip == pytest.approx(max(abs(lo), hi)) and rec.observer == "moving_average"
    assert (rec.min, rec.max) == (-3.0, 10.0)  # the true extremes are still recorded


def test_histogram_rebins_without_losing_counts():
    h = _AbsHistogram(64)
    h.add(torch.linspace(0, 1, 1000))
    h.add(torch.linspace(0, 5, 300))
    assert h.upper == 5.0 and h.counts.sum() == pytest.approx(1300)
    # Everything from the first batch now sits in the first 1/5 of the range.
    assert h.counts[: 64 // 5 + 1].sum() >= 1000


@pytest.mark.parametrize("fmt_name", ["int8", "fp8_e4m3"])
def test_mse_clip_is_near_the_best_clip_of_the_data(fmt_name):
    fmt = FORMATS[fmt_name]
    batches = _heavy_tailed_batches()
    obs = MSEObserver("x", fmt)
    for b in batches:
        obs(b)
    clip = obs.record("input", 1.0).clip
    x = torch.cat([b.flatten() for b in batches]).double().numpy()
    absmax = float(np.abs(x).max())
    grid = np.linspace(absmax / 400, absmax, 400)
    errs = np.array([_fq_mse(x, c, fmt) for c in grid])
    assert _fq_mse(x, clip, fmt) <= errs.min() * 1.05
    if fmt.kind == "int":  # a heavy tail should not set int8's range
        assert clip < 0.9 * absmax and _fq_mse(x, clip, fmt) < 0.9 * _fq_mse(x, absmax, fmt)


def test_entropy_clip_cuts_outliers_and_keeps_the_bulk():
    fmt = FORMATS["int8"]
    obs = EntropyHistogramObserver("x", fmt)
    torch.manual_seed(1)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    x[:3] = torch.tensor([80.0, -75.0, 70.0])
    obs(x)
    clip = obs.record("input", 1.0).clip
    bulk = float(np.percentile(np.abs(x.numpy()), 99.9))
    # KL keeps the shape of the bulk and gives up the three outliers (which MSE would keep).
    assert bulk < clip < 40.0


def test_format_aware_observers_refuse_what_they_cannot_do():
    with pytest.raises(QuantizationError, match="integer activation formats.*fp8_e4m3"):
        EntropyHistogramObserver("x", FORMATS["fp8_e4m3"])
    with pytest.raises(QuantizationError, match="not quantized"):
        observer_for("mse", "input of layer", None)
    with pytest.raises(QuantizationError, match="unknown observer 'kl'"):
        observer_for("kl", "x")


def test_observer_config_validation():
    assert sq.QuantConfig().observer_kind == "minmax"
    assert sq.QuantConfig(calibration="percentile").observer_kind == "percentile"
    cfg = sq.QuantConfig(weight_dtype="int8", activation_dtype="int8", observer="entropy")
    assert cfg.observer == "histogram"
    with pytest.raises(ConfigError, match="activation_dtype='a16' keeps them 16-bit"):
        sq.QuantConfig(observer="mse")
    with pytest.raises(ConfigError, match="for int8 activations, not fp8"):
        sq.QuantConfig(weight_dtype="fp8", activation_dtype="fp8", observer="histogram")
    with pytest.raises(ConfigError, match="contradicts QuantConfig.calibration='percentile'"):
        sq.QuantConfig(calibration="percentile", observer="minmax")
    with pytest.raises(ConfigError, match="observer"):
        sq.QuantConfig(observer="median")


@pytest.mark.parametrize("observer", ["mse", "histogram", "moving_average"])
def test_static_activation_scales_come_from_the_chosen_observer(observer, fresh_tiny, calib_ids):
    model = fresh_tiny("llama")
    cfg = sq.QuantConfig(weight_dtype="int8", activation_dtype="int8", group_size=None,
                         activation_scale="static_per_tensor", observer=observer)
    cm = sq.compile(model, cfg, calibration_data=calib_ids)
    recs = cm.calibration_records
    assert recs and all(r["input"]["observer"] == observer for r in recs.values())
    for r in recs.values():
        rec = r["input"]
        assert 0 < rec["clip"] <= rec["absmax"] * (1 + 1e-6)
        assert rec["scale"] == pytest.approx(rec["clip"] / 127, rel=1e-6)
    ref = model(calib_ids).logits
    assert torch.isfinite(cm(calib_ids)).all()
    rel = (cm(calib_ids) - ref).norm() / ref.norm()
    assert rel < 0.1
