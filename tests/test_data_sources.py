"""--dataset forms: the packaged texts by name, JSONL with a chosen field, plain text, a directory
of text files, token-id files (.npy / .safetensors); calibrate's default is the Wikipedia prose."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sagequant as sq
from sagequant.calibration.data_sources import FORMS, load_dataset
from sagequant.errors import CalibrationDataError
from sagequant.tools.cli import main as cli


def test_packaged_texts_by_name():
    wiki, news = load_dataset("wikipedia"), load_dataset("NEWS")
    assert len(wiki) > 100 and all("[[" not in a and "{{" not in a for a in wiki)
    assert len(news) > 290 and all(line.strip() and "\n" not in line for line in news)
    assert not set(wiki) & set(news)  # calibration text stays disjoint from evaluation text


def test_jsonl_field_is_chosen(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"question {i}", "body": f"text {i}"}) for i in range(3)))
    assert load_dataset(f, text_field="body") == ["text 0", "text 1", "text 2"]
    with pytest.raises(CalibrationDataError) as info:
        load_dataset(f)
    assert "no string 'text' field" in str(info.value) and "body, prompt" in str(info.value)
    assert "--text-field" in str(info.value)


def test_directory_of_text_files_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("second file, one line")
    (tmp_path / "a.md").write_text("first paragraph\n\nsecond paragraph")
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "from jsonl"}))
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / ".hidden.txt").write_text("never read")
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    assert load_dataset(tmp_path) == ["first paragraph", "second paragraph", "second file, one line",
                                      "from jsonl"]
    (tmp_path / "other").mkdir()
    with pytest.raises(CalibrationDataError, match="holds no text files"):
        load_dataset(tmp_path / "other")


def test_token_id_files(tmp_path):
    rows = torch.arange(24).view(3, 8)
    np.save(tmp_path / "rows.npy", rows.numpy().astype(np.int32))
    assert torch.equal(load_dataset(tmp_path / "rows.npy"), rows)
    np.save(tmp_path / "stream.npy", np.arange(20, dtype=np.uint16))
    assert torch.equal(load_dataset(tmp_path / "stream.npy", seq_len=6), torch.arange(18).view(3, 6))
    with pytest.raises(CalibrationDataError, match="window length"):
        load_dataset(tmp_path / "stream.npy")
    save_file({"input_ids": rows, "attention_mask": torch.ones_like(rows)}, tmp_path / "ids.safetensors")
    assert torch.equal(load_dataset(tmp_path / "ids.safetensors"), rows)
    np.save(tmp_path / "floats.npy", np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(CalibrationDataError, match="must be integers"):
        load_dataset(tmp_path / "floats.npy")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationDataError, match="not a plain .npy array"):
        load_dataset(tmp_path / "objects.npy")


def test_missing_dataset_names_the_forms(tmp_path):
    with pytest.raises(CalibrationDataError) as info:
        load_dataset(tmp_path / "nope.jsonl")
    assert FORMS in str(info.value)


def test_calibrate_defaults_to_wikipedia_and_takes_token_files(tiny_checkpoint, tmp_path, capsys):
    base = ["calibrate", "--model", str(tiny_checkpoint), "--weight-dtype", "w8a8", "--activation-dtype",
            "w8a8", "--samples", "2", "--seq-len", "16", "--quiet"]
    assert cli(base + ["--output", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "calibration data: the packaged Wikipedia prose" in out and "(the default;" in out
    rec = sq.load(tmp_path / "a").calibration_records["model.layers.0.mlp.down_proj"]["input"]
    assert rec["num_samples"] == 2
    np.save(tmp_path / "ids.npy", np.arange(5 * 16).reshape(5, 16) % 1000)
    assert cli(base + ["--dataset", str(tmp_path / "ids.npy"), "--output", str(tmp_path / "b")]) == 0
    assert "calibration data: " + str(tmp_path / "ids.npy") in capsys.readouterr().out
    rec = sq.load(tmp_path / "b").calibration_records["model.layers.0.mlp.down_proj"]["input"]
    assert rec["num_samples"] == 3  # 5 rows, the guard holds back the last 2
