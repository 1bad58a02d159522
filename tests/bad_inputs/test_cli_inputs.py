"""Catalogue, CLI: nonsense numbers refused at parse time (exit 2, `error: argument --FLAG ...`),
mistakes in files and paths as one `error:` line (exit 2) naming the flag, file or field, and a
genuine bug shown with its traceback and said to be a bug. No case prints a traceback."""
from __future__ import annotations


import pytest

import sagequant.tools.cli as cli
from bad_input_tools import node, payloads, tamper

PARSE_ERRORS = {
    "group size negative": (["compile", "--group-size", "-1"], "--group-size"),
    "group size not a number": (["compile", "--group-size", "abc"], "--group-size"),
    "samples zero": (["compile", "--samples", "0"], "--samples"),
    "seq-len negative": (["compile", "--seq-len", "-3"], "--seq-len"),
    "clip ratio zero": (["compile", "--clip-ratio", "0"], "--clip-ratio"),
    "clip ratio above one": (["compile", "--clip-ratio", "1.5"], "--clip-ratio"),
    "clip ratio nan": (["compile", "--clip-ratio", "nan"], "--clip-ratio"),
    "target bits negative": (["compile", "--target-bits", "-2"], "--target-bits"),
    "target delta loss negative": (["compile", "--target-delta-loss", "-1"], "--target-delta-loss"),
    "stop-after unknown pass": (["compile", "--stop-after", "bogus"], "passes: canonicalize"),
    "print-ir-after unknown pass": (["compile", "--print-ir-after", "bogus"], "passes: canonicalize"),
    "eval max-tokens negative": (["eval", "--max-tokens", "-5"], "--max-tokens"),
    "eval window zero": (["eval", "--window", "0"], "--window"),
    "eval stride zero": (["eval", "--stride", "0"], "--stride"),
    "report eval-tokens negative": (["report", "--artifact", "a", "--eval-tokens", "-1"], "--eval-tokens"),
    "inspect top zero": (["inspect", "--artifact", "a", "--top", "0"], "--top"),
    "inspect error-tokens one": (["inspect", "--artifact", "a", "--error-tokens", "1"], "--error-tokens"),
    "export accuracy level": (["export", "--artifact", "a", "--output", "o", "--accuracy-level", "9"],
                              "--accuracy-level"),
    "export check-tokens zero": (["export", "--artifact", "a", "--output", "o", "--check-tokens", "0"],
                                 "--check-tokens"),
    "engine port too large": (["engine", "start", "m", "--port", "70000"], "--port"),
    "engine port negative": (["engine", "start", "m", "--port", "-1"], "--port"),
    "engine max-batch zero": (["engine", "start", "m", "--max-batch", "0"], "--max-batch"),
    "engine max-queue negative": (["engine", "start", "m", "--max-queue", "-1"], "--max-queue"),
    "engine max-seq-len one": (["engine", "start", "m", "--max-seq-len", "1"], "--max-seq-len"),
    "engine kv blocks zero": (["engine", "start", "m", "--num-kv-blocks", "0"], "--num-kv-blocks"),
    "engine default tokens zero": (["engine", "start", "m", "--default-max-tokens", "0"], "--default-max-tokens"),
    "engine body limit zero": (["engine", "start", "m", "--max-body-bytes", "0"], "--max-body-bytes"),
    "engine prompt limit zero": (["engine", "start", "m", "--max-prompt-tokens", "0"], "--max-prompt-tokens"),
    "engine timeout zero": (["engine", "start", "m", "--request-timeout", "0"], "--request-timeout"),
    "engine threads zero": (["engine", "start", "m", "--threads", "0"], "--threads"),
    "engine group size negative": (["engine", "start", "m", "--group-size", "-4"], "--group-size"),
    "qat learning rate zero": (["qat", "--lr", "0"], "--lr"),
    "qat batch size zero": (["qat", "--batch-size", "0"], "--batch-size"),
}
_REQUIRED = {"compile": ["--model", "m", "--output", "o"], "qat": ["--model", "m", "--output", "o",
                                                                   "--dataset", "d"]}


