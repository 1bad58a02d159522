"""Sensitivity (calibration/sensitivity.py), budget choice (calibration/precision_budget.py) and the
mixed_precision pass: budgets met on a tiny model, choices lowered per layer, bad inputs."""
from __future__ import annotations

import pytest
import torch

import sagequant as sq
from sagequant.calibration.datasets import CalibrationDataError
from sagequant.calibration.precision_budget import BudgetError, choose_precisions
from sagequant.config import ConfigError
from sagequant.ir.quant_spec import fake_quantize
from sagequant.passes.mixed_precision import model_sensitivity


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(7))


def _stats(cm):
    return cm.report()["mixed_precision"]


def test_sensitivity_is_the_loss_change_of_that_layer_alone(tiny, fresh_tiny, ids):
    cfg = sq.QuantConfig(group_size=32)
    batches = list(ids[:2].split(1))
    base, rows = model_sensitivity(tiny("llama"), cfg, batches)
    row = next(r for r in rows if r["layer"] == "model.layers.0.mlp.down_proj")
    # Independent float64 check: quantize that one weight in a copy of the HF model.
    model = fresh_tiny("llama")
    spec = sq.passes.annotate.weight_spec_for(cfg.layer_settings(row["layer"]), cfg.scale_precision)

    def loss(m):
        with torch.inference_mode():
            lp = [m(input_ids=b, use_cache=False).logits.double().log_softmax(-1) for b in batches]
        return float(sum(-x[0, :-1].gather(-1, b[0, 1:, None]).sum() for x, b in zip(lp, batches))) / 30
    ref_base = loss(model)
    with torch.no_grad():
        w = model.get_submodule(row["layer"]).weight
        w.copy_(fake_quantize(w, spec))
    assert base == pytest.approx(ref_base, rel=1e-5)
    assert row["options"]["W4A16"]["delta_loss"] == pytest.approx(loss(model) - ref_base, rel=1e-3, abs=1e-7)
    assert row["options"]["W4A16"]["delta_loss"] != 0
    assert set(row["options"]) == {"W4A16", "W8A16"} and len(rows) == 14


def test_bits_budget_is_met_and_each_layer_lowered_at_its_scheme(tiny, ids):
    cm = sq.compile(tiny("llama"), sq.QuantConfig(group_size=32, target_bits_per_weight=6.0),
                    calibration_data=ids)
    mp = _stats(cm)
    assert mp["bits_per_weight"] <= 6.0
    # The report's byte count is what was really stored: quantized layers + float-kept at fp16.
    wb = cm.weight_bytes()
    lm_head = 128 * 64 * 2
    assert wb["all_linear_bytes"] - lm_head == mp["bytes"]
    upgraded = {u["layer"]: u["to"] for u in mp["upgraded"]}
    assert upgraded and set(upgraded.values()) <= {"W8A16", "float"}
    for layer, binding in cm.kernel_bindings.items():
        assert binding["scheme"] == upgraded.get(layer, "W4A16")
        assert binding["attrs"]["format"] == ("int8" if layer in upgraded else "int4")
    # The most loss per extra byte is bought first: the most sensitive layer is among the raised.
    most = max(mp["sensitivity"], key=lambda r: r["options"]["W4A16"]["delta_loss"])
    assert most["layer"] in upgraded
    # The stats keep the whole measured table: the same choice can be recomputed from it.
    again = choose_precisions(mp["sensitivity"], mp["ladder"], bits_per_weight=6.0)
    assert {c.layer: c.label for c in again if c.label != "W4A16"} == upgraded
    assert all(u["why"].startswith("mixed_precision:") for u in mp["upgraded"])


def test_loss_target_keeps_the_chosen_layers_float_and_says_why(tiny, ids):
    cfg = sq.QuantConfig(group_size=32, target_max_delta_loss=1e-3, precision_upgrades=["float"])
    cm = sq.compile(tiny("llama"), cfg, calibration_data=ids)
    mp = _stats(cm)
    assert mp["predicted_delta_loss"] <= 1e-3 and mp["layers_per_option"]["float"] >= 1
    kept = cm.report()["kept_in_high_precision"]
    for u in mp["upgraded"]:
        assert u["to"] == "float" and kept[u["layer"]] == u["why"]
        assert u["layer"] not in cm.kernel_bindings


def test_choose_precisions_respects_the_budget_on_a_hand_table():
    def row(name, d4, d8):
        return {"layer": name, "params": 100, "options": {
            "W4": {"delta_loss": d4, "bytes": 50}, "W8": {"delta_loss": d8, "bytes": 100},
            "float": {"delta_loss": 0.0, "bytes": 200}}}
    rows = [row("a", 0.5, 0.01), row("b", 0.05, 0.0), row("c", 0.3, 0.2)]
    ladder = ["W4", "W8", "float"]
    # 6 bits/weight = 225 bytes, 75 over the all-W4 150: room for one W8 (+50); "a" gains most per byte.
    got = {c.layer: c.label for c in choose_precisions(rows, ladder, bits_per_weight=6.0)}
    assert got == {"a": "W8", "b": "W4", "c": "W4"}
    got = {c.layer: c.label for c in choose_precisions(rows, ladder, max_delta_loss=0.1)}
    assert sum(r["options"][got[r["layer"]]]["delta_loss"] for r in rows) <= 0.1
    assert got["b"] == "W4"  # never raised: cheaper gains elsewhere reach the target


