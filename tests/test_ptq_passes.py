"""Graph-level invariants of the PTQ passes on tiny random models: SmoothQuant and AWQ folds leave
the float function unchanged, GPTQ runs block by block and beats round-to-nearest, W8A8 lowers to
the activation-quantizing kernel, the sequential runner reproduces the graph, and the per-layer
error report ranks a deliberately broken layer first."""
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import sagequant as sq
from sagequant.calibration.sequential import SequentialRunner, decoder_block_prefixes
from sagequant.errors import CalibrationDataError
from sagequant.ir.patterns import balance_groups
from sagequant.ir.trace import trace_model
from sagequant.passes import PassContext, PassManager

LLAMA = LlamaConfig(vocab_size=128, hidden_size=80, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
GPT2 = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4)


def _model(cfg, outliers=True):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg).eval()
    if outliers:  # a few activation channels 30x larger, the situation smoothing exists for
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("ln_1.weight") or name.endswith("ln_2.weight"):
                    p[:3] *= 30
    return m


@pytest.fixture(scope="module")
def llama():
    return _model(LLAMA)


CAL = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(1))
IDS = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(2))


def _float_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method, extra", [
    ("smoothquant", dict(weight_dtype="int8", activation_dtype="int8", group_size=None)),
    ("awq", dict(weight_dtype="int4", group_size=32, awq_clip=False)),
])
def test_smoothing_folds_are_float_equivalent(cfg, method, extra):
    model = _model(cfg)
    cm = sq.compile(model, sq.QuantConfig(calibration=method, **extra), calibration_data=CAL,
                    stop_after=method)
    history = {h["pass"]: h for h in cm.pass_history}
    # llama: per layer q/k/v, gate/up and up->down groups; gpt2: ln_1 -> c_attn, ln_2 -> c_fc
    assert history[method]["modified"] and history[method]["stats"]["groups"] == (6 if cfg is LLAMA else 4)
    torch.testing.assert_close(cm(IDS), _float_logits(model), rtol=1e-4, atol=1e-4)
    # the weights really changed: consumer columns carry the scales
    w_before = dict(model.named_parameters())["model.layers.0.self_attn.q_proj.weight" if cfg is LLAMA
                                              else "transformer.h.0.attn.c_attn.weight"]
    w_after = cm.graph.attr(next(a for a in cm.graph.state() if ("q_proj" in a or "c_attn.weight" in a)))
    assert not torch.allclose(w_after.reshape(-1), (w_before.t() if cfg is GPT2 else w_before).reshape(-1))


def test_balance_groups_match_structure(llama):
    pm = PassManager(["canonicalize", "annotate"])
    g = pm.run(trace_model(llama), PassContext(sq.QuantConfig()))
    groups = balance_groups(g)
    kinds = sorted((grp.kind, len(grp.consumers)) for grp in groups)
    # per layer: input norm -> q,k,v; post-attention norm -> gate, up; up -> down
    assert kinds == [("linear", 1)] * 2 + [("rms_norm", 2)] * 2 + [("rms_norm", 3)] * 2


def test_smoothquant_reduces_activation_error(llama):
    base = dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
                activation_scale="static_per_tensor")
    ref = _float_logits(llama)
    err = {}
    for method in ("minmax", "smoothquant"):
        out = sq.compile(llama, sq.QuantConfig(calibration=method, **base), calibration_data=CAL)(IDS)
        err[method] = float((out - ref).norm() / ref.norm())
    assert err["smoothquant"] < 0.7 * err["minmax"], err


def test_smoothquant_refuses_weight_only_and_awq_refuses_w8a8(llama):
    with pytest.raises(sq.ConfigError, match="keeps 16-bit activations"):
        sq.compile(llama, sq.QuantConfig(calibration="smoothquant"), calibration_data=CAL)
    with pytest.raises(sq.ConfigError, match="AWQ protects salient weight channels"):
        sq.compile(llama, sq.QuantConfig(weight_dtype="int8", activation_dtype="int8", calibration="awq"),
                   calibration_data=CAL)
    with pytest.raises(ValueError, match="needs calibration data"):
        sq.compile(llama, sq.QuantConfig(calibration="gptq"))


