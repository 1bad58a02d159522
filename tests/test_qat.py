"""QAT: FakeQuant numerics and gradients, the fake_quant / fold_fake_quant passes, LoRA training
that lowers the loss, export identical in structure to PTQ, and the bad inputs."""
from __future__ import annotations

import pytest
import torch

import sagequant as sq
from sagequant.calibration.datasets import CalibrationDataError
from sagequant.calibration.fake_quant import FakeQuantize, FakeQuantLinear, fake_quantize
from sagequant.api import quantization_aware_training
from sagequant.calibration.qat import QATOptions, add_lora, merge_lora, qat_loss, training_windows
from sagequant.passes.pipeline import QAT, build_pipeline
from sagequant.config import ConfigError
from sagequant.ir.quant_spec import QuantSpec, compute_qparams, dequantize, quantize
from sagequant.passes import PassContext, PassManager

SPECS = [
    QuantSpec("int4", "per_group", 32),
    QuantSpec("uint4", "per_group", 32, symmetric=False),
    QuantSpec("int8", "per_channel"),
    QuantSpec("fp8_e4m3", "per_channel"),
    QuantSpec("int8", "per_tensor", scale_dtype="fp32"),
]


def _x(shape=(6, 80), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _reference_fq(x, spec, scale, zp):
    """Float64 quantize-dequantize written out from the spec (ragged last group included)."""
    rows = x.double().reshape(1, -1) if spec.granularity == "per_tensor" else x.double().reshape(-1, x.shape[-1])
    g = spec.group_size or rows.shape[-1]
    out = torch.empty_like(rows)
    fmt = spec.fmt
    for b, start in enumerate(range(0, rows.shape[-1], g)):
        part = rows[:, start:start + g]
        s = scale.double()[:, b:b + 1] if scale.shape[-1] > 1 else scale.double()
        z = 0.0 if zp is None else (zp.double()[:, b:b + 1] if zp.shape[-1] > 1 else zp.double())
        v = part / s + z
        if fmt.kind == "int":
            q = torch.round(v).clamp(fmt.qmin, fmt.qmax)
        else:  # fp8: saturate, then round to the nearest representable value
            q = v.clamp(-fmt.qmax, fmt.qmax).to(torch.float32).to(fmt.storage_dtype).double()
        out[:, start:start + g] = (q - z) * s
    return out.reshape(x.shape)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_forward_equals_quantize_dequantize(spec):
    x = _x()
    scale, zp = compute_qparams(x, spec)
    out = fake_quantize(x, spec, scale.float(), zp)
    assert torch.equal(out, dequantize(quantize(x, spec, scale=scale, zero_point=zp)))
    torch.testing.assert_close(out.double(), _reference_fq(x, spec, scale, zp), rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: s.describe())
def test_straight_through_inside_clip_range_zero_outside(spec):
    x = _x()
    scale, zp = compute_qparams(x, spec, clip_ratio=0.5)  # half the range: many values clip
    x.requires_grad_(True)
    fake_quantize(x, spec, scale.float(), zp).sum().backward()
    fmt = spec.fmt
    lo, hi = (-fmt.qmax, fmt.qmax) if fmt.kind == "float" else (fmt.qmin, fmt.qmax)
    g = spec.group_size or x.shape[-1]
    s = scale.float().repeat_interleave(g, dim=-1)[:, :x.shape[-1]]
    z = 0 if zp is None else zp.float().repeat_interleave(g, dim=-1)[:, :x.shape[-1]]
    code = x.detach() / s + z
    inside = (code >= lo) & (code <= hi)
    assert 0 < int(inside.sum()) < x.numel()
    assert torch.equal(x.grad, inside.float())


def test_lsq_scale_gradient_matches_formula():
    spec = QuantSpec("int4", "per_group", 32)
    x = _x((3, 64))
    scale, _ = compute_qparams(x, spec, clip_ratio=0.6)
    s = scale.float().requires_grad_(True)
    fake_quantize(x, spec, s, None, lsq_factor=0.25).sum().backward()
    v = x.double() / s.detach().double().repeat_interleave(32, dim=-1)
    q = torch.round(v).clamp(-8, 7)
    per_elem = torch.where((v >= -8) & (v <= 7), q - v, q)
    expected = 0.25 * per_elem.reshape(3, 2, 32).sum(-1)
    torch.testing.assert_close(s.grad.double(), expected, rtol=1e-5, atol=1e-5)


def test_observer_tracks_weight_until_frozen():
    spec = QuantSpec("int8", "per_channel")
    w = _x((4, 16))
    fq = FakeQuantize(spec, *compute_qparams(w, spec))
    fq(w * 3)  # training mode: the observer follows the tensor
    torch.testing.assert_close(fq.scale, compute_qparams(w * 3, spec)[0].float())
    fq.freeze()
    fq(w * 10)
    torch.testing.assert_close(fq.scale, compute_qparams(w * 3, spec)[0].float())
    assert not FakeQuantize(spec, *compute_qparams(w, spec), learn_scale=True).observing


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_gradient_matches_float64_autograd(offset):
    x = _x((2, 3, 8)).requires_grad_(True)
    w = (1 + 0.3 * _x((8,), seed=1)).requires_grad_(True)
    g = _x((2, 3, 8), seed=2)
    torch.ops.sagequant.rms_norm(x, w, 1e-6, offset).backward(g)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * (w64 + offset)
    ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def _prepared(traced, cfg):
    model, graph = traced("llama", **{"num_hidden_layers": 1})
    graph = build_pipeline(cfg, QAT).manager(stop_after="fake_quant").run(graph, PassContext(cfg))
    return model, graph


def test_fake_quant_pass_structure(traced):
    cfg = sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=32, enable_qat=True)
    _, graph = _prepared(traced, cfg)
    fq = [n for n in graph.graph.nodes if n.op == "call_module"
          and isinstance(graph.gm.get_submodule(n.target), FakeQuantLinear)]
    assert len(fq) == 7  # q k v o gate up down of the one layer; lm_head ignored
    assert graph.op_counts().get("aten.linear.default") == 1  # lm_head
    assert all(graph.annotation(n).quantized for n in fq)
    assert {n.target.split(".")[-1] for n in fq} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj"}


