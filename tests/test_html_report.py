"""`sagequant report --artifact DIR --html OUT`: printed accuracy / memory / kernels and ONE
self-contained HTML file whose inline-SVG plots come from the artifact's own numbers (tiny model:
structure only, no accuracy claims), rendered in a real headless Chromium where one is installed."""
from __future__ import annotations

import math
import re
import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest

import sagequant as sq
from sagequant.evaluation.html_report import input_records, render_html_report, weight_bytes_by_kind
from sagequant.tools.cli import main

PLOT_TITLES = ("Per-layer quantization error", "Activation ranges vs calibrated clip",
               "Linear-weight bytes by layer kind", "Pass timings")


@pytest.fixture(scope="module")
def w8a8_artifact(tiny_checkpoint, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    data = d / "calib.txt"
    data.write_text("\n\n".join(f"Calibration paragraph {i} about quantized language models "
                                 "and their activation ranges." for i in range(4)))
    out = d / "w8a8"
    assert main(["compile", "--model", str(tiny_checkpoint), "--weight-dtype", "w8a8",
                 "--activation-dtype", "w8a8", "--dataset", str(data), "--samples", "2",
                 "--seq-len", "16", "--output", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def report_page(w8a8_artifact, tmp_path_factory):
    """(printed output, path of the written report.html)."""
    out = tmp_path_factory.mktemp("html")
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["report", "--artifact", str(w8a8_artifact), "--html", str(out),
                     "--eval-tokens", "64", "--quiet"]) == 0
    return buf.getvalue(), out / "report.html"


def test_weight_bytes_by_kind_adds_up(w8a8_artifact):
    cm = sq.load(w8a8_artifact)
    kinds = weight_bytes_by_kind(cm)
    wb = cm.weight_bytes()
    assert sum(k["compiled"] for k in kinds.values()) == wb["all_linear_bytes"]
    assert sum(k["fp16"] for k in kinds.values()) == wb["all_linear_fp16_bytes"]
    assert {"q_proj", "down_proj", "lm_head"} <= set(kinds)
    assert kinds["lm_head"]["compiled"] == kinds["lm_head"]["fp16"]  # kept in high precision
    assert kinds["q_proj"]["compiled"] < 0.6 * kinds["q_proj"]["fp16"]  # int8 + scales


def test_report_html_is_one_self_contained_file(report_page, w8a8_artifact):
    printed, path = report_page
    assert "scheme W8A8-INT8" in printed and "kernels:" in printed
    m = re.search(r"accuracy: ppl ([\d.]+) \(float\) -> ([\d.]+) \(([-+][\d.]+) ± ([\d.]+)%\), KL ([\d.e-]+) "
                  r"± ([\d.e-]+), top-1 flips ([\d.]+) ± ([\d.]+)% on 64 tokens", printed)
    assert m, printed
    assert float(m.group(5)) > 0  # W8A8 moves the next-token distribution
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]  # no image files beside it
    page = path.read_text()
    assert page.count("<svg") == 4 and all(t in page for t in PLOT_TITLES)
    assert "<img" not in page and not re.search(r"\b(src|href)=[\"'](?!#)", page)  # nothing linked
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # four figures on one page, no id collisions
    assert f"{float(m.group(1)):.3f}" in page and "Not measured" not in page and "KL(float‖quant)" in page
    passes = page[page.index("<h2>Passes</h2>"):]
    assert "{&quot;" not in passes and '{"' not in passes  # statistics rendered as tables, not JSON
    assert "<td>records</td><td>14</td>" in passes  # the calibrate pass's statistic, as a table row
    records = input_records(sq.load(w8a8_artifact))
    assert len(records) == 14  # 2 layers x 7 quantized linears, lm_head kept
    assert all(r["clip"] > 0 and r["min"] <= r["max"] for r in records.values())


def test_report_text_is_escaped_once(w8a8_artifact):
    cm = sq.load(w8a8_artifact)
    cm.pass_history.append({"pass": "x<y>", "seconds": 0.5, "modified": False,
                            "stats": {"note": 'a<b & "c"', "layers": ["<l0>", "l1"],
                                      "rows": [{"layer": "<a>", "db": 1.5}]}})
    page = render_html_report(cm, None, None, "because <reasons> & more")
    assert "<td>x&lt;y&gt;</td>" in page and "a&lt;b &amp; &quot;c&quot;" in page
    assert "&lt;l0&gt;, l1" in page and "because &lt;reasons&gt; &amp; more" in page
    assert "<tr><th>layer</th><th>db</th></tr><tr><td>&lt;a&gt;</td><td>1.5</td></tr>" in page
    assert "<y>" not in page and "&amp;lt;" not in page and "&amp;quot;" not in page


def test_report_html_without_source_says_what_is_missing(tiny, tmp_path, capsys):
    cfg = sq.QuantConfig(weight_dtype="int4", group_size=32, guard="off")
    art = sq.compile(tiny("llama"), cfg).save(tmp_path / "a")  # no calibration data
    assert main(["report", "--artifact", str(art), "--html", str(tmp_path / "h.html")]) == 0
    assert "accuracy: not measured (the artifact records no source model; pass --reference MODEL)" \
        in capsys.readouterr().out
    page = (tmp_path / "h.html").read_text()
    assert page.count("Not measured: the artifact records no source model") == 2
    assert "No activation calibration records" in page
    assert page.count("<svg") == 2  # weight bytes and pass timings only


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


def test_eval_contribution_table(w8a8_artifact, capsys):
    import json
    assert main(["eval", "--artifact", str(w8a8_artifact), "--max-tokens", "64", "--window", "32",
                 "--contributions", "block", "--contribution-tokens", "32", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    table = res["contributions"]
    layers = len([a for a in sq.load(w8a8_artifact).graph.annotated()])
    kls = [r["kl"] for r in table["rows"]]
    assert kls == sorted(kls, reverse=True)  # most harmful first
    assert {r["unit"] for r in table["rows"]} == {"model.layers.0", "model.layers.1"}
    assert sum(r["layers"] for r in table["rows"]) == layers - 1  # lm_head stays float
    assert sum(r["share"] for r in table["rows"]) == pytest.approx(1.0)
    assert all(r["kl"] > 0 and math.isfinite(r["worst_local_sqnr_db"]) for r in table["rows"])
    assert main(["eval", "--artifact", str(w8a8_artifact), "--max-tokens", "64", "--window", "32",
                 "--contributions", "linear", "--contribution-tokens", "32"]) == 0
    assert "per-linear contribution" in capsys.readouterr().out
    assert main(["eval", "--artifact", str(w8a8_artifact), "--max-tokens", "64", "--no-reference",
                 "--contributions", "block"]) != 0


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
                 "--shots", str(shots), "--per-topic", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    per_topic = min(6, 7 - shots)  # the first `shots` questions of each topic are the examples
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


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def _screenshot(browser: str, page, png, profile) -> np.ndarray:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
                    f"--screenshot={png}", "--window-size=1280,4200", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    return matplotlib.image.imread(png)[..., :3]


def _plot_pixels(img: np.ndarray) -> dict[str, int]:
    """Pixels of matplotlib's tab:blue / tab:orange (the bars and ranges), which only plots draw."""
    colours = {"blue": (0x1f, 0x77, 0xb4), "orange": (0xff, 0x7f, 0x0e)}
    return {name: int((np.abs(img * 255 - np.array(rgb)).max(-1) < 12).sum())
            for name, rgb in colours.items()}


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_its_plots_in_headless_chromium(report_page, tmp_path):
    browser, page = _chromium(), report_page[1]
    pixels = _plot_pixels(_screenshot(browser, page, tmp_path / "report.png", tmp_path / "profile"))
    # Four plots of blue bars / ranges and one of orange bars: thousands of pixels each.
    assert pixels["blue"] > 20000 and pixels["orange"] > 2000, pixels
    # The same page without its figures has none: the count measures the plots, not the page.
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<figure>.*?</figure>", "", page.read_text(), flags=re.S))
    assert _plot_pixels(_screenshot(browser, bare, tmp_path / "bare.png", tmp_path / "profile2")) == \
        {"blue": 0, "orange": 0}
