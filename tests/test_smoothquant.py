"""calibration/smoothquant.py: scale formula, exact float64 folding, W8A8 error, alpha search."""
import math

import pytest
import torch

from sagequant.calibration.smoothquant import (
    DEFAULT_ALPHA_GRID, SmoothQuantError, apply_smoothing, fold_into_linear_rows, fold_into_norm,
    quantized_output_error, scale_consumer_columns, search_alpha, smoothing_scales)
from sagequant.ir.quant_spec import QuantSpec, fake_quantize

INT8_PT = QuantSpec("int8", "per_tensor")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def outlier_acts(n=512, k=128, factor=50.0, seed=0):
    """Activations with 4 channels `factor` times larger than the rest (LLM.int8()-style)."""
    g = gen(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    x[:, torch.randperm(k, generator=g)[:4]] *= factor
    return x


def rmsnorm(x, w, offset=0.0, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w)


# ----------------------------------------------------------------------------- scales
def test_scales_match_hand_computed_reference():
    act = torch.tensor([4.0, 9.0, 0.0, 2.0, 1e-20])
    w1 = torch.tensor([[1.0, -4.0, 2.0, 0.0, 1.0], [-2.0, 1.0, 0.0, 0.0, 0.5]])
    w2 = torch.tensor([[0.5, 2.0, -3.0, 0.0, -1.0]])
    # per-channel weight max over both consumers: 2, 4, 3, 0, 1
    s = smoothing_scales(act, [w1, w2], alpha=0.5)
    assert s.dtype == torch.float32
    # ch0 sqrt(4)/sqrt(2); ch1 3/2; ch2 act 0 -> 1; ch3 weight 0 -> 1; ch4 1e-10 clamped to 1e-5
    expect = [math.sqrt(2.0), 1.5, 1.0, 1.0, 1e-5]
    torch.testing.assert_close(s, torch.tensor(expect), rtol=1e-6, atol=0)
    s = smoothing_scales(act, [w1, w2], alpha=0.25, min_scale=1e-30)
    expect = [4 ** 0.25 / 2 ** 0.75, 9 ** 0.25 / 4 ** 0.75, 1.0, 1.0, 1e-5 / 1.0]
    torch.testing.assert_close(s, torch.tensor(expect), rtol=1e-6, atol=0)


def test_alpha_limits_equalize_weights_or_activations():
    x = outlier_acts(k=64).float()
    ws = [torch.randn(32, 64, generator=gen(1)) * torch.rand(64, generator=gen(2)) for _ in range(2)]
    act = x.abs().amax(0)
    s0 = smoothing_scales(act, ws, alpha=0.0)
    col_max = torch.stack([scale_consumer_columns(w, s0).abs().amax(0) for w in ws]).amax(0)
    torch.testing.assert_close(col_max, torch.ones(64), rtol=1e-6, atol=0)  # weights flat
    s1 = smoothing_scales(act, ws, alpha=1.0)
    torch.testing.assert_close(s1, act)
    torch.testing.assert_close((x / s1).abs().amax(0), torch.ones(64), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- folding
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_norm_fold_is_exact_in_float64(offset):
    x = outlier_acts(n=16, k=48).reshape(4, 4, 48)
    w = torch.randn(48, generator=gen(3), dtype=torch.float64) * 0.3 + (0.0 if offset else 1.0)
    ws = [torch.randn(o, 48, generator=gen(4 + o), dtype=torch.float64) for o in (32, 16)]
    s = smoothing_scales(x.abs().amax((0, 1)), ws, 0.5).double()
    assert float(s.max() / s.min()) > 5  # a real rewrite, not near identity
    before = [rmsnorm(x, w, offset) @ wi.T for wi in ws]
    w_copy = w.clone()
    new_w = fold_into_norm(w, s, weight_offset=offset)
    new_ws = [scale_consumer_columns(wi, s) for wi in ws]
    assert torch.equal(w, w_copy)  # inputs untouched
    for b, wi in zip(before, new_ws):
        torch.testing.assert_close(rmsnorm(x, new_w, offset) @ wi.T, b, rtol=1e-12, atol=1e-12)
    # The offset matters: folding Gemma's (1 + w) as if it were w is not equivalent.
    if offset:
        wrong = fold_into_norm(w, s)
        assert not torch.allclose(rmsnorm(x, wrong, offset) @ new_ws[0].T, before[0])


def test_linear_rows_fold_through_gated_mlp_is_exact():
    """up_proj (with bias) -> mul(silu(gate), up) -> down_proj: divide up's rows by s."""
    g = gen(7)
    x = torch.randn(10, 24, generator=g, dtype=torch.float64)
    gate, up = (torch.randn(40, 24, generator=g, dtype=torch.float64) for _ in range(2))
    b_up = torch.randn(40, generator=g, dtype=torch.float64)
    down = torch.randn(24, 40, generator=g, dtype=torch.float64)

    def mlp(up_w, up_b, down_w):
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up_w.T + up_b)) @ down_w.T

    s = torch.rand(40, generator=g, dtype=torch.float64) * 10 + 0.05
    new_up, new_b = fold_into_linear_rows(up, b_up, s)
    new_down = scale_consumer_columns(down, s)
    torch.testing.assert_close(mlp(new_up, new_b, new_down), mlp(up, b_up, down), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(mlp(new_up, b_up, new_down), mlp(up, b_up, down))  # bias must fold


def test_apply_smoothing_matches_fold_functions_and_keeps_dtype():
    w = torch.randn(16, generator=gen(8)).to(torch.bfloat16)
    ws = [torch.randn(8, 16, generator=gen(9)).to(torch.bfloat16)]
    s = torch.rand(16, generator=gen(10)) + 0.5
    prod, cons = apply_smoothing(w, None, ws, s, weight_offset=1.0)
    assert prod.dtype == cons[0].dtype == torch.bfloat16
    assert torch.equal(prod, fold_into_norm(w, s, 1.0))
    assert torch.equal(cons[0], scale_consumer_columns(ws[0], s))
    prev = torch.randn(16, 8, generator=gen(11))
    (pw, pb), _ = apply_smoothing(None, prev, ws, s, prev_bias=torch.ones(16))
    torch.testing.assert_close(pw, prev / s[:, None])
    torch.testing.assert_close(pb, 1 / s)


# ----------------------------------------------------------------------------- quantization error
def test_smoothing_cuts_w8a8_per_tensor_error():
    x = outlier_acts(n=512, k=256, factor=50.0, seed=12).float()
    ws = [torch.randn(128, 256, generator=gen(13))]
    plain = quantized_output_error(x, ws, torch.ones(256), INT8_PT, INT8_PT)
    s = smoothing_scales(x.abs().amax(0), ws, 0.5)
    smoothed = quantized_output_error(x, ws, s, INT8_PT, INT8_PT)
    # measured ~20x; without smoothing the 4 outlier channels eat the per-tensor int8 range
    assert smoothed * 8 < plain, (plain, smoothed)


def test_output_error_matches_direct_formula():
    x = outlier_acts(n=64, k=32, seed=14).float()
    ws = [torch.randn(16, 32, generator=gen(15)), torch.randn(8, 32, generator=gen(16))]
    s = smoothing_scales(x.abs().amax(0), ws, 0.6)
    xq = fake_quantize(x / s, INT8_PT).double()
    expect = sum(float((x.double() @ w.double().T - xq @ fake_quantize(w * s, INT8_PT).double().T)
                       .pow(2).sum()) for w in ws)
    assert quantized_output_error(x, ws, s, INT8_PT, INT8_PT) == pytest.approx(expect, rel=1e-4)


def test_search_alpha_picks_grid_minimum():
    x = outlier_acts(n=256, k=128, factor=50.0, seed=17).float()
    ws = [torch.randn(64, 128, generator=gen(18)), torch.randn(32, 128, generator=gen(19))]
    w_spec = QuantSpec("int8", "per_channel")
    best, losses = search_alpha(x, ws, INT8_PT, w_spec)
    assert tuple(losses) == DEFAULT_ALPHA_GRID
    assert DEFAULT_ALPHA_GRID[0] == 0.3 and DEFAULT_ALPHA_GRID[-1] == 0.8
    assert all(losses[best] <= v for v in losses.values())
    s = smoothing_scales(x.abs().amax(0), ws, best)
    assert losses[best] == pytest.approx(quantized_output_error(x, ws, s, INT8_PT, w_spec), rel=1e-9)
    assert len(set(losses.values())) > 1  # alpha actually changes the loss
    best2, losses2 = search_alpha(x, ws, INT8_PT, w_spec, grid=(0.0, best, 1.0))
    assert losses2[best2] <= losses2[best] and set(losses2) == {0.0, best, 1.0}


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(SmoothQuantError, match="alpha"):
        smoothing_scales(torch.ones(4), [torch.ones(2, 4)], alpha)


def test_bad_statistics_and_shapes():
    w = torch.ones(2, 4)
    with pytest.raises(SmoothQuantError, match="act_absmax contains 1 NaN"):
        smoothing_scales(torch.tensor([1.0, float("nan"), 1.0, 1.0]), [w])
    with pytest.raises(SmoothQuantError, match="consumer weight 1 contains 0 NaN and 1 Inf"):
        smoothing_scales(torch.ones(4), [w, torch.tensor([[1.0, 1.0, float("inf"), 1.0]])])
    with pytest.raises(SmoothQuantError, match=r"consumer weight 1 has shape \(2, 5\).*\[out, 4\]"):
        smoothing_scales(torch.ones(4), [w, torch.ones(2, 5)])
    with pytest.raises(SmoothQuantError, match="empty list"):
        smoothing_scales(torch.ones(4), [])
    with pytest.raises(SmoothQuantError, match=r"norm weight \(3,\)"):
        fold_into_norm(torch.ones(3), torch.ones(4))
    with pytest.raises(SmoothQuantError, match="must be > 0"):
        scale_consumer_columns(w, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    with pytest.raises(SmoothQuantError, match=r"producer bias has shape \(3,\)"):
        fold_into_linear_rows(torch.ones(4, 2), torch.ones(3), torch.ones(4))
    with pytest.raises(SmoothQuantError, match="exactly one producer"):
        apply_smoothing(torch.ones(4), torch.ones(4, 2), [w], torch.ones(4))
    with pytest.raises(SmoothQuantError, match="act_absmax has shape"):
        search_alpha(torch.ones(8, 4), [w], INT8_PT, INT8_PT, act_absmax=torch.ones(5))
