"""QuantConfig.gptq_sink_weight: each calibration sequence's first position (the attention sink)
weighs as N rows in the GPTQ Hessians of the linears that read the attention input (q/k/v, found
back from scaled_dot_product_attention), and nowhere else; "attention" weighs every row there by
the attention mass its position receives."""
import math

import pytest
import torch

import sagequant as sq
from sagequant.calibration.gptq import GPTQError, HessianAccumulator, attention_mass, gptq_quantize
from sagequant.config import ConfigError
from sagequant.ir.patterns import AttentionInputError, attention_input_linears
from sagequant.ir.quant_spec import QuantSpec, dequantize, quantize, weight_qparams

LINEAR = torch.ops.aten.linear.default
GPTQ_CFG = dict(weight_dtype="int4", group_size=32, calibration="gptq", guard="off")
# 8 sequences of 24: more rows (192) than the widest linear input (96), as GPTQ requires
CAL = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(5))


def _weighted_reference(x: torch.Tensor, weight: float) -> torch.Tensor:
    """2/n Σ c_t x_t x_tᵀ in float64, c_t = weight at position 0 of dim -2, else 1; n = rows."""
    c = torch.ones(x.shape[:-1], dtype=torch.float64)
    c[..., 0] = weight
    rows, c = x.reshape(-1, x.shape[-1]).double(), c.reshape(-1)
    return 2.0 / rows.shape[0] * (rows * c[:, None]).T @ rows


def test_sink_weight_equals_its_float64_formula():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, 16, generator=g) * 5
    acc = HessianAccumulator(16, sink_weight=50.0)
    acc.add(x[:2])                          # [batch, seq, features]
    acc.add(x[2:].reshape(1, 1, 20, 16))    # 4-D: the sequence is still dim -2
    assert acc.n == 60
    torch.testing.assert_close(acc.hessian, _weighted_reference(x, 50.0), rtol=1e-12, atol=1e-9)
    plain = HessianAccumulator(16)
    plain.add(x)
    assert not torch.allclose(plain.hessian, acc.hessian)
    torch.testing.assert_close(plain.hessian, _weighted_reference(x, 1.0), rtol=1e-12, atol=1e-9)


def test_sink_weight_needs_a_sequence_dim_and_a_valid_weight():
    acc = HessianAccumulator(8, what="input of layers.0.q_proj", sink_weight=20.0)
    with pytest.raises(GPTQError, match=r"layers\.0\.q_proj: sink_weight=20.0 needs .*\[batch, seq"):
        acc.add(torch.ones(4, 8))
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(GPTQError, match="sink_weight=.* must be a finite number >= 1"):
            HessianAccumulator(8, sink_weight=bad)


def test_row_weights_equal_their_float64_formula_and_are_checked():
    g = torch.Generator().manual_seed(4)
    x, m = torch.randn(2, 12, 8, generator=g), torch.rand(2, 12, generator=g) * 3
    acc = HessianAccumulator(8, what="input of q_proj", sink_weight=5.0)   # both weights multiply
    acc.add(x, m)
    c = m.double().clone()
    c[:, 0] *= 5.0
    rows = x.reshape(-1, 8).double()
    want = 2.0 / rows.shape[0] * (rows * c.reshape(-1, 1)).T @ rows
    torch.testing.assert_close(acc.hessian, want, rtol=1e-12, atol=1e-12)
    for bad in (torch.ones(2, 11), -m, m * float("nan")):
        with pytest.raises(GPTQError, match=r"q_proj: row weights of shape .* finite and >= 0"):
            acc.add(x, bad)


