"""The CLI and the seed's facade (QuantizationManager / QuantizationProtocol) on a local checkpoint
directory: a tiny Llama plus a word-level tokenizer, both written to disk in the test."""
import json

import pytest

import sagequant as sq
from sagequant.tools.cli import main as cli


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, word_checkpoint):
    return word_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "calib.jsonl", hidden_size=80,
                           num_hidden_layers=2)


def test_calibrate_cli_writes_artifact_and_report(checkpoint, tmp_path, capsys):
    model_dir, data = checkpoint
    out = tmp_path / "art"
    rc = cli(["calibrate", "--model", str(model_dir), "--dataset", str(data), "--method", "percentile",
              "--weight-dtype", "int4", "--activation-dtype", "a16", "--kv-quant", "none",
              "--group-size", "32", "--samples", "2", "--seq-len", "16", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "scheme W4A16" in printed and "14/15 linear layers quantized" in printed
    cm = sq.load(out)
    assert cm.config.calibration == "percentile" and cm.config.group_size == 32
    rec = cm.calibration_records["model.layers.0.mlp.down_proj"]["input"]
    assert rec["observer"] == "percentile" and rec["num_samples"] == 2
    assert cli(["report", "--artifact", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kernels"] == {"cpu:cpu_weight_only_ref": 14}
    assert cli(["inspect", "--artifact", str(out), "--scheduler-ir"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.self_attn.o_proj | W4A16 w=int4/g32/sym/fp32" in text
    assert '"flops_per_token": 12800' in text  # o_proj: 2 * 80 * 80


def test_cli_print_ir_stop_after_and_dump(checkpoint, tmp_path, capsys):
    model_dir, _ = checkpoint
    rc = cli(["compile", "--model", str(model_dir), "--weight-dtype", "int8", "--output",
              str(tmp_path / "x"), "--print-ir-after", "canonicalize", "--stop-after", "annotate",
              "--dump-dir", str(tmp_path / "dump")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "IR after canonicalize" in out and "sagequant.rms_norm.default" in out
    assert "IR after annotate" not in out and "stopped after pass annotate" in out
    # The marker lists what sagequant wrote, so a later dump may replace exactly those files.
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == [
        ".sagequant-output.json", "001_canonicalize.txt", "002_annotate.txt"]
    assert not (tmp_path / "x").exists()


def test_cli_bad_input_is_one_clear_line_and_keeps_artifact(checkpoint, tmp_path, capsys):
    model_dir, data = checkpoint
    out = tmp_path / "keep"
    assert cli(["compile", "--model", str(model_dir), "--output", str(out), "--group-size", "32"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    rc = cli(["compile", "--model", str(model_dir), "--output", str(out), "--weight-dtype", "int3"])
    err = capsys.readouterr().err
    assert rc == 2 and "weight_dtype='int3'" in err and "valid:" in err
    rc = cli(["compile", "--model", str(model_dir), "--output", str(out), "--backend", "rocm"])
    err = capsys.readouterr().err
    assert rc == 2 and "no kernel registered for (scheme=W4A16, backend=rocm" in err
    assert "in pass 'lower'" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli(["calibrate", "--model", str(model_dir), "--dataset", str(empty), "--output", str(out)]) == 2
    assert "no usable text" in capsys.readouterr().err
    assert cli(["compile", "--model", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_quantization_manager_facade(checkpoint, tmp_path):
    model_dir, data = checkpoint
    cfg = sq.QuantConfig(weight_dtype="w8a16", activation_dtype="fp16", group_size=None,
                         calibration_samples=2, calibration_seq_len=16)
    mgr = sq.QuantizationManager(cfg)
    assert mgr.protocol.method == "minmax"
    path = mgr.calibrate(str(model_dir), str(data), output_dir=tmp_path / "m")
    assert (path / "manifest.json").is_file()
    loaded = mgr.load_quantized(path)
    assert loaded.config.scheme == "W8A16"
    assert mgr.select_kernel(in_features=80).name == "cpu_weight_only_ref"
    # per-channel int8: 8 bits per weight plus one fp32 scale per output row
    shapes = [(b["attrs"]["out_features"], b["attrs"]["in_features"]) for b in loaded.kernel_bindings.values()]
    rows, weights = sum(o for o, _ in shapes), sum(o * i for o, i in shapes)
    assert mgr.report()["weight_bytes"]["bits_per_weight"] == pytest.approx(8 + 32 * rows / weights, rel=1e-9)
    for method in ("minmax", "percentile", "smoothquant", "awq", "gptq", "smoothquant+awq"):
        assert sq.QuantizationManager(sq.QuantConfig(calibration=method)).protocol.method == method