def test_awq_and_gptq_beat_rtn(llama):
    ref = _float_logits(llama)
    err = {}
    for method in ("minmax", "awq", "gptq"):
        cm = sq.compile(llama, sq.QuantConfig(weight_dtype="int4", group_size=32, calibration=method),
                        calibration_data=CAL)
        err[method] = float((cm(IDS) - ref).norm() / ref.norm())
        if method == "gptq":
            stats = next(h["stats"] for h in cm.pass_history if h["pass"] == "gptq")
            assert stats["layers"] == 14 and stats["blocks"] == 2
            assert stats["gptq_error"] < 0.8 * stats["rtn_error"]
    assert err["gptq"] < err["minmax"] and err["awq"] < err["minmax"], err


def test_gptq_artifact_codes_are_gptq_grid(llama, tmp_path):
    cm = sq.compile(llama, sq.QuantConfig(weight_dtype="int4", group_size=32, calibration="gptq",
                                          gptq_act_order=True), calibration_data=CAL)
    cm.save(tmp_path / "g")
    assert torch.equal(sq.load(tmp_path / "g")(IDS), cm(IDS))


def test_w8a8_lowers_to_activation_kernel(llama):
    cm = sq.compile(llama, sq.QuantConfig(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                          fuse_qdq=False),  # the fused form: test_fuse_norm_qdq.py
                    calibration_data=CAL)
    ops = cm.graph.op_counts()
    assert ops["sagequant.w8a8_linear_ref.default"] == 14
    assert "sagequant.fake_quantize_activation.default" not in ops
    binding = cm.kernel_bindings["model.layers.0.mlp.down_proj"]
    assert binding["kernel"] == "cpu_w8a8_ref" and '"per_token"' in binding["attrs"]["activation"]
    ref = _float_logits(llama)
    assert float((cm(IDS) - ref).norm() / ref.norm()) < 0.2  # e4m3 keeps ~3 mantissa bits


def test_static_w8a8_without_data_is_refused(llama):
    with pytest.raises(ValueError, match="static activation scales .* need calibration data"):
        sq.compile(llama, sq.QuantConfig(weight_dtype="int8", activation_dtype="int8",
                                         activation_scale="static_per_tensor"))


