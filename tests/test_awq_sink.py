"""QuantConfig.awq_sink_weight: each calibration sequence's first position (the attention sink) is
kept apart from AWQ's sampled rows, all of them, and counts as N positions in the scale and clip
search losses (whole-model pass and layer-wise; test_layerwise checks block 0 of both agree).
QuantConfig.awq_scale_loss="module": the gate/up scale search measures the MLP's output, q/k/v's
o_proj's (the attention run on whole sequences)."""
import importlib

import pytest
import torch

import sagequant as sq
from sagequant.calibration.awq import (
    AWQError, OutputModule, awq_candidate_scales, awq_search_clip, awq_search_scales)
from sagequant.config import ConfigError
from sagequant.ir.quant_spec import QuantSpec, fake_quantize

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


def test_the_pass_keeps_each_first_position_apart_weighted(tiny, helpers, monkeypatch):
    model = tiny("llama")
    plain = sq.compile(model, sq.QuantConfig(**AWQ_CFG), calibration_data=CAL, stop_after="awq")
    seen = _record_searches(monkeypatch)
    weighted = sq.compile(model, sq.QuantConfig(**AWQ_CFG, awq_sink_weight=50, awq_search_rows=64),
                          calibration_data=CAL, stop_after="awq")
    a, b = _weights(plain), _weights(weighted)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    x = helpers.float_inputs(model, model.model.layers[0].self_attn.q_proj, CAL)   # [8, 24, hidden]
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


# ----------------------------------------------------------------- awq_scale_loss="module"
def test_module_loss_is_the_modules_output_error():
    x, sink, ws = _data(2)
    g = torch.Generator().manual_seed(9)
    down = torch.randn(8, 48, generator=g)
    module = OutputModule(lambda outs: torch.nn.functional.silu(outs[0]) @ down.T + outs[1][:, :8], [None, None])
    got = awq_search_scales(x, ws, G32, module=module)
    s = awq_candidate_scales(x.abs().mean(0), got.ratio)

    def out(w0, w1):
        x64 = x.double()
        return torch.nn.functional.silu(x64 @ w0.double().T) @ down.double().T + (x64 @ w1.double().T)[:, :8]
    want = out(*ws) - out(*(fake_quantize(w * s, G32) / s for w in ws))
    assert got.loss == pytest.approx(float(want.pow(2).sum()) / (x.shape[0] * 8), rel=1e-4)
    # a module that is the linears' outputs side by side gives the per-linear loss
    concat = awq_search_scales(x, ws, G32, module=OutputModule(lambda outs: torch.cat(outs, 1), [None, None]))
    torch.testing.assert_close(torch.tensor(concat.losses), torch.tensor(awq_search_scales(x, ws, G32).losses),
                               rtol=1e-4, atol=0)
    # sink rows: their module error counts sink_weight times
    weighted = awq_search_scales(x, ws, G32, module=module, sink_rows=sink, sink_weight=3.0)
    repeated = awq_search_scales(torch.cat([x, sink, sink, sink]), ws, G32, module=module,
                                 x_mean_abs=x.abs().mean(0))
    torch.testing.assert_close(torch.tensor(weighted.losses), torch.tensor(repeated.losses), rtol=1e-5, atol=0)
    with pytest.raises(AWQError, match="1 biases for 2 linears"):
        awq_search_scales(x, ws, G32, module=OutputModule(module.fn, [None]))


def test_token_wise_module_is_found_for_swiglu_only(tiny):
    from sagequant.ir.patterns import balance_groups, token_wise_module
    cm = sq.compile(tiny("llama"), sq.QuantConfig(**AWQ_CFG), calibration_data=CAL, stop_after="annotate")
    g = cm.graph
    found = {grp.describe(g): token_wise_module(grp) for grp in balance_groups(g)}
    mlp = [m for m in found.values() if m is not None]
    assert len(mlp) == 2                                  # one gate/up group per block; q/k/v, up->down: none
    assert [g.annotation(c).layer for c in mlp[0].consumers] == ["model.layers.0.mlp.gate_proj",
                                                                 "model.layers.0.mlp.up_proj"]
    assert [str(op.target) for op in mlp[0].ops] == ["aten.silu.default", "aten.mul.Tensor"]
    assert g.annotation(mlp[0].output).layer == "model.layers.0.mlp.down_proj"
    gpt2 = sq.compile(tiny("gpt2"), sq.QuantConfig(**AWQ_CFG), calibration_data=CAL, stop_after="annotate").graph
    assert all(token_wise_module(grp) is None for grp in balance_groups(gpt2))   # its MLP reshapes