def test_unmeetable_budgets_name_the_best_achievable(tiny, ids):
    # int4 g32 with fp32 scales: 4 + 32 / 32 bits per weight
    with pytest.raises(BudgetError, match="5.000 bits per weight, the best achievable"):
        sq.compile(tiny("llama"), sq.QuantConfig(group_size=32, target_bits_per_weight=3.0),
                   calibration_data=ids)
    with pytest.raises(BudgetError, match=r"best achievable summed per-layer delta loss is \d"):
        # No upgrade allowed: the all-W4A16 sum is the best there is.
        sq.compile(tiny("llama"), sq.QuantConfig(group_size=32, target_max_delta_loss=1e-9,
                                                 precision_upgrades=[]), calibration_data=ids)


@pytest.mark.parametrize("cfg, error, match", [
    (dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None, target_bits_per_weight=9.0,
          precision_upgrades=["int8"]), ConfigError, "cannot apply to scheme W8A8-FP8"),
    (dict(weight_dtype="int8", target_bits_per_weight=9.0), ConfigError, "gives the base scheme W8A16"),
    (dict(group_size=32, target_bits_per_weight=6.0, overrides={"layers.0.*": {"weight_dtype": "int8"}}),
     ConfigError, "through QuantConfig.overrides"),
])
def test_bad_mixed_precision_configs(tiny, ids, cfg, error, match):
    with pytest.raises(error, match=match):
        sq.compile(tiny("llama"), sq.QuantConfig(**cfg), calibration_data=ids)


def test_mixed_precision_needs_calibration_data(tiny):
    with pytest.raises(CalibrationDataError, match="sensitivity"):
        sq.compile(tiny("llama"), sq.QuantConfig(group_size=32, target_bits_per_weight=6.0))


@pytest.mark.parametrize("bad", [
    {"target_bits_per_weight": float("nan")}, {"target_bits_per_weight": -1},
    {"target_max_delta_loss": "0.1"}, {"target_bits_per_weight": 5, "target_max_delta_loss": 0.1},
    {"precision_upgrades": ["int2"]}, {"precision_upgrades": ["int8", "int8"]},
    {"sensitivity_samples": 0},
])
def test_bad_budget_fields_are_rejected(bad):
    with pytest.raises(ConfigError, match="QuantConfig.(target|precision|sensitivity)"):
        sq.QuantConfig(**bad)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama and a word-level tokenizer on disk, for the CLI."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ("the cat sat on a mat and dog ran to park while bird sang in tree near river " * 3).split()
    d = tmp_path_factory.mktemp("tiny_llama_mp")
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(words))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="</s>").save_pretrained(d)
    import transformers as tf
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       eos_token_id=1, bos_token_id=1)).save_pretrained(d)
    data = d / "calib.txt"
    data.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, 40, 5)))
    return d, data


def test_cli_compile_with_budget_and_inspect_sensitivity(checkpoint, tmp_path, capsys):
    from sagequant.tools.cli import main as cli
    model_dir, data = checkpoint
    out = tmp_path / "art"
    assert cli(["compile", "--model", str(model_dir), "--dataset", str(data), "--weight-dtype", "int4",
                "--activation-dtype", "a16", "--group-size", "32", "--samples", "4", "--seq-len", "12",
                "--target-bits", "6", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mixed precision: {'W4A16'" in printed and "accuracy guard (enforce, 24 held-back tokens)" in printed
    # Text is cut into --samples windows for calibration plus guard_samples held-back ones.
    passes = {p["pass"]: p["stats"] for p in sq.load(out).report()["passes"]}
    assert passes["calibrate"]["batches"] == 4 and passes["guard"]["held_back"]["sequences"] == 2
    assert cli(["inspect", "--artifact", str(out), "--sensitivity", "--text", str(data),
                "--sensitivity-samples", "2", "--error-tokens", "12"]) == 0
    table = capsys.readouterr().out.split("most sensitive first\n")[1].splitlines()
    assert cli(["inspect", "--artifact", str(out), "--sensitivity", "--text", str(data),
                "--sensitivity-method", "fisher", "--error-tokens", "12"]) == 0
    assert "delta loss (fisher)" in capsys.readouterr().out
    assert "dloss W4A16" in table[0] and "dloss W8A16" in table[0] and len(table) == 15
    first = [float(line.split()[2]) for line in table[1:]]
    assert first == sorted(first, reverse=True)
    assert cli(["compile", "--model", str(model_dir), "--dataset", str(data), "--target-bits", "2",
                "--group-size", "32", "--activation-dtype", "a16", "--samples", "4", "--seq-len", "12",
                "--output", str(tmp_path / "x")]) == 2
    assert "cannot be met" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # gpt2: Conv1D weights, stored transposed
def test_fisher_estimate_tracks_the_measured_sensitivity(tiny, arch):
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(7))
    batches = list(ids.split(1))
    base, measured = model_sensitivity(tiny(arch), sq.QuantConfig(group_size=32), batches)
    base_f, fisher = model_sensitivity(tiny(arch), sq.QuantConfig(group_size=32, sensitivity_method="fisher"),
                                       batches)
    assert base_f == pytest.approx(base, rel=1e-5)
    m = torch.tensor([r["options"]["W4A16"]["delta_loss"] for r in measured])
    f = torch.tensor([r["options"]["W4A16"]["delta_loss"] for r in fisher])
    assert [r["layer"] for r in measured] == [r["layer"] for r in fisher]
    assert torch.corrcoef(torch.stack([m, f]))[0, 1] > 0.95
    assert all(p.requires_grad for p in tiny(arch).parameters())  # the model is left as it was