@pytest.mark.parametrize("case", list(PARSE_ERRORS))
def test_nonsense_number_is_refused_at_parse_time(run_cli, case):
    argv, words = PARSE_ERRORS[case]
    rc, err = run_cli(argv + _REQUIRED.get(argv[0], []))
    assert rc == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "error: argument" in line and words in line, err


def _one_error_line(rc: int, err: str, *words: str) -> str:
    assert rc == 2 and "Traceback" not in err, err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.json").write_text('{"weight_dtype": "int4",}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "typo.json").write_text('{"wieght_dtype": "int4"}')
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "nul.txt").write_bytes(b"text\x00more text")
    (tmp_path / "empty.txt").write_text("  \n\n ")
    (tmp_path / "notext.jsonl").write_text('{"content": "x"}\n')
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("the user's")
    (tmp_path / "page.html").write_text("<html>the user's page</html>")
    (tmp_path / "out.onnx").write_text("an earlier export")
    return tmp_path


COMPILE_MISTAKES = {
    "config invalid JSON": (["--config", "bad.json"], ["--config", "invalid JSON", "line 1"]),
    "config not an object": (["--config", "list.json"], ["--config", "JSON object"]),
    "config unknown field": (["--config", "typo.json"], ["wieght_dtype"]),
    "config binary": (["--config", "binary.bin"], ["--config", "not UTF-8"]),
    "dataset binary": (["--dataset", "binary.bin"], ["binary.bin", "not UTF-8"]),
    "dataset with NUL bytes": (["--dataset", "nul.txt"], ["nul.txt", "NUL"]),
    "dataset missing": (["--dataset", "missing.txt"], ["missing.txt", "not found"]),
    "dataset empty": (["--dataset", "empty.txt"], ["empty.txt", "no usable text"]),
    "dataset record without text": (["--dataset", "notext.jsonl"], ["notext.jsonl:1"]),
    "unsupported dtype": (["--weight-dtype", "int3"], ["weight_dtype='int3'", "valid:"]),
    "output is a file": (["--output", "a-file"], ["a-file", "is a file"]),
    "output holds foreign files": (["--output", "foreign"], ["foreign", "notes.txt", "--overwrite"]),
    "dump dir holds foreign files": (["--dump-dir", "foreign"], ["IR dump", "notes.txt"]),
}


