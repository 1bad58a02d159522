"""Progress: every long phase reports counts through sagequant.progress (per decoder block for the
calibration algorithms, per layer for convert, per window for perplexity), displays go to stderr,
and quiet silences displays but not listeners."""
from __future__ import annotations

import json

import pytest
import torch

import sagequant as sq
from sagequant import progress
from sagequant.progress import recording, track
from sagequant.tools.cli import main as cli
from sagequant.evaluation.perplexity import perplexity


def _phases(events) -> dict[str, tuple[int, int | None]]:
    """{desc: (done, total)} at each phase's end."""
    return {e.desc: (e.done, e.total) for e in events if e.kind == "end"}


def test_track_counts_and_quiet_keeps_listeners(capsys):
    progress.set_quiet(True)
    try:
        with recording() as events:
            assert list(track(range(3), "phase a", unit="block")) == [0, 1, 2]
    finally:
        progress.set_quiet(False)
    assert [(e.kind, e.done) for e in events] == [("start", 0), ("advance", 1), ("advance", 2),
                                                    ("advance", 3), ("end", 3)]
    assert all(e.total == 3 and e.unit == "block" for e in events)
    assert capsys.readouterr().err == ""
    list(track(range(2), "phase b"))
    err = capsys.readouterr()
    assert "phase b" in err.err and err.out == ""  # the display is on stderr only


def test_gptq_and_awq_report_one_step_per_block(tiny, helpers):
    model = tiny("llama")
    blocks = model.config.num_hidden_layers
    calib_ids = torch.randint(0, helpers.VOCAB, (8, 16), generator=torch.Generator().manual_seed(0))
    with recording() as events:
        sq.compile(model, sq.QuantConfig(weight_dtype="int4", group_size=32, calibration="gptq",
                                         guard="off"), calibration_data=calib_ids)
        sq.compile(model, sq.QuantConfig(weight_dtype="int4", group_size=32, calibration="awq",
                                         guard="off"), calibration_data=calib_ids)
    done = _phases(events)
    segments = blocks + 2  # prologue, the blocks, epilogue
    assert done["gptq"] == (segments, segments)
    assert done["awq: statistics"] == (segments, segments)
    # Balance groups per Llama block: norm -> q/k/v, norm -> gate/up, up -> down (no v -> o: the
    # tiny model has grouped-query attention).
    assert done["awq: scale search"] == (3 * blocks, 3 * blocks)
    assert done["awq: clip search"] == (7 * blocks, 7 * blocks)
    assert done["convert"] == (7 * blocks + 1, 7 * blocks + 1)  # every annotated linear, lm_head too
    notes = [e for e in events if e.desc == "gptq" and e.kind == "advance"]
    assert len(notes) == segments


def test_perplexity_reports_every_window():
    ids = torch.arange(50) % 7
    table = torch.randn(7, 7)
    with recording() as events:
        res = perplexity(lambda x: table[x], ids, window=16, stride=16)
    assert _phases(events)["perplexity"] == (res.n_windows, res.n_windows) and res.n_windows == 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, word_checkpoint):
    return word_checkpoint(tmp_path_factory.mktemp("progress_ckpt"), "calib.jsonl", hidden_size=64,
                           num_hidden_layers=2)


def test_cli_summary_on_stderr_quiet_silences_it_and_json_stays_clean(checkpoint, tmp_path, capsys):
    model_dir, data = checkpoint
    out = tmp_path / "art"
    assert cli(["compile", "--model", str(model_dir), "--dataset", str(data), "--weight-dtype", "int8",
                "--samples", "2", "--seq-len", "16", "--output", str(out)]) == 0
    captured = capsys.readouterr()
    summary = [line for line in captured.err.splitlines() if line.startswith("sagequant compile: wrote")]
    assert len(summary) == 1 and str(out) in summary[0] and summary[0].endswith(" s")
    assert "\r" not in captured.out and "layer/s" not in captured.out  # bars never reach stdout
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(["the cat sat on a mat"] * 20))
    assert cli(["eval", "--artifact", str(out), "--text", str(text), "--window", "16", "--json",
                "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert json.loads(captured.out)["n_windows"] >= 2
    assert not progress.is_quiet()  # --quiet ends with the command
    assert cli(["inspect", "--artifact", str(out), "--json", "--scheduler-ir"]) == 0
    captured = capsys.readouterr()
    inspected = json.loads(captured.out)  # stdout is only the JSON; the summary went to stderr
    assert len(inspected["layers"]) == 15 and len(inspected["scheduler_ir"]) == 14
    assert inspected["layers"][0]["kernel"]["kernel"] == "cpu_weight_only_ref"
    assert "sagequant inspect: inspected" in captured.err


def test_onnx_export_reports_capture_and_every_layer(compiled, tmp_path):
    cm = compiled("llama", weight_dtype="int8", guard="off")
    with recording() as events:
        cm.export(tmp_path / "m.onnx", format="onnx", weight_format="qdq")
    done = _phases(events)
    quantized = cm.report()["quantized_layers"]
    assert done["export: capture (torch.onnx)"] == (1, 1)
    assert done["export: emit"] == (quantized, quantized)