def test_fake_quant_graph_forward_equals_ptq(traced, tiny, eval_ids):
    """Untrained, the FakeQuant graph computes what PTQ's converted graph computes."""
    cfg = sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=32, enable_qat=True,
                         qat_learn_scales=False)
    _, graph = _prepared(traced, cfg)
    ptq = sq.compile(tiny("llama", num_hidden_layers=1), cfg.replace(enable_qat=False))
    with torch.no_grad():
        torch.testing.assert_close(graph.gm(eval_ids), ptq(eval_ids), rtol=1e-4, atol=1e-4)


def test_lora_wraps_fake_quant_merged_weight(traced, eval_ids):
    cfg = sq.QuantConfig(weight_dtype="int8", activation_dtype="a16", group_size=None, enable_qat=True)
    _, graph = _prepared(traced, cfg)
    targets = add_lora(graph.gm, rank=2, alpha=2.0)
    layer = graph.gm.get_submodule(targets[0])
    with torch.no_grad():
        layer.lora_B["qat"].weight.normal_(0, 0.5)
        before = graph.gm(eval_ids)
    base = layer.get_base_layer()
    x = torch.randn(3, base.in_features)
    with torch.no_grad():
        expected = base.fake_quant_linear(x, base.weight + layer.get_delta_weight("qat"))
        torch.testing.assert_close(layer(x), expected)
    assert merge_lora(graph.gm) == 7
    assert isinstance(graph.gm.get_submodule(targets[0]), FakeQuantLinear)
    with torch.no_grad():
        torch.testing.assert_close(graph.gm(eval_ids), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg_kw", [
    dict(weight_dtype="int4", activation_dtype="a16", group_size=32),
    dict(weight_dtype="int8", activation_dtype="int8", activation_scale="static_per_tensor"),
], ids=["W4A16", "W8A8-INT8-static"])
def test_qat_lowers_loss_and_exports_like_ptq(tiny, cfg_kw, tmp_path):
    model = tiny("llama", num_hidden_layers=1)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(3))
    cfg = sq.QuantConfig(**cfg_kw, enable_qat=True)
    opts = QATOptions(steps=8, lr=3e-3, scale_lr=1e-3, lora_rank=4, seq_len=16, loss="ce",
                      progress=False, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=4)
    cm = quantization_aware_training(model, cfg, ids, options=opts)
    ptq = sq.compile(model, cfg.replace(enable_qat=False), calibration_data=ids)
    with torch.no_grad():
        float_logits = model(input_ids=ids, use_cache=False).logits
        loss_ptq = float(qat_loss(ptq(ids), ids, None))
        loss_qat = float(qat_loss(cm(ids), ids, None))
    assert loss_qat < loss_ptq - 0.05, (loss_ptq, loss_qat)
    assert not torch.equal(cm(ids), float_logits)
    # Same static graph, same kernels, same artifact format as PTQ.
    assert cm.graph.op_counts() == ptq.graph.op_counts()
    assert cm.kernel_bindings == ptq.kernel_bindings
    assert [n.op for n in cm.graph.graph.nodes] == [n.op for n in ptq.graph.graph.nodes]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "final.safetensors", "step_000004.safetensors", "step_000008.safetensors"]
    reloaded = sq.load(cm.save(tmp_path / "artifact"))
    assert torch.equal(reloaded(ids), cm(ids))


