"""Every form a model is kept in works as --model / compile(model=...): a transformers checkpoint
directory, a .gguf file and a directory holding one (a tiny random Llama written with the gguf
package's writer in llama.cpp's layout), the packaged smollm2, an artifact where a compiled model
makes sense; anything else is one line naming the accepted forms."""
from __future__ import annotations

import shutil

import pytest
import torch

import sagequant as sq
from sagequant.config import ConfigError
from sagequant.progress import recording
from sagequant.serving.launch import ServeOptions, build_server
from sagequant.tools.cli import main as cli
from sagequant.frontends.models import FORMS, load_model, model_source, resolve_model, resolve_tokenizer

TEXT = "the cat sat on the mat and the dog ran at the park while a bird sang " * 6


@pytest.fixture(scope="module")
def gguf_dir(tiny_gguf, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf-dir")
    shutil.copy(tiny_gguf[0], d / "model-f32.gguf")
    return d


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "calib.txt"
    p.write_text("\n\n".join([TEXT] * 4))
    return p


def test_gguf_file_loads_bit_exactly_with_its_tokenizer(tiny_gguf, gguf_dir):
    path, float_model = tiny_gguf
    ids = torch.tensor([[1, 5, 40, 258, 3, 99]])
    for spec in (path, gguf_dir):
        model, tok = resolve_model(spec)
        with torch.no_grad():  # the rotary permutation undone exactly: same float weights
            torch.testing.assert_close(model(ids).logits, float_model(ids).logits, rtol=0, atol=0)
        assert tok.decode(tok.encode("the cat")) == "the cat" and tok.eos_token == "<|endoftext|>"
    assert model_source(path).kind == model_source(gguf_dir).kind == "gguf"


def test_checkpoint_dir_and_packaged_name(tiny, tmp_path):
    model = tiny("qwen2")
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    source = model_source("SmolLM2")
    assert source.kind == "packaged" and source.gguf_file.endswith(".gguf")


def test_anything_else_is_one_line_naming_the_forms(tmp_path, tiny_gguf):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf[0], two / name)
    cases = [(tmp_path / "missing", FileNotFoundError, "does not exist"),
             (tmp_path / "empty", ConfigError, "holds no model"),
             (tmp_path / "notes.txt", ConfigError, "is not a .gguf file"),
             (two, ConfigError, "holds 2 GGUF files (a.gguf, b.gguf)")]
    for spec, error, words in cases:
        with pytest.raises(error) as info:
            model_source(spec)
        message = str(info.value)
        assert words in message and "\n" not in message
        if error is not ConfigError or "GGUF files" not in message:
            assert FORMS in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sq.compile(str(tmp_path / "missing"), sq.QuantConfig())


def test_compile_takes_a_gguf_path(tiny_gguf):
    path, float_model = tiny_gguf
    cm = sq.compile(str(path), sq.QuantConfig(weight_dtype="int8", guard="off"))
    ids = torch.tensor([[1, 5, 40, 258, 3, 99]])
    with torch.no_grad():
        ref = float_model(ids).logits
    err = (cm(ids) - ref).norm() / ref.norm()
    assert 0 < err < 0.02  # int8 weights: close to, not equal to, the float model


def test_cli_calibrate_eval_on_gguf_and_artifact_forms(gguf_dir, tiny_gguf, data_file, tmp_path, capsys):
    out = tmp_path / "art"
    assert cli(["calibrate", "--model", str(gguf_dir), "--dataset", str(data_file), "--method", "awq",
                "--weight-dtype", "int4", "--group-size", "32", "--samples", "2", "--seq-len", "32",
                "--output", str(out)]) == 0
    assert "scheme W4A16" in capsys.readouterr().out
    assert sq.load(out).graph.model_info["source"] == str(gguf_dir)
    text = tmp_path / "eval.txt"
    text.write_text(TEXT)
    results = {}
    for label, argv in {"float gguf": ["--model", str(tiny_gguf[0])],
                        "artifact": ["--artifact", str(out)],
                        "artifact as --model": ["--model", str(out)]}.items():
        assert cli(["eval", *argv, "--text", str(text), "--window", "32", "--quiet"]) == 0, label
        results[label] = float(capsys.readouterr().out.split()[1])
    assert results["artifact"] == results["artifact as --model"] != results["float gguf"]
    assert cli(["compile", "--model", str(out), "--weight-dtype", "int8",
                "--output", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "is a sagequant artifact (already compiled)" in err and len(err.strip().splitlines()) == 1


def test_engine_start_serves_a_gguf_file(tiny_gguf):
    from fastapi.testclient import TestClient
    with recording() as events:
        app, served = build_server(ServeOptions(model=str(tiny_gguf[0]), quantization="int8",
                                                max_seq_len=64))
    assert [e.done for e in events if e.desc == "engine start" and e.kind == "end"] == [3]
    tok = resolve_tokenizer(tiny_gguf[0])
    prompt = "the cat sat"
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"model": served.name, "prompt": prompt,
                                                 "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    cm = sq.compile(str(tiny_gguf[0]), sq.QuantConfig(weight_dtype="int8", guard="off"))
    expected = cm.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=5)[0, -5:]
    assert r.json()["choices"][0]["text"] == tok.decode(expected)
