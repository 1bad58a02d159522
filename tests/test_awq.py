"""calibration/awq.py: scale search beats RTN on salient channels, exact folding, clip search."""
import math

import pytest
import torch

from sagequant.calibration import awq
from sagequant.calibration.awq import (
    AWQError, awq_candidate_scales, awq_search_clip, awq_search_scales, fold_into_norm,
    scale_consumer_columns)
from sagequant.ir.quant_spec import QuantSpec, block_lengths, fake_quantize

G32 = QuantSpec("int4", "per_group", 32)
G128 = QuantSpec("int4", "per_group", 128)
G128_ASYM = QuantSpec("uint4", "per_group", 128, symmetric=False)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def salient_inputs(n=256, k=256, n_salient=4, factor=30.0, seed=0):
    """Gaussian activations whose few salient channels have `factor` times the mean |x|."""
    g = gen(seed)
    x = torch.randn(n, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:n_salient]] *= factor
    return x


def random_weights(k=256, outs=(128, 64), seed=1):
    g = gen(seed)
    return [torch.randn(o, k, generator=g) for o in outs]


def direct_loss(x, ws, s, spec):
    """Σ_i ||x W_iᵀ - (x / s) Q(W_i · s)ᵀ||² / numel, written out in float64."""
    x64, s64 = x.double(), s.double()
    err = sum(float((x64 @ w.double().T - (x64 / s64) @ fake_quantize(w * s, spec).double().T)
                    .pow(2).sum()) for w in ws)
    return err / (x.shape[0] * sum(w.shape[0] for w in ws))


# ----------------------------------------------------------------------------- scale search
def test_candidate_scales_worked_example():
    torch.testing.assert_close(awq_candidate_scales(torch.tensor([4.0, 1.0]), 0.5),
                               torch.tensor([math.sqrt(2), 1 / math.sqrt(2)]))
    assert torch.equal(awq_candidate_scales(torch.tensor([4.0, 0.0, 7.0]), 0.0), torch.ones(3))
    # mean 0 is clamped to 1e-4 before the power: finite, positive; (14.14, 0.0707) snapped to the
    # nearest 2^(k/32): log2 = (3.82, -3.82) -> k = (122, -122)
    s = awq_candidate_scales(torch.tensor([4.0, 0.0]), 0.5)
    assert torch.equal(s, torch.tensor([2.0 ** (122 / 32), 2.0 ** (-122 / 32)]))


def test_candidate_scales_do_not_carry_float_noise():
    """Statistics 1e-6 apart (another device or thread count) give bit-identical scales, so the
    roundings of W·s and every later choice stay the same; unsnapped they differ."""
    gen = torch.Generator().manual_seed(3)
    mean = torch.rand(4096, generator=gen) * 10
    noisy = mean * (1 + 1e-6 * torch.randn(4096, generator=gen))
    for ratio in (0.25, 0.5, 0.95):
        assert torch.equal(awq_candidate_scales(mean, ratio), awq_candidate_scales(noisy, ratio))
        raw = mean.double().pow(ratio)
        raw_noisy = noisy.double().pow(ratio)
        assert not torch.equal((raw / (raw.max() * raw.min()).sqrt()).float(),
                               (raw_noisy / (raw_noisy.max() * raw_noisy.min()).sqrt()).float())
    steps = torch.log2(awq_candidate_scales(mean, 0.5).double()) * 32
    assert float((steps - steps.round()).abs().max()) < 1e-5  # on the grid, up to float32's rounding


@pytest.mark.parametrize("spec", [G32, G128, G128_ASYM], ids=lambda s: s.describe())
def test_search_beats_rtn_on_salient_channels(spec):
    x, ws = salient_inputs(), random_weights()
    r = awq_search_scales(x, ws, spec)
    assert len(r.losses) == 20 and r.losses[0] == r.rtn_loss
    assert r.loss == min(r.losses) and r.ratio > 0
    # measured: int4 g32 1.78x, g128 2.03x, uint4 g128 3.67x lower output MSE than RTN (int4's
    # full-range 7.5 scale makes RTN itself better than the asymmetric case)
    assert r.loss * 1.6 < r.rtn_loss, (r.rtn_loss, r.loss)
    rtn = sum(float((x.double() @ (w - fake_quantize(w, spec)).double().T).pow(2).sum()) for w in ws)
    assert r.rtn_loss == pytest.approx(rtn / (256 * 192), rel=1e-5)  # independent RTN reference
    assert r.loss == pytest.approx(direct_loss(x, ws, r.scales, spec), rel=1e-4)
    torch.testing.assert_close(r.scales, awq_candidate_scales(x.abs().mean(0), r.ratio))
    assert r.scales.dtype == torch.float32 and r.scales.shape == (256,)