def test_qat_export_runs_on_the_trained_grid(tiny):
    """The lowered model after QAT equals the trained FakeQuant graph (no re-rounding drift)."""
    from sagequant.calibration.qat import train_fake_quant_graph
    from sagequant.ir.trace import trace_model

    model = tiny("llama", num_hidden_layers=1)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(4))
    cfg = sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=32, enable_qat=True)
    ctx = PassContext(cfg)
    names = build_pipeline(cfg, QAT).names
    prepare, export = names[:names.index("qat_train")], names[names.index("qat_train") + 1:]
    graph = PassManager(prepare).run(trace_model(model), ctx)
    train_fake_quant_graph(graph.gm, model, ids, QATOptions(steps=3, lr=3e-3, scale_lr=1e-3, lora_rank=2,
                                                            seq_len=16, progress=False))
    with torch.no_grad():
        trained = graph.gm(ids)
    lowered = PassManager(export).run(graph, ctx)
    with torch.no_grad():
        torch.testing.assert_close(lowered(ids), trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=0.5), "low learning rate"),
    (dict(steps=0), "steps"), (dict(steps=None), "exactly one"), (dict(epochs=2), "exactly one"),
    (dict(scale_lr=-1.0), "scale_lr"), (dict(batch_size=0), "batch_size"), (dict(loss="mse"), "loss"),
    (dict(lora_rank=-1), "lora_rank"), (dict(checkpoint_every=5), "checkpoint_dir"),
])
def test_bad_training_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        QATOptions(**kw)


def test_qat_without_fake_quant_scheme_refused():
    with pytest.raises(ConfigError, match="no FakeQuant for NF4"):
        sq.QuantConfig(weight_dtype="nf4", activation_dtype="a16", enable_qat=True)


def test_nf4_layer_override_has_no_fake_quant():
    with pytest.raises(ConfigError, match=r"overrides\['down_proj'\].*no FakeQuant for NF4"):
        sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", enable_qat=True,
                       overrides={"down_proj": {"weight_dtype": "nf4"}})


@pytest.mark.parametrize("data", [None, [], torch.empty(0, 16, dtype=torch.long)])
def test_empty_training_data_refused(data):
    with pytest.raises(CalibrationDataError, match="empty"):
        training_windows(data, None, QATOptions(seq_len=16))


