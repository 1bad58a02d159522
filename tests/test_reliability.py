"""Faults a deployment meets: a save killed with SIGKILL at its worst moments leaves a loadable
artifact (the previous one, or the complete new one once swapped in), and nothing is ever
unpickled — neither by loading an artifact nor anywhere in the package's code."""
from __future__ import annotations

import ast
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sagequant as sq

# The child saves a different model over the artifact and pauses (SIGKILL lands there) at a point:
#   weights    half of weights.safetensors written in the temporary directory
#   manifest   every file written and fsynced, nothing swapped in yet
#   swapped    the new directory swapped in, the old one not yet deleted
_CHILD = r"""
import os, sys, time
import sagequant as sq, sagequant.artifact as art, sagequant.safe_write as sw
source, target, point, marker = sys.argv[1:5]
cm = sq.load(source)

def pause():
    open(marker, "w").close()
    time.sleep(300)

if point == "weights":
    real = art.save_file
    def half(tensors, filename, *a, **k):
        real(dict(list(tensors.items())[:2]), filename)
        pause()
    art.save_file = half
elif point == "manifest":
    real_json = art._write_json
    def write(path, obj):
        real_json(path, obj)
        if path.name == "manifest.json":
            pause()
    art._write_json = write
else:
    real_exchange = sw._exchange
    def exchange(a, b):
        if not real_exchange(a, b):
            sys.exit(3)  # no renameat2 here: the two-rename path is tested in test_artifact.py
        pause()
    sw._exchange = exchange
cm.save(target)
"""


@pytest.fixture(scope="module")
def two_artifacts(compiled, tmp_path_factory):
    """(old W4A16 artifact, a different W8A16 artifact the child writes over it)."""
    d = tmp_path_factory.mktemp("kill")
    old = compiled("llama", weight_dtype="int4", group_size=32).save(d / "old")
    new = compiled("llama", weight_dtype="int8", group_size=None).save(d / "new")
    return old, new


def _logits(path, ids):
    return sq.load(path)(ids)


@pytest.mark.parametrize("point", ["weights", "manifest", "swapped"])
def test_kill_9_during_save_leaves_a_loadable_artifact(two_artifacts, tmp_path, eval_ids, point):
    import shutil
    old, new = two_artifacts
    target = tmp_path / "model"
    shutil.copytree(old, target)
    marker = tmp_path / "paused"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(new), str(target), point, str(marker)])
    deadline = time.monotonic() + 120
    while not marker.exists():
        if child.poll() == 3:
            pytest.skip("renameat2(RENAME_EXCHANGE) is not supported on this file system")
        assert child.poll() is None, f"child exited with {child.returncode} before pausing"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    expected = new if point == "swapped" else old  # the swap itself is the commit point
    assert torch.equal(_logits(target, eval_ids), _logits(expected, eval_ids))
    assert sq.load(target).config.scheme == sq.load(expected).config.scheme
    # A later save over it still works, and removes the killed save's temporary sibling.
    assert [p.name for p in tmp_path.iterdir() if ".sagequant-tmp-" in p.name]
    sq.load(new).save(target)
    assert torch.equal(_logits(target, eval_ids), _logits(new, eval_ids))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.")] == []


def test_loading_never_unpickles(two_artifacts, eval_ids, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used while loading an artifact")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                      (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    old, _ = two_artifacts
    assert sq.load(old)(eval_ids).shape[-1] > 0


def test_no_pickle_in_package_code():
    """No module of the package imports a pickle-based loader or calls torch.load/numpy.load with
    pickles; artifacts are JSON + safetensors only."""
    root = Path(sq.__file__).resolve().parent
    banned_imports = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("tests", "benchmarks", "scripts") or rel.parts[0].startswith("."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            offenders += [f"{rel}:{node.lineno} imports {n}" for n in names if n in banned_imports]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "load" and isinstance(node.func.value, ast.Name) and \
                    node.func.value.id == "torch":
                offenders.append(f"{rel}:{node.lineno} calls torch.load")
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and \
                    not (isinstance(node.value, ast.Constant) and node.value.value is False):
                offenders.append(f"{rel}:{node.lineno} allows pickle")
    assert offenders == []