def _mass_reference(q, k, mask):
    """Column sums of softmax(q kᵀ / sqrt(d) + mask) per head, averaged over heads, by loops."""
    b, h, s, d = q.shape
    out = torch.zeros(b, k.shape[2], dtype=torch.float64)
    for i in range(b):
        for head in range(h):
            kh = k[i, head * k.shape[1] // h].double()
            logits = q[i, head].double() @ kh.T / math.sqrt(d) + mask
            out[i] += torch.softmax(logits, -1).sum(0) / h
    return out


def test_attention_mass_equals_its_float64_formula():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 4, 10, 8, generator=g), torch.randn(2, 2, 10, 8, generator=g)  # 2 kv heads
    causal = torch.full((10, 10), float("-inf")).triu(1).double()
    want = _mass_reference(q, k, causal)
    torch.testing.assert_close(attention_mass(q, k, is_causal=True), want, rtol=1e-12, atol=1e-12)
    allowed = torch.ones(10, 10, dtype=torch.bool).tril()
    torch.testing.assert_close(attention_mass(q, k, allowed[None, None]), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention_mass(q, k, causal.float()), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(want.sum(-1), torch.full((2,), 10.0, dtype=torch.float64))  # mean 1 a key
    assert bool((want[:, 0] > want[:, 1:].max(-1).values).all())  # causal: the first key gets the most


def _sink_layer(seed: int = 0, batch: int = 8, seq: int = 128, features: int = 128, out: int = 64):
    """Ordinary rows with most variance in half of a random basis; each sequence's first row is one
    fixed vector of 0.3 x their norm in the other, low-variance half: an ordinary-looking row that
    the unweighted Hessian sees as 1 row in `seq`, in directions GPTQ pushes its error into."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=g))
    sd = torch.cat([torch.ones(features // 2), torch.full((features - features // 2,), 0.3)])
    x = (torch.randn(batch, seq, features, generator=g) * sd) @ basis.T
    sink = basis[:, features // 2:] @ torch.randn(features - features // 2, generator=g)
    x[:, 0] = sink / sink.norm() * x[:, 1:].norm(dim=-1).mean() * 0.3
    return torch.randn(out, features, generator=g) * 0.05, x


def test_weighted_gptq_keeps_the_sink_row_that_plain_gptq_loses_to_rtn():
    w, x = _sink_layer()
    spec = QuantSpec("int4", "per_group", 32)
    scale, zero = weight_qparams(w, spec)
    rtn = dequantize(quantize(w, spec, scale, zero))

    def errors(q):  # squared output error of the sink row, mean of the ordinary rows
        d = (w - q).double()
        rest = x[:, 1:].reshape(-1, x.shape[-1]).double()
        return float((d @ x[0, 0].double()).pow(2).sum()), float((rest @ d.T).pow(2).sum() / rest.shape[0])

    base_sink, base_rest = errors(rtn)
    got = {}
    for weight in (1.0, 50.0):
        acc = HessianAccumulator(x.shape[-1], sink_weight=weight)
        acc.add(x)
        got[weight] = errors(gptq_quantize(w, acc.hessian, spec).dequantized)
    assert got[1.0][0] > 1.3 * base_sink, (got, base_sink)     # plain GPTQ loses to RTN on the sink
    assert got[50.0][0] < 0.5 * base_sink, (got, base_sink)    # weighted, it does not
    assert got[50.0][1] < 0.7 * base_rest                       # and still beats RTN on the rest
    assert got[50.0][1] < 1.1 * got[1.0][1]


def _layer_names(graph, nodes):
    return [graph.annotation(n).layer for n in nodes]


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_attention_input_linears_are_exactly_the_qkv_projections(tiny, arch):
    model = tiny(arch)
    cm = sq.compile(model, sq.QuantConfig(**GPTQ_CFG), calibration_data=torch.randint(0, 128, (1, 8)),
                    stop_after="annotate")
    names = _layer_names(cm.graph, attention_input_linears(cm.graph))
    layers = range(model.config.num_hidden_layers)
    if arch == "gpt2":  # one fused c_attn per block
        assert names == [f"transformer.h.{i}.attn.c_attn" for i in layers]
    else:
        assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in layers for p in "qkv"]


def test_attention_input_linears_fail_loudly_without_attention():
    from torch.fx import Graph, GraphModule
    from sagequant.ir.graph import QuantGraph
    g = Graph()
    g.output(g.placeholder("x"))
    with pytest.raises(AttentionInputError, match="no aten.scaled_dot_product_attention"):
        attention_input_linears(QuantGraph(GraphModule(torch.nn.Module(), g)))


def _weights(cm) -> dict:
    g = cm.graph
    return {g.annotation(n).layer: g.attr(n.args[1]).detach().clone()
            for n in g.nodes(LINEAR) if g.annotation(n) is not None and g.annotation(n).quantized}


def _record_hessians(monkeypatch) -> dict:
    """{layer: the Hessian GPTQ rounds it with}, filled by the gptq pass from now on."""
    import sagequant.passes.gptq as gptq_pass
    seen, quantize_linears = {}, gptq_pass.quantize_linears

    def recording(graph, nodes, acc, cfg, stats):
        seen.update((graph.annotation(n).layer, acc.hessian) for n in nodes)
        quantize_linears(graph, nodes, acc, cfg, stats)
    monkeypatch.setattr(gptq_pass, "quantize_linears", recording)
    return seen


def test_the_weight_reaches_exactly_the_qkv_hessians(tiny, helpers):
    model = tiny("llama")
    plain, weighted = (sq.compile(model, sq.QuantConfig(**GPTQ_CFG, gptq_sink_weight=w), calibration_data=CAL,
                                  stop_after="gptq") for w in (1.0, 50.0))
    stats = {h["pass"]: h.get("stats") for h in weighted.pass_history}["gptq"]
    assert stats["sink_weighted_layers"] == 3 * model.config.num_hidden_layers
    a, b = _weights(plain), _weights(weighted)
    block0 = "model.layers.0."
    # One observation run per block: block 0's o/gate/up/down see the same float inputs either way.
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert torch.equal(a[block0 + name], b[block0 + name]), name
    for p in "qkv":
        assert not torch.equal(a[f"{block0}self_attn.{p}_proj"], b[f"{block0}self_attn.{p}_proj"]), p
    # Block 0's q_proj is GPTQ on the float64 formula's Hessian of its float input.
    h = _weighted_reference(helpers.float_inputs(model, model.model.layers[0].self_attn.q_proj, CAL), 50.0)
    spec = weighted.graph.annotation(next(n for n in weighted.graph.nodes(LINEAR) if weighted.graph.annotation(n)
                                          is not None and weighted.graph.annotation(n).quantized)).weight_spec
    want = gptq_quantize(model.model.layers[0].self_attn.q_proj.weight.detach(), h, spec).dequantized
    got = b[block0 + "self_attn.q_proj"]
    assert float((got != want).float().mean()) < 0.01


def test_attention_weighting_reaches_qkv_with_the_models_attention_mass(tiny, monkeypatch):
    model = tiny("llama")
    plain = sq.compile(model, sq.QuantConfig(**GPTQ_CFG), calibration_data=CAL, stop_after="gptq")
    seen = _record_hessians(monkeypatch)
    weighted = sq.compile(model, sq.QuantConfig(**GPTQ_CFG, gptq_sink_weight="attention"), calibration_data=CAL,
                          stop_after="gptq")
    a, b = _weights(plain), _weights(weighted)
    for name in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert torch.equal(a["model.layers.0." + name], b["model.layers.0." + name]), name
    # Reference: q_proj's input rows weighted by the column sums of transformers' own eager
    # attention probabilities (mean over heads).
    layer, inputs, masses = model.model.layers[0].self_attn, [], []
    hook = layer.q_proj.register_forward_hook(lambda m, i, o: inputs.append(i[0]))
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            for row in CAL:
                probs = model(input_ids=row[None], use_cache=False, output_attentions=True).attentions[0]
                masses.append(probs.double().sum(-2).mean(1))
    finally:
        model.set_attn_implementation("sdpa")
        hook.remove()
    x, m = torch.cat(inputs).reshape(-1, layer.q_proj.in_features).double(), torch.cat(masses).reshape(-1)
    want = 2.0 / x.shape[0] * (x * m[:, None]).T @ x
    plain_h = 2.0 / x.shape[0] * x.T @ x
    for p in "qkv":
        got = seen[f"model.layers.0.self_attn.{p}_proj"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert float((got - plain_h).abs().max()) > 0.05 * float(plain_h.abs().max())
        assert not torch.equal(b[f"model.layers.0.self_attn.{p}_proj"], a[f"model.layers.0.self_attn.{p}_proj"]), p
    assert len(seen) == 7 * model.config.num_hidden_layers


def test_flattened_attention_input_is_weighted_per_sequence(tiny, monkeypatch):
    """GPT-2 views [batch, seq, C] as [-1, C] before c_attn: the sink is still each sequence's first row."""
    model, seen = tiny("gpt2"), _record_hessians(monkeypatch)
    cal = torch.randint(0, 128, (8, 40), generator=torch.Generator().manual_seed(7))  # c_proj reads 256
    cm = sq.compile(model, sq.QuantConfig(**GPTQ_CFG, gptq_sink_weight=50), calibration_data=cal, stop_after="gptq")
    assert {h["pass"]: h.get("stats") for h in cm.pass_history}["gptq"]["sink_weighted_layers"] == 2
    inputs = []
    hook = model.transformer.h[0].ln_1.register_forward_hook(lambda m, i, o: inputs.append(o))
    with torch.no_grad():
        for row in cal:
            model(input_ids=row[None], use_cache=False)
    hook.remove()
    want = _weighted_reference(torch.cat(inputs), 50.0)
    torch.testing.assert_close(seen["transformer.h.0.attn.c_attn"], want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_attention_weighting_is_a_config_value():
    assert sq.QuantConfig(gptq_sink_weight=" Attention").gptq_sink_weight == "attention"
    cfg = sq.QuantConfig(gptq_sink_weight="attention")
    assert sq.QuantConfig.from_dict(cfg.to_dict()).gptq_sink_weight == "attention"


@pytest.mark.parametrize("bad", [0.5, 0, -1.0, float("nan"), float("inf"), True, "50", "mass"])
def test_config_rejects_bad_sink_weights(bad):
    with pytest.raises(ConfigError, match=r"QuantConfig.gptq_sink_weight=.* a finite number >= 1"):
        sq.QuantConfig(gptq_sink_weight=bad)


def test_config_rejects_weighting_a_sink_that_sink_tokens_removes():
    with pytest.raises(ConfigError, match=r"gptq_sink_weight=50.0 cannot weight the sink .*sink_tokens=1"):
        sq.QuantConfig(gptq_sink_weight=50, sink_tokens=1)
    assert sq.QuantConfig(gptq_sink_weight=1, sink_tokens=1).sink_tokens == 1


def test_sink_weight_survives_json_and_the_artifact(tiny, tmp_path):
    cfg = sq.QuantConfig(**GPTQ_CFG, gptq_sink_weight=20)
    assert cfg.gptq_sink_weight == 20.0 and isinstance(cfg.gptq_sink_weight, float)
    assert sq.QuantConfig.from_dict(cfg.to_dict()).gptq_sink_weight == 20.0
    assert sq.QuantConfig.from_dict({k: v for k, v in cfg.to_dict().items()
                                     if k != "gptq_sink_weight"}).gptq_sink_weight == 1.0  # older artifacts
    cm = sq.compile(tiny("llama"), cfg, calibration_data=CAL)
    loaded = sq.load(cm.save(tmp_path / "art"))
    assert loaded.config.gptq_sink_weight == 20.0
    assert loaded.config.to_dict() == cfg.to_dict()


def test_sink_weight_is_a_compile_flag():
    from sagequant.tools.cli import build_parser
    from sagequant.tools.compile_flags import config_from_args
    p = build_parser()
    args = p.parse_args(["compile", "--model", "m", "--dataset", "d", "--output", "o", "--method", "gptq",
                         "--gptq-sink-weight", "50"])
    assert config_from_args(args).gptq_sink_weight == 50.0
    assert math.isclose(config_from_args(p.parse_args(["compile", "--model", "m", "--dataset", "d",
                                                       "--output", "o"])).gptq_sink_weight, 1.0)
    assert config_from_args(p.parse_args(["compile", "--model", "m", "--dataset", "d", "--output", "o",
                                          "--gptq-sink-weight", "attention"])).gptq_sink_weight == "attention"
    with pytest.raises(SystemExit):
        p.parse_args(["compile", "--model", "m", "--dataset", "d", "--output", "o", "--gptq-sink-weight", "0.5"])


def test_same_input_linears_share_one_hessian_and_one_stacked_rounding(tiny, monkeypatch):
    """q/k/v (and gate/up) read one value: one Hessian, one GPTQ run over their stacked rows,
    and each linear's result equals GPTQ of that linear alone within float noise."""
    import sagequant.passes.gptq as gptq_pass
    model, calls = tiny("llama"), []
    original = gptq_pass.gptq_quantize

    def recording(weight, hessian, spec, **kw):
        result = original(weight, hessian, spec, **kw)
        calls.append((kw["what"], weight.clone(), hessian.clone(), spec, result.dequantized))
        return result
    monkeypatch.setattr(gptq_pass, "gptq_quantize", recording)
    cm = sq.compile(model, sq.QuantConfig(**GPTQ_CFG), calibration_data=CAL, stop_after="gptq")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert len(calls) == 4 * model.config.num_hidden_layers   # q|k|v, o, gate|up, down per block
    whats = [c[0] for c in calls[:4]]
    assert whats[0] == ("weight of model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, "
                        "model.layers.0.self_attn.v_proj")
    assert whats[2] == "weight of model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj"
    _, stacked, hessian, spec, _ = calls[0]
    rows = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    assert stacked.shape == (sum(rows), attn.q_proj.in_features)
    weights = _weights(cm)
    start = 0
    for name, n in zip("qkv", rows):
        alone = original(stacked[start:start + n], hessian, spec).dequantized
        got = weights[f"model.layers.0.self_attn.{name}_proj"]
        assert float((got != alone).float().mean()) < 0.01, name
        start += n
    assert calls[2][1].shape[0] == mlp.gate_proj.out_features + mlp.up_proj.out_features
