"""`sagequant export --artifact DIR --format onnx|tensorrt|compressed-tensors --output PATH [...]`."""
import json

import onnx

from sagequant.tools.cli import main


def test_export_matmulnbits_with_check(compiled, tmp_path, capsys):
    cm = compiled("llama", weight_dtype="int4", activation_dtype="a16", group_size=32)
    cm.save(tmp_path / "art")
    out = tmp_path / "m.onnx"
    rc = main(["export", "--artifact", str(tmp_path / "art"), "--format", "onnx", "--output", str(out),
               "--weight-format", "matmulnbits", "--check", "--check-tokens", "9"])
    text = capsys.readouterr().out
    assert rc == 0 and out.exists()
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(out)).graph.node) == 14
    res = json.loads(text.split("onnxruntime vs torch logits: ")[1])
    assert res["max_abs"] < 1e-5 and res["argmax_agree"] == 1.0


def test_export_errors_are_one_line(compiled, tmp_path, capsys):
    cm = compiled("llama", weight_dtype="nf4", activation_dtype="a16", group_size=32)
    cm.save(tmp_path / "nf4")
    rc = main(["export", "--artifact", str(tmp_path / "nf4"), "--output", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert rc == 2 and "sagequant export: error: cannot export layer model.layers.0.self_attn.q_proj" in err
    assert "NF4" in err and not (tmp_path / "x.onnx").exists()
    rc = main(["export", "--artifact", str(tmp_path / "nf4"), "--output", str(tmp_path / "x.onnx"),
               "--format", "tflite"])
    assert rc == 2 and "format='tflite' is not supported; valid: onnx, tensorrt" in capsys.readouterr().err


def test_export_compressed_tensors_with_check(compiled, tmp_path, capsys):
    cm = compiled("llama", weight_dtype="fp8", activation_dtype="fp8", group_size=None)
    cm.save(tmp_path / "art")
    out = tmp_path / "ckpt"
    rc = main(["export", "--artifact", str(tmp_path / "art"), "--format", "compressed-tensors",
               "--output", str(out), "--check", "--check-tokens", "9"])
    text = capsys.readouterr().out
    assert rc == 0 and (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"
    res = json.loads(text.split("transformers (compressed-tensors) vs torch logits: ")[1])
    assert res["max_abs"] < 1e-3 and res["argmax_agree"] == 1.0