@pytest.mark.parametrize("cfg", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_sequential_runner_reproduces_graph_and_frees_values(cfg):
    model = _model(cfg, outliers=False)
    g = PassManager(["canonicalize"]).run(trace_model(model), PassContext(sq.QuantConfig()))
    assert len(decoder_block_prefixes(g)) == 2
    runner = SequentialRunner(g)
    batches = [IDS[:1], IDS[1:]]
    caches = runner.start(batches)
    sizes = []
    for b in range(runner.num_blocks):
        runner.run_block(b, caches)
        sizes.append(len(caches[0]))
    out = next(n for n in g.graph.nodes if n.op == "output").args[0]
    logits = []  # the runner keeps no logits (no later segment reads them): a hook takes them
    runner.run_segment(runner.num_blocks + 1, caches, {out: lambda node, args, y: logits.append(y)})
    for i, ids in enumerate(batches):
        torch.testing.assert_close(logits[i], model(input_ids=ids, use_cache=False).logits)
        assert out not in caches[i]
    # between blocks only the hidden state and the shared prologue values (rotary, mask) are kept
    assert max(sizes) <= 8


def test_error_report_names_the_broken_layer(llama):
    broken = "model.layers.1.mlp.up_proj"
    # guard="report": the accuracy guard would (rightly) refuse this deliberately broken layer.
    cfg = sq.QuantConfig(weight_dtype="int8", group_size=None, guard="report",
                         overrides={broken: {"weight_dtype": "int4", "clip_ratio": 0.05}})
    cm = sq.compile(llama, cfg, calibration_data=CAL)
    rows = cm.error_report(IDS)
    assert rows[0]["layer"] == broken
    assert rows[0]["local_sqnr_db"] < 10 < rows[1]["local_sqnr_db"]
    assert len(rows) == 14 and all(r["accumulated_sqnr_db"] <= r["local_sqnr_db"] + 1 for r in rows[:1])


def _gptq_weights(cm) -> dict:
    g = cm.graph
    return {g.annotation(n).layer: (g.attr(n.args[1]).detach().clone(), g.annotation(n).weight_spec)
            for n in g.nodes(torch.ops.aten.linear.default) if g.annotation(n) is not None}


def test_gptq_true_sequential_sees_quantized_qkv_in_o_proj_hessian(llama):
    from sagequant.calibration.gptq import HessianAccumulator, gptq_quantize
    base = dict(weight_dtype="int4", group_size=32, calibration="gptq", guard="off")
    staged = _gptq_weights(sq.compile(llama, sq.QuantConfig(**base, gptq_true_sequential=True),
                                      calibration_data=CAL, stop_after="gptq"))
    joint = _gptq_weights(sq.compile(llama, sq.QuantConfig(**base, gptq_true_sequential=False),
                                     calibration_data=CAL, stop_after="gptq"))
    attn = "model.layers.0.self_attn."
    for p in ("q_proj", "k_proj", "v_proj"):  # the first stage sees the same inputs either way
        assert torch.equal(staged[attn + p][0], joint[attn + p][0])
    # Reference: o_proj's Hessian from the float model with block 0's q/k/v replaced by the
    # quantized ones, then GPTQ on the float o_proj weight.
    import copy
    model = copy.deepcopy(llama)
    layer = model.model.layers[0].self_attn
    with torch.no_grad():
        for p in ("q_proj", "k_proj", "v_proj"):
            getattr(layer, p).weight.copy_(staged[attn + p][0])
    acc = HessianAccumulator(layer.o_proj.in_features)
    hook = layer.o_proj.register_forward_hook(lambda m, a, o: acc.add(a[0]))
    with torch.no_grad():
        for row in CAL:
            model(input_ids=row[None], use_cache=False)
    hook.remove()
    assert acc.n == CAL.numel()
    w, spec = staged[attn + "o_proj"]
    want = gptq_quantize(llama.model.layers[0].self_attn.o_proj.weight.detach(), acc.hessian, spec).dequantized
    mismatch = {k: float((r[attn + "o_proj"][0] != want).float().mean()) for k, r in (("staged", staged),
                                                                                      ("joint", joint))}
    assert mismatch["staged"] < 0.01 < mismatch["joint"], mismatch


def test_awq_then_gptq_runs_both_and_beats_rtn(llama):
    ref = _float_logits(llama)
    cfg = dict(weight_dtype="int4", group_size=32)
    rtn = sq.compile(llama, sq.QuantConfig(**cfg), calibration_data=CAL)
    both = sq.compile(llama, sq.QuantConfig(**cfg, calibration="gptq+awq"), calibration_data=CAL)
    assert both.config.calibration == "awq+gptq"
    ran = {h["pass"]: h.get("stats", {}) for h in both.pass_history}
    assert ran["awq"]["groups"] > 0 and ran["gptq"]["layers"] == 14
    err = {k: float((m(IDS) - ref).norm() / ref.norm()) for k, m in (("rtn", rtn), ("awq+gptq", both))}
    assert err["awq+gptq"] < err["rtn"], err


def test_smoothquant_then_gptq_runs_both_and_beats_smoothquant_alone(llama):
    ref = _float_logits(llama)
    cfg = dict(weight_dtype="int8", activation_dtype="int8", group_size=None, guard="off")
    smooth = sq.compile(llama, sq.QuantConfig(**cfg, calibration="smoothquant"), calibration_data=CAL)
    both = sq.compile(llama, sq.QuantConfig(**cfg, calibration="gptq+smoothquant"), calibration_data=CAL)
    assert both.config.calibration == "smoothquant+gptq"
    ran = {h["pass"]: h.get("stats", {}) for h in both.pass_history}
    assert ran["smoothquant"]["groups"] == 6 and ran["gptq"]["layers"] == 14
    # GPTQ's Hessians are taken on the smoothed inputs: its rounding beats RTN's on that objective
    assert ran["gptq"]["gptq_error"] < 0.8 * ran["gptq"]["rtn_error"], ran["gptq"]
    err = {k: float((m(IDS) - ref).norm() / ref.norm()) for k, m in (("smoothquant", smooth), ("both", both))}
    assert err["both"] < err["smoothquant"], err
    with pytest.raises(sq.ConfigError, match="keeps 16-bit activations"):
        sq.compile(llama, sq.QuantConfig(weight_dtype="int4", calibration="smoothquant+gptq"), calibration_data=CAL)


# Held-back sequences are CAL's last two; calibrated on one repeated token per sequence, GPTQ fits
# inputs unlike them and round-to-nearest wins there, on CAL itself GPTQ wins.
REPEATED = torch.cat([torch.arange(4)[:, None].expand(4, CAL.shape[1]), CAL[-2:]])


@pytest.mark.parametrize("cal, winner", [(CAL, "gptq"), (REPEATED, "rtn")], ids=["gptq-wins", "rtn-wins"])
def test_gptq_select_blocks_keeps_the_rounding_with_the_lower_kl_at_the_logits(llama, cal, winner):
    from sagequant.evaluation.metrics import position_metrics
    base = dict(weight_dtype="int4", group_size=32, guard="report", guard_samples=2)
    picked = sq.compile(llama, sq.QuantConfig(**base, calibration="gptq", gptq_select_blocks=2),
                        calibration_data=cal)
    rtn = sq.compile(llama, sq.QuantConfig(**base), calibration_data=cal)
    gptq = sq.compile(llama, sq.QuantConfig(**base, calibration="gptq"), calibration_data=cal)
    stats = next(h["stats"] for h in picked.pass_history if h["pass"] == "gptq")
    kl = stats["chosen_kl"]
    assert sorted(kl) == ["model.layers.0", "model.layers.1"]
    chosen = {b: min(v, key=v.get) for b, v in kl.items()}
    assert chosen["model.layers.1"] == winner, kl
    assert stats["rtn_blocks"] == sorted(b for b, c in chosen.items() if c == "rtn")
    got, want = picked.graph.state(), {"rtn": rtn.graph.state(), "gptq": gptq.graph.state()}
    for i, block in enumerate(sorted(kl)):
        # RTN's rounding depends on nothing else; GPTQ's on the blocks before, so compare it only
        # while every block before kept GPTQ too
        if chosen[block] == "rtn" or all(chosen[b] == "gptq" for b in sorted(kl)[:i]):
            keys = [k for k in got if f".layers.{i}." in k]
            assert keys and all(torch.equal(got[k], want[chosen[block]][k]) for k in keys), block
    # the last block's recorded KL is the finished model's on the held-back sequences
    held = CAL[-2:]
    with torch.no_grad():
        ref = llama(input_ids=held, use_cache=False).logits
    final = float(position_metrics(ref.reshape(-1, 128), picked(held).reshape(-1, 128), held.reshape(-1))["kl"].mean())
    assert final == pytest.approx(kl["model.layers.1"][chosen["model.layers.1"]], rel=1e-3)
    with pytest.raises(sq.ConfigError, match="guard='off' holds none back"):
        sq.QuantConfig(calibration="gptq", gptq_select_blocks=2, guard="off")


def test_sink_tokens_leave_the_first_positions_out_of_the_hessians(llama):
    base = dict(weight_dtype="int4", group_size=32, calibration="gptq", guard="off")
    w = {k: _gptq_weights(sq.compile(llama, sq.QuantConfig(**base, sink_tokens=k), calibration_data=CAL,
                                     stop_after="gptq")) for k in (0, 1)}
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(w[0][q][0], w[1][q][0])
    with pytest.raises(CalibrationDataError, match="sink_tokens=24"):
        sq.compile(llama, sq.QuantConfig(**base, sink_tokens=24), calibration_data=CAL, stop_after="gptq")


def test_input_stats_skip_the_sink_positions(llama):
    from sagequant.calibration.stats import collect_input_stats
    graph = trace_model(llama)
    down = next(n for n in graph.nodes(torch.ops.aten.linear.default) if "layers.1.mlp.down_proj" in str(
        n.meta.get("nn_module_stack")))
    batches = list(CAL.split(1))
    stats = {k: collect_input_stats(graph, batches, [down], keep_rows=64, sink_tokens=k)[down] for k in (0, 1)}
    seen = []
    hook = llama.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, a, o: seen.append(a[0][0]))
    with torch.no_grad():
        for b in batches:
            llama(input_ids=b, use_cache=False)
    hook.remove()
    for k in (0, 1):
        rows = torch.cat([x[k:] for x in seen])
        torch.testing.assert_close(stats[k].channel_mean_abs, rows.abs().mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats[k].channel_absmax, rows.abs().amax(0), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(stats[0].channel_absmax, stats[1].channel_absmax)
