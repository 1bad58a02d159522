"""`sagequant report --artifact DIR --html OUT`: printed accuracy / memory / kernels and an HTML page
whose plots come from the artifact's own numbers (tiny model: structure only, no accuracy claims)."""
from __future__ import annotations

import re

import matplotlib.image
import pytest

import sagequant as sq
from sagequant.tools.cli import main
from sagequant.evaluation.html_report import input_records, weight_bytes_by_kind


@pytest.fixture(scope="module")
def w8a8_artifact(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    data = d / "calib.txt"
    data.write_text("\n\n".join(f"Calibration paragraph {i} about quantized language models "
                                 "and their activation ranges." for i in range(4)))
    out = d / "w8a8"
    assert main(["compile", "--model", str(tiny_checkpoint), "--weight-dtype", "w8a8",
                 "--activation-dtype", "w8a8", "--dataset", str(data), "--samples", "2",
                 "--seq-len", "16", "--output", str(out)]) == 0
    return out


def test_weight_bytes_by_kind_adds_up(w8a8_artifact):
    cm = sq.load(w8a8_artifact)
    kinds = weight_bytes_by_kind(cm)
    wb = cm.weight_bytes()
    assert sum(k["compiled"] for k in kinds.values()) == wb["all_linear_bytes"]
    assert sum(k["fp16"] for k in kinds.values()) == wb["all_linear_fp16_bytes"]
    assert {"q_proj", "down_proj", "lm_head"} <= set(kinds)
    assert kinds["lm_head"]["compiled"] == kinds["lm_head"]["fp16"]  # kept in high precision
    assert kinds["q_proj"]["compiled"] < 0.6 * kinds["q_proj"]["fp16"]  # int8 + scales


def test_report_html_with_accuracy_and_plots(w8a8_artifact, tmp_path, capsys):
    out = tmp_path / "html"
    assert main(["report", "--artifact", str(w8a8_artifact), "--html", str(out),
                 "--eval-tokens", "64"]) == 0
    printed = capsys.readouterr().out
    assert "scheme W8A8-INT8" in printed and "kernels:" in printed
    m = re.search(r"accuracy: ppl ([\d.]+) \(float\) -> ([\d.]+) \(([-+][\d.]+) ± ([\d.]+)%\), KL ([\d.e-]+) "
                  r"± ([\d.e-]+), top-1 flips ([\d.]+) ± ([\d.]+)% on 64 tokens", printed)
    assert m, printed
    assert float(m.group(5)) > 0  # W8A8 moves the next-token distribution
    page = (out / "report.html").read_text()
    for png in ("errors.png", "activations.png", "weight_bytes.png"):
        assert f'src="{png}"' in page
        img = matplotlib.image.imread(out / png)
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # a drawn figure
    assert f"{float(m.group(1)):.3f}" in page and "Not measured" not in page and "KL(float‖quant)" in page
    records = input_records(sq.load(w8a8_artifact))
    assert len(records) == 14  # 2 layers x 7 quantized linears, lm_head kept
    assert all(r["clip"] > 0 and r["min"] <= r["max"] for r in records.values())


def test_report_html_without_source_says_what_is_missing(tiny, tmp_path, capsys):
    cfg = sq.QuantConfig(weight_dtype="int4", group_size=32, guard="off")
    art = sq.compile(tiny("llama"), cfg).save(tmp_path / "a")  # no calibration data
    assert main(["report", "--artifact", str(art), "--html", str(tmp_path / "h")]) == 0
    assert "accuracy: not measured (the artifact records no source model; pass --reference MODEL)" \
        in capsys.readouterr().out
    page = (tmp_path / "h" / "report.html").read_text()
    assert page.count("Not measured: the artifact records no source model") == 2
    assert "No activation calibration records" in page
    assert (tmp_path / "h" / "weight_bytes.png").is_file()
    assert not (tmp_path / "h" / "errors.png").exists()


def test_eval_artifact_reports_paired_metrics_vs_source(w8a8_artifact, capsys):
    import json
    assert main(["eval", "--artifact", str(w8a8_artifact), "--max-tokens", "64", "--window", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["vs_float"]
    assert res["positions"] == 62 and res["clusters"] == 2  # 2 windows of 32 tokens, 31 targets each
    assert res["kl"] > 0 and res["kl_se"] > 0 and 0 <= res["flip_rate"] <= 1
    assert main(["eval", "--artifact", str(w8a8_artifact), "--max-tokens", "64", "--window", "32",
                 "--no-reference", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["ppl"] == pytest.approx(res["ppl_quant"], rel=1e-6) and "vs_float" not in alone


def _write_mmlu(path, n_per_topic=7):
    import json
    rows = [{"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
             "answer_d": "answer_d", "correct_answer": "answer", "topic": "topic"}]  # header-like row: skipped
    for t in ("astronomy", "world_religions"):
        for i in range(n_per_topic):
            rows.append({"question": f"Which option is number {i} in {t}?", "answer_a": "the first",
                         "answer_b": "the second", "answer_c": "the third", "answer_d": "the fourth",
                         "correct_answer": "ABCD"[i % 4], "topic": t})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.mark.parametrize("shots", [0, 5])
def test_eval_mmlu_letter_scoring_per_subject_and_paired_delta(w8a8_artifact, tmp_path, capsys, shots):
    import json
    f = _write_mmlu(tmp_path / "mmlu.jsonl")
    assert main(["eval", "--artifact", str(w8a8_artifact), "--task", "mmlu", "--mmlu-file", str(f),
                 "--shots", str(shots), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    per_topic = 7 - shots  # the first `shots` questions of each topic are the examples
    assert res["questions"] == 2 * per_topic
    assert set(res["per_topic"]) == {"astronomy", "world_religions"}
    assert all(v["questions"] == per_topic for v in res["per_topic"].values())
    assert sum(res["letter_share"].values()) == pytest.approx(1.0)
    d = res["vs_float"]
    assert d["delta_points"] == pytest.approx(100 * (res["accuracy"] - res["float"]["accuracy"]))
    assert d["delta_points_95ci"][0] <= d["delta_points"] <= d["delta_points_95ci"][1]


def test_eval_mmlu_needs_its_file(w8a8_artifact, capsys):
    assert main(["eval", "--artifact", str(w8a8_artifact), "--task", "mmlu"]) != 0
    assert "--mmlu-file" in capsys.readouterr().err
