"""Fixtures of the bad-input catalogue: one tiny compiled artifact copied per case, the marker
file a payload would create, a loader check that every refusal is an ArtifactError naming what it
should, and the CLI run in-process. (Helpers: bad_input_tools.py.)"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import sagequant as sq
from sagequant.tools.cli import main as cli_main


@pytest.fixture(scope="session")
def artifact(compiled, tmp_path_factory) -> Path:
    """A W4A16 (group 32) tiny Llama artifact with calibration records and kernel bindings."""
    return compiled("llama", group_size=32).save(tmp_path_factory.mktemp("bad-inputs") / "art")


@pytest.fixture
def art(artifact, tmp_path) -> Path:
    """A private copy of the shared artifact to damage."""
    return Path(shutil.copytree(artifact, tmp_path / "art"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PAYLOAD_RAN"


@pytest.fixture
def refused(art, marker):
    """refused(words...) -> loads `art`, asserts an ArtifactError naming every word, and that no
    payload ran. Returns the message."""
    def check(*words: str) -> str:
        with pytest.raises(sq.ArtifactError) as info:
            sq.load(art)
        message = str(info.value)
        for w in words:
            assert w in message, f"{w!r} not in {message!r}"
        assert not marker.exists(), "a payload from the artifact ran"
        return message
    return check


@pytest.fixture
def run_cli(capsys):
    """run_cli(argv) -> (exit status, stderr): the CLI in-process, argparse exits included."""
    def run(argv: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        try:
            rc = cli_main([str(a) for a in argv])
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err
        return rc, err
    return run