def test_ratio_zero_is_rtn_when_nothing_is_salient():
    """Uniform activations: every ratio gives s ~ 1, and ties never move off RTN."""
    x, ws = torch.ones(16, 64), random_weights(k=64, outs=(32,))
    r = awq_search_scales(x, ws, G32, grid=5)
    assert r.ratio == 0.0 and r.loss == r.rtn_loss and torch.equal(r.scales, torch.ones(64))


def test_given_mean_and_ragged_groups():
    x, ws = salient_inputs(n=64, k=100), random_weights(k=100, outs=(48,))
    r = awq_search_scales(x, ws, G32, grid=10, x_mean_abs=x.abs().mean(0) * 3.0)
    assert r.loss <= r.rtn_loss and len(r.losses) == 10
    assert r.loss == pytest.approx(direct_loss(x, ws, r.scales, G32), rel=1e-4)
    # scaling the statistic by a constant only changes s by a constant after normalisation
    r2 = awq_search_scales(x, ws, G32, grid=10)
    assert r2.ratio == r.ratio


def test_chunked_rows_give_the_same_loss(monkeypatch):
    x, ws = salient_inputs(n=300, k=64), random_weights(k=64, outs=(40, 24))
    whole = awq_search_scales(x, ws, G32, grid=4)
    monkeypatch.setattr(awq, "_CHUNK_ELEMENTS", 64 * 7)  # 7 rows per chunk, ragged last chunk
    chunked = awq_search_scales(x, ws, G32, grid=4)
    assert chunked.losses == pytest.approx(whole.losses, rel=1e-8)
    monkeypatch.undo()
    clip_whole = awq_search_clip(x, ws[0], G32, grid=5)
    monkeypatch.setattr(awq, "_CHUNK_ELEMENTS", 64 * 7)  # one output row per chunk
    clip_chunked = awq_search_clip(x, ws[0], G32, grid=5)
    assert torch.equal(clip_chunked.shrink, clip_whole.shrink)
    assert clip_chunked.loss == pytest.approx(clip_whole.loss, rel=1e-8)


