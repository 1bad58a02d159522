"""QuantConfig.awq_sink_weight: each calibration sequence's first position (the attention sink) is
kept apart from AWQ's sampled rows, all of them, and counts as N positions in the scale and clip
search losses (whole-model pass and layer-wise; test_layerwise checks block 0 of both agree)."""
import importlib

import pytest
import torch

import sagequant as sq
from sagequant.calibration.awq import AWQError, awq_search_clip, awq_search_scales
from sagequant.config import ConfigError
from sagequant.ir.quant_spec import QuantSpec

LINEAR = torch.ops.aten.linear.default
AWQ_CFG = dict(weight_dtype="int4", group_size=32, calibration="awq", guard="off")
CAL = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(5))
G32 = QuantSpec("int4", "per_group", 32)
awq_pass = importlib.import_module("sagequant.passes.awq")


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 64, generator=g)
    sink = torch.randn(4, 64, generator=g) * 20
    sink[:, :3] *= 10  # the sink's own salient channels, which the plain rows lack
    return x, sink, [torch.randn(48, 64, generator=g), torch.randn(16, 64, generator=g)]


def test_scale_search_counts_each_sink_row_as_weight_rows():
    x, sink, ws = _data()
    got = awq_search_scales(x, ws, G32, sink_rows=sink, sink_weight=3.0)
    want = awq_search_scales(torch.cat([x, sink, sink, sink]), ws, G32, x_mean_abs=x.abs().mean(0))
    torch.testing.assert_close(torch.tensor(got.losses), torch.tensor(want.losses), rtol=1e-5, atol=0)
    assert got.ratio == want.ratio
    plain = awq_search_scales(x, ws, G32)
    assert plain.losses != pytest.approx(got.losses, rel=1e-3)


def test_clip_search_keeps_every_sink_row_and_rescales_the_weight_to_the_sample():
    x, sink, ws = _data(1)
    got = awq_search_clip(x, ws[0], G32, sink_rows=sink, sink_weight=2.0)
    want = awq_search_clip(torch.cat([x, sink, sink]), ws[0], G32)
    torch.testing.assert_close(got.weight, want.weight)
    assert got.loss == pytest.approx(want.loss, rel=1e-6)
    assert not torch.equal(got.shrink, awq_search_clip(x, ws[0], G32).shrink)
    # x sampled down to half its rows: a sink row weighs half as many of the rows that are left
    half = awq_search_clip(x, ws[0], G32, n_sample_tokens=48, sink_rows=sink, sink_weight=2.0)
    sampled = x[torch.linspace(0, 95, 48).round().long()]
    torch.testing.assert_close(half.weight, awq_search_clip(torch.cat([sampled, sink]), ws[0], G32).weight)


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_search_rejects_a_bad_sink_weight(weight):
    x, sink, ws = _data()
    with pytest.raises(AWQError, match="sink_weight"):
        awq_search_scales(x, ws, G32, sink_rows=sink, sink_weight=weight)
    with pytest.raises(AWQError, match="sink rows have 8 channels"):
        awq_search_clip(x, ws[0], G32, sink_rows=sink[:, :8], sink_weight=1.0)


def _record_searches(monkeypatch) -> list:
    """[(x, kwargs)] of every scale search the awq pass runs from now on."""
    seen, search = [], awq_pass.awq_search_scales

    def recording(x, weights, spec, **kw):
        seen.append((x, kw))
        return search(x, weights, spec, **kw)
    monkeypatch.setattr(awq_pass, "awq_search_scales", recording)
    return seen


def _weights(cm) -> dict:
    g = cm.graph
    return {g.annotation(n).layer: g.attr(n.args[1]).detach().clone()
            for n in g.nodes(LINEAR) if g.annotation(n) is not None and g.annotation(n).quantized}


def test_the_pass_keeps_each_first_position_apart_weighted(tiny, monkeypatch):
    model = tiny("llama")
    plain = sq.compile(model, sq.QuantConfig(**AWQ_CFG), calibration_data=CAL, stop_after="awq")
    seen = _record_searches(monkeypatch)
    weighted = sq.compile(model, sq.QuantConfig(**AWQ_CFG, awq_sink_weight=50, awq_search_rows=64),
                          calibration_data=CAL, stop_after="awq")
    a, b = _weights(plain), _weights(weighted)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    inputs = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    with torch.no_grad():
        for row in CAL:
            model(input_ids=row[None], use_cache=False)
    hook.remove()
    x = torch.cat(inputs)                                # [8, 24, hidden]
    rows, kw = seen[0]                                   # block 0's q/k/v group, first in graph order
    torch.testing.assert_close(kw["sink_rows"], x[:, 0], rtol=1e-5, atol=1e-6)
    past = x[:, 1:].reshape(-1, x.shape[-1])
    assert rows.shape[0] == 64                           # 8 rows from each sequence's 23 past the sink
    assert all(bool((past - r).abs().amax(1).min() < 1e-5) for r in rows)
    assert kw["sink_weight"] == pytest.approx(50 * 64 / past.shape[0])


def test_a_flattened_input_keeps_its_sequences_first_rows(tiny, monkeypatch):
    """GPT-2 views [batch, seq, C] as [-1, C] before c_attn: the sink is still each sequence's first row."""
    model, seen = tiny("gpt2"), _record_searches(monkeypatch)
    sq.compile(model, sq.QuantConfig(**AWQ_CFG, awq_sink_weight=8), calibration_data=CAL, stop_after="awq")
    outs = []
    hook = model.transformer.h[0].ln_1.register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad():
        for row in CAL:
            model(input_ids=row[None], use_cache=False)
    hook.remove()
    torch.testing.assert_close(seen[0][1]["sink_rows"], torch.cat(outs)[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0.5, 0, -1.0, float("nan"), float("inf"), True, "50"])
def test_config_rejects_bad_weights(bad):
    with pytest.raises(ConfigError, match=r"QuantConfig.awq_sink_weight=.* a finite number >= 1"):
        sq.QuantConfig(awq_sink_weight=bad)


def test_config_rejects_weighting_a_sink_that_sink_tokens_removes():
    with pytest.raises(ConfigError, match=r"awq_sink_weight=50.0 cannot weight the sink position"):
        sq.QuantConfig(calibration="awq", awq_sink_weight=50, sink_tokens=1)
    cfg = sq.QuantConfig(calibration="awq", awq_sink_weight=20)
    assert sq.QuantConfig.from_dict(cfg.to_dict()).awq_sink_weight == 20.0