@pytest.mark.parametrize("case", list(COMPILE_MISTAKES))
def test_compile_mistake_is_one_error_line(run_cli, files, monkeypatch, case):
    monkeypatch.chdir(files)
    extra, words = COMPILE_MISTAKES[case]
    argv = ["compile", "--model", "no-such-model", "--output", "new-out"]
    for flag, value in zip(extra[::2], extra[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    _one_error_line(*run_cli(argv), *words)
    assert (files / "foreign" / "notes.txt").read_text() == "the user's"
    assert not (files / "new-out").exists()


def test_output_checked_before_the_compile(run_cli, files, monkeypatch):
    """A refused --output fails before the model is even looked for (fail fast)."""
    monkeypatch.chdir(files)
    calls = []
    monkeypatch.setattr("sagequant.frontends.models.resolve_model", lambda spec: calls.append(spec))
    _one_error_line(*run_cli(["compile", "--model", "x", "--output", "foreign"]), "notes.txt")
    assert calls == []


@pytest.fixture
def tampered(art, marker):
    tamper(art, "graph.json", lambda g: node(g, "placeholder").update(target=payloads(marker)[0]))
    return art


COMMAND_MISTAKES = {
    "eval with neither source": (lambda d, a, t: ["eval"], ["exactly one of --artifact"]),
    "eval of a tampered artifact": (lambda d, a, t: ["eval", "--artifact", t], ["graph.json", "'target'"]),
    "report of a missing artifact": (lambda d, a, t: ["report", "--artifact", d / "none"], ["does not exist"]),
    "report of a tampered artifact": (lambda d, a, t: ["report", "--artifact", t], ["graph.json"]),
    "inspect of a tampered artifact": (lambda d, a, t: ["inspect", "--artifact", t], ["graph.json"]),
    "export of a tampered artifact": (lambda d, a, t: ["export", "--artifact", t, "--output", d / "t.onnx"],
                                      ["graph.json", "'target'"]),
    "engine start of a tampered artifact": (lambda d, a, t: ["engine", "start", t, "--port", "0"],
                                            ["graph.json", "'target'"]),
    "report html over a foreign file": (
        lambda d, a, t: ["report", "--artifact", a, "--html", d / "page.html"],
        ["HTML report", "page.html", "already exists"]),
    "report html under a file": (
        lambda d, a, t: ["report", "--artifact", a, "--html", d / "foreign" / "notes.txt"],
        ["HTML report", "notes.txt", "is a file, not a directory"]),
    "export over an existing file": (lambda d, a, t: ["export", "--artifact", a, "--output", d / "out.onnx"],
                                     ["out.onnx", "already exists", "--overwrite"]),
    "export into a directory path": (lambda d, a, t: ["export", "--artifact", a, "--output", d / "foreign"],
                                     ["is a directory"]),
    "export checkpoint into foreign files": (
        lambda d, a, t: ["export", "--artifact", a, "--format", "compressed-tensors", "--output", d / "foreign"],
        ["checkpoint", "notes.txt"]),
    "export format unknown": (lambda d, a, t: ["export", "--artifact", a, "--format", "pt", "--output", d / "x"],
                              ["format='pt'", "valid:"]),
    "export weight format unknown": (
        lambda d, a, t: ["export", "--artifact", a, "--weight-format", "gguf", "--output", d / "x"],
        ["weight_format='gguf'"]),
    "export engine for plain onnx": (
        lambda d, a, t: ["export", "--artifact", a, "--engine", d / "e.plan", "--output", d / "x.onnx"],
        ["engine_path is for format='tensorrt'"]),
    "engine stop without an id": (lambda d, a, t: ["engine", "stop", "--state-dir", d], ["ENGINE_ID"]),
    "engine stop unknown id": (lambda d, a, t: ["engine", "stop", "nope-1", "--state-dir", d], ["nope-1"]),
    "engine on a public address": (lambda d, a, t: ["engine", "start", "m", "--host", "8.8.8.8"],
                                   ["--allow-remote"]),
}


@pytest.mark.parametrize("case", list(COMMAND_MISTAKES))
def test_command_mistake_is_one_error_line(run_cli, files, artifact, tampered, marker, case):
    argv, words = COMMAND_MISTAKES[case]
    _one_error_line(*run_cli(argv(files, artifact, tampered)), *words)
    assert not marker.exists()
    assert (files / "out.onnx").read_text() == "an earlier export"
    assert sorted(p.name for p in (files / "foreign").iterdir()) == ["notes.txt"]


def test_a_genuine_bug_shows_its_traceback_and_says_so(run_cli, monkeypatch, artifact):
    def broken(directory):
        raise KeyError("internal state")
    monkeypatch.setattr("sagequant.api.load", broken)
    rc, err = run_cli(["report", "--artifact", artifact])
    assert rc == 1 and "Traceback" in err and "KeyError" in err and "bug in sagequant" in err


def test_group_size_zero_means_per_channel(compiled):
    """The help says 0 is per-channel: the flag maps to QuantConfig.group_size=None (it used to
    become 128), and that compiles to per-channel weight specs."""
    from sagequant.tools.compile_flags import config_from_args
    args = cli.build_parser().parse_args(["compile", "--model", "m", "--output", "o",
                                          "--weight-dtype", "int8", "--group-size", "0"])
    cfg = config_from_args(args)
    assert cfg.group_size is None
    cm = compiled("llama", weight_dtype="int8", group_size=None)
    specs = {cm.graph.annotation(n).weight_spec.granularity for n in cm.graph.annotated()
             if cm.graph.annotation(n).quantized}
    assert specs == {"per_channel"}