def test_folded_scales_are_exact_in_float64():
    x, ws = salient_inputs(n=32, k=128), random_weights(k=128)
    s = awq_search_scales(x, ws, G32, grid=10).scales.double()
    assert float(s.max() / s.min()) > 2
    x64 = x.double()
    for w in ws:
        w64 = w.double()
        torch.testing.assert_close((x64 / s) @ scale_consumer_columns(w64, s).T, x64 @ w64.T,
                                   rtol=1e-12, atol=1e-12)
    # and through an RMSNorm producer, via the fold function shared with SmoothQuant
    nw = torch.randn(128, generator=gen(5), dtype=torch.float64)
    rms = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close((rms * fold_into_norm(nw, s)) @ scale_consumer_columns(ws[0].double(), s).T,
                               (rms * nw) @ ws[0].double().T, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- clip search
def clip_reference_err(x, w, wq, lengths):
    """[out, n_groups] Σ_tokens (x_g · (w_g - q_g))² in float64 loops."""
    cols = torch.cumsum(torch.tensor([0] + lengths), 0).tolist()
    return torch.stack([(x[:, a:b].double() @ (w[:, a:b] - wq[:, a:b]).double().T).pow(2).sum(0)
                        for a, b in zip(cols[:-1], cols[1:])], dim=1)


@pytest.mark.parametrize("spec,k", [(G32, 100), (G128_ASYM, 256), (QuantSpec("int4", "per_channel"), 64)],
                         ids=["g32-ragged", "uint4-g128", "per_channel"])
def test_clip_search(spec, k):
    x, (w,) = salient_inputs(n=128, k=k, seed=3), random_weights(k=k, outs=(48,), seed=4)
    c = awq_search_clip(x, w, spec, grid=11, max_shrink=0.5)
    lengths = block_lengths(k, spec)
    assert c.shrink.shape == (48, len(lengths)) and c.weight.shape == w.shape
    assert float(c.shrink.min()) >= 0.5 - 1e-6 and float(c.shrink.max()) <= 1.0
    # measured 1.1-1.5x; some group always prefers clipping on Gaussian weights
    assert c.loss < 0.97 * c.rtn_loss and float(c.shrink.min()) < 1.0
    # the returned weight is the clamp at the chosen shrink, and its loss is the reported one
    bound = torch.cat([(p.abs().amax(1, keepdim=True) * c.shrink[:, i:i + 1]).expand_as(p)
                       for i, p in enumerate(torch.split(w, lengths, dim=1))], dim=1)
    torch.testing.assert_close(c.weight, torch.maximum(torch.minimum(w, bound), -bound))
    err = clip_reference_err(x, w, fake_quantize(c.weight, spec), lengths)
    assert c.loss == pytest.approx(float(err.sum()) / (128 * 48), rel=1e-5)
    rtn = clip_reference_err(x, w, fake_quantize(w, spec), lengths)
    assert c.rtn_loss == pytest.approx(float(rtn.sum()) / (128 * 48), rel=1e-5)


def test_clip_choice_is_per_group_argmin():
    x, (w,) = salient_inputs(n=64, k=96, seed=6), random_weights(k=96, outs=(8,), seed=7)
    c = awq_search_clip(x, w, G32, grid=6, max_shrink=0.5)
    cands = torch.linspace(1.0, 0.5, 6)
    errs = []
    for sh in cands:
        b = (w.abs().reshape(8, 3, 32).amax(-1, keepdim=True) * sh).expand(8, 3, 32).reshape(8, 96)
        errs.append(clip_reference_err(x, w, fake_quantize(torch.maximum(torch.minimum(w, b), -b), G32),
                                       [32] * 3))
    errs = torch.stack(errs)  # [cands, out, groups]
    best = errs.min(0).values
    chosen = errs.gather(0, (cands[:, None, None] == c.shrink[None]).float().argmax(0, keepdim=True))[0]
    torch.testing.assert_close(chosen, best, rtol=1e-5, atol=1e-9)


def test_clip_grid_one_and_sampling():
    x, (w,) = salient_inputs(n=1000, k=64, seed=8), random_weights(k=64, outs=(16,), seed=9)
    c = awq_search_clip(x, w, G32, grid=1)
    assert torch.equal(c.shrink, torch.ones(16, 2)) and c.loss == c.rtn_loss and torch.equal(c.weight, w)
    c = awq_search_clip(x, w.to(torch.bfloat16), G32, n_sample_tokens=100)
    assert c.weight.dtype == torch.bfloat16 and c.loss <= c.rtn_loss


# ----------------------------------------------------------------------------- errors
def test_errors():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    with pytest.raises(AWQError, match=r"consumer weight 1 has shape \(4, 12\)"):
        awq_search_scales(x, [w, torch.randn(4, 12)], G32)
    with pytest.raises(AWQError, match="empty list"):
        awq_search_scales(x, [], G32)
    with pytest.raises(AWQError, match="input x contains 8 NaN"):
        awq_search_scales(torch.where(torch.arange(16) == 3, float("nan"), x), [w], G32)
    with pytest.raises(AWQError, match="grid=0"):
        awq_search_scales(x, [w], G32, grid=0)
    with pytest.raises(AWQError, match=r"x_mean_abs has shape \(15,\)"):
        awq_search_scales(x, [w], G32, x_mean_abs=torch.ones(15))
    with pytest.raises(AWQError, match="per_group or per_channel.*per_tensor"):
        awq_search_clip(x, w, QuantSpec("int4", "per_tensor"))
    with pytest.raises(AWQError, match="max_shrink=1.0"):
        awq_search_clip(x, w, G32, max_shrink=1.0)


def test_duo_scaling_searches_both_families_and_is_never_worse():
    from sagequant.calibration.awq import group_normalised_weight_mean
    x, ws = salient_inputs(), random_weights()
    plain = awq_search_scales(x, ws, G128)
    both = awq_search_scales(x, ws, G128, duo=True)
    assert len(both.losses) == 40 and both.losses[:20] == pytest.approx(plain.losses, rel=1e-12)
    assert both.loss <= plain.loss and both.loss == min(both.losses)
    w_mean = group_normalised_weight_mean(ws, G128)
    assert w_mean.shape == (256,) and bool((w_mean > 0).all()) and bool((w_mean <= 1).all())
    # the duo family at ratio r, worked by hand in float64
    r = 0.35
    s = x.abs().mean(0).double().clamp(min=1e-4).pow(r) / (w_mean.double().pow(1 - r) + 1e-4)
    s = s / (s.max() * s.min()).sqrt()
    assert torch.equal(awq_candidate_scales(x.abs().mean(0), r, w_mean),
                       torch.exp2(torch.round(torch.log2(s) * 32) / 32).float())
    if both.duo:
        assert both.loss == pytest.approx(direct_loss(x, ws, both.scales, G128), rel=1e-4)
