"""README.md runs as written: every fenced ```bash command and ```python snippet, in document order,
in one scratch directory, on a tiny random Llama instead of the real SmolLM2 so it takes about a
minute and a half on a busy 2-core machine. What is substituted, and nothing else:

- the model: `smollm2` where it names the model to load (after --model / --reference /
  --tokenizer / `engine start`, and `sq.resolve_model("smollm2")`) becomes a directory named
  `smollm2` holding a tiny GGUF file (a model form the README lists), so a served model is still
  called "smollm2";
- the ports 8000 / 8001 of the serving example become free ports;
- `bash scripts/demo.sh ARGS` runs its last step, `sagequant demo ARGS`, with `--model` that tiny
  model (the set-up step is what created this test's environment); `bash scripts/test.sh` is the
  suite this test belongs to (CI runs it through .ci/run), so it is only checked to exist.

`sagequant ...` commands run in-process through the CLI's main(argv); `curl` runs as a program.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from sagequant.tools.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
MODEL_ARG = re.compile(r"(--model|--reference|--tokenizer|engine start)(\s+)smollm2\b")


def readme_blocks() -> list[tuple[str, str]]:
    return [(lang, body) for lang, body in FENCE.findall((ROOT / "README.md").read_text())
            if lang in ("bash", "python")]


def bash_commands(body: str) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines dropped."""
    commands, current = [], ""
    for line in body.splitlines():
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        words = shlex.split(current, comments=True)
        if words:
            commands.append(shlex.join(words))
        current = ""
    return commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _substitute(text: str, model: Path, ports: dict[str, str]) -> str:
    text = MODEL_ARG.sub(lambda m: f"{m.group(1)}{m.group(2)}{model}", text)
    text = text.replace('resolve_model("smollm2")', f'resolve_model({str(model)!r})')
    for old, new in ports.items():
        text = re.sub(rf"\b{old}\b", new, text)
    return text


def _run(command: str, model: Path) -> None:
    argv = shlex.split(command)
    if argv[:2] == ["bash", "scripts/test.sh"]:
        assert (ROOT / "scripts" / "test.sh").is_file()
        return
    if argv[:2] == ["bash", "scripts/demo.sh"]:
        script = (ROOT / "scripts" / "demo.sh").read_text().strip().splitlines()
        assert script[-1] == '.venv/bin/sagequant demo "$@"'  # what the substitution stands for
        argv = ["sagequant", "demo", *argv[2:], "--model", str(model)]
    if argv[0] == "sagequant":
        assert cli(argv[1:]) == 0, command
    elif argv[0] == "curl":
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and '"choices"' in done.stdout, (command, done.stdout, done.stderr)
    else:
        raise AssertionError(f"README command of an unknown kind (teach test_readme.py): {command}")


def test_every_readme_command_is_known():
    commands = [c for lang, body in readme_blocks() if lang == "bash" for c in bash_commands(body)]
    assert commands and all(shlex.split(c)[0] in ("sagequant", "bash", "curl") for c in commands)
    assert not re.search(r"DATA\.md|\.\./shared", (ROOT / "README.md").read_text())


def test_readme_runs_as_written(tiny_gguf, tmp_path, monkeypatch):
    if shutil.which("curl") is None:
        pytest.skip("the serving example needs curl")
    model = tmp_path / "models" / "smollm2"
    model.mkdir(parents=True)
    shutil.copy(tiny_gguf[0], model / "model.gguf")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SAGEQUANT_STATE_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    ports = {"8000": str(_free_port()), "8001": str(_free_port())}
    namespace: dict = {"__name__": "__readme__"}
    try:
        for lang, body in readme_blocks():
            body = _substitute(body, model, ports)
            if lang == "python":
                exec(compile(body, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
            else:
                for command in bash_commands(body):
                    _run(command, model)
    finally:
        cli(["engine", "stop", "--all", "--quiet"])  # never leave a server behind a failed step
    assert (work / "report.html").is_file() and (work / "m.onnx").is_file()