def test_the_pass_measures_gate_up_at_the_mlp_output(tiny, monkeypatch):
    model = tiny("llama")
    seen, search = [], awq_pass.awq_search_scales

    def recording(x, weights, spec, **kw):   # the module's output as the search sees it (weights float)
        module = kw["module"]
        seen.append(None if module is None else (x, module.fn([x @ w.T for w in weights])))
        return search(x, weights, spec, **kw)
    monkeypatch.setattr(awq_pass, "awq_search_scales", recording)
    cm = sq.compile(model, sq.QuantConfig(**AWQ_CFG, awq_scale_loss="module"), calibration_data=CAL, stop_after="awq")
    assert {h["pass"]: h.get("stats") for h in cm.pass_history}["awq"]["module_loss_groups"] == 2
    assert seen[0] is None                                # block 0's q/k/v: per linear
    rows, got = seen[1]                                   # block 0's gate/up group
    with torch.no_grad():
        want = model.model.layers[0].mlp(rows[None])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"QuantConfig.awq_scale_loss='block' is not supported"):
        sq.QuantConfig(awq_scale_loss="block")


def test_the_pass_measures_qkv_at_o_proj_by_running_the_attention(fresh_tiny, monkeypatch):
    model = fresh_tiny("llama")   # perturbed in place below
    seen, search = [], awq_pass.awq_search_scales

    def recording(x, weights, spec, **kw):   # block 0's q/k/v error, called with perturbed weights
        if kw["output_error"] is not None and not seen:
            q, k, v = weights
            seen.append((kw["output_error"]([q, k, v]), kw["output_error"]([q + DELTA, k, v])))
        return search(x, weights, spec, **kw)
    monkeypatch.setattr(awq_pass, "awq_search_scales", recording)
    attn = model.model.layers[0].self_attn
    DELTA = 0.05 * torch.randn(attn.q_proj.weight.shape, generator=torch.Generator().manual_seed(1))
    cm = sq.compile(model, sq.QuantConfig(**AWQ_CFG, awq_scale_loss="module"), calibration_data=CAL, stop_after="awq")
    assert {h["pass"]: h.get("stats") for h in cm.pass_history}["awq"]["segment_run_loss_groups"] == 2
    unchanged, perturbed = seen[0]
    outs = []
    hook = attn.o_proj.register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad():
        for rows in (CAL, CAL):
            model(input_ids=rows, use_cache=False)
            attn.q_proj.weight += DELTA
        attn.q_proj.weight -= 2 * DELTA
    hook.remove()
    assert unchanged == 0.0
    want = float((outs[1] - outs[0]).double().pow(2).mean())
    assert perturbed == pytest.approx(want, rel=1e-4)


def test_awq_options_are_compile_flags():
    from sagequant.tools.cli import build_parser
    from sagequant.tools.compile_flags import config_from_args
    p = build_parser()
    base = ["compile", "--model", "m", "--dataset", "d", "--output", "o", "--method", "awq"]
    cfg = config_from_args(p.parse_args(base + ["--awq-sink-weight", "50", "--awq-scale-loss", "module"]))
    assert (cfg.awq_sink_weight, cfg.awq_scale_loss) == (50.0, "module")
    cfg = config_from_args(p.parse_args(base))
    assert (cfg.awq_sink_weight, cfg.awq_scale_loss) == (1.0, "linear")
    for bad in (["--awq-sink-weight", "0.5"], ["--awq-sink-weight", "nan"], ["--awq-scale-loss", "block"]):
        with pytest.raises(SystemExit):
            p.parse_args(base + bad)