def test_training_text_needs_tokenizer_and_enough_tokens():
    with pytest.raises(CalibrationDataError, match="tokenizer"):
        training_windows(["some text"], None, QATOptions(seq_len=16))


@pytest.mark.parametrize("name", ["int8", "uint4", "int4", "fp8_e4m3", "fp8_e5m2", "nf4"])
def test_format_round_trip_equals_decode_encode(name):
    from sagequant.ir.formats import get_format
    fmt = get_format(name)
    scaled = torch.linspace(-1.2, 1.2, 301) * (fmt.qmax if fmt.kind != "codebook" else 1.0)
    scaled = torch.cat([scaled, torch.tensor([0.5, 1.5, 2.5, -0.5])])  # half-even ties
    assert torch.equal(fmt.round_trip(scaled), fmt.decode(fmt.encode(scaled), torch.float32))


def test_compile_with_enable_qat_trains(tiny):
    model = tiny("llama", num_hidden_layers=1)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(5))
    cfg = sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=32, enable_qat=True)
    cm = sq.compile(model, cfg, calibration_data=ids,
                    qat=QATOptions(steps=2, seq_len=16, lora_rank=2, progress=False))
    assert [p["pass"] for p in cm.pass_history].count("qat_train") == 1
    assert cm.report()["kernels"] == {"cpu:cpu_weight_only_ref": 7}
    with pytest.raises(ConfigError, match="enable_qat=True"):
        sq.compile(model, cfg.replace(enable_qat=False), calibration_data=ids, qat=QATOptions())
    with pytest.raises(ConfigError, match="stop_after"):
        sq.compile(model, cfg, calibration_data=ids, stop_after="annotate")
    with pytest.raises(CalibrationDataError, match="empty"):
        sq.compile(model, cfg, calibration_data=[])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, word_checkpoint):
    """A tiny Llama and a word-level tokenizer on disk, plus a JSONL training file."""
    return word_checkpoint(tmp_path_factory.mktemp("qat_llama"), "train.jsonl", hidden_size=64,
                           num_hidden_layers=1)


def test_qat_cli_writes_artifact_and_checkpoints(checkpoint, tmp_path, capsys):
    from sagequant.tools.cli import main as cli
    model_dir, data = checkpoint
    out = tmp_path / "art"
    rc = cli(["qat", "--model", str(model_dir), "--dataset", str(data), "--weight-dtype", "int4",
              "--activation-dtype", "a16", "--group-size", "32", "--steps", "3", "--train-seq-len", "8",
              "--lora-rank", "2", "--checkpoint-dir", str(tmp_path / "ck"), "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "qat: 3 steps, 24 tokens" in printed and "scheme W4A16" in printed
    cm = sq.load(out)
    assert cm.config.enable_qat and cm.report()["kernels"] == {"cpu:cpu_weight_only_ref": 7}
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "ck" / "final.safetensors"))
    assert sum("lora_A" in k for k in saved) == 7 and sum(k.endswith("weight_fq.scale") for k in saved) == 7


@pytest.mark.parametrize("flags, match", [
    (["--lr", "-1"], "argument --lr: -1.0 is out of range"),     # refused at parse time
    (["--weight-dtype", "nf4"], "no FakeQuant for NF4"),          # refused by the config
    (["--steps", "0"], "argument --steps: 0 is out of range"),
])
def test_qat_cli_bad_input_is_one_clear_line(checkpoint, tmp_path, capsys, flags, match):
    from sagequant.tools.cli import main as cli
    model_dir, data = checkpoint
    args = ["qat", "--model", str(model_dir), "--dataset", str(data), "--activation-dtype", "a16",
            "--output", str(tmp_path / "x")]
    try:
        rc = cli(args + (flags if "--weight-dtype" in flags else ["--weight-dtype", "int4", *flags]))
    except SystemExit as exc:  # argparse's own exit for a value its type refuses
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
