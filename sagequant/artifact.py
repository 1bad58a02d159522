"""Artifact directory: graph.json (the lowered graph, no pickle), weights.safetensors, meta.json
(config, annotations are in the graph, KV plan, report) and manifest.json (sha256 per file).

Writes are atomic: everything goes to a temporary sibling directory, is fsynced, and replaces the
target, so a crash mid-save (even kill -9) leaves the previous artifact intact. On Linux the
replacement is one renameat2(RENAME_EXCHANGE) swap, so the target path always holds a complete
artifact; elsewhere it is two renames (target -> backup, temporary -> target), and a crash between
them leaves the previous artifact in the `.NAME.old-PID` sibling. Loading verifies every checksum
before reading anything else.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ArtifactError

ARTIFACT_FORMAT = 1
FILES = ("graph.json", "weights.safetensors", "meta.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where the C library or
    the file system does not offer it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def write_artifact(directory: str | Path, graph_json: dict, tensors: dict[str, torch.Tensor],
                   meta: dict) -> Path:
    target = Path(directory).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        # safetensors refuses aliased storage (tied embeddings): store each storage once.
        unique, aliases = {}, {}
        seen: dict[tuple, str] = {}
        for name, t in tensors.items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if key in seen:
                aliases[name] = seen[key]
            else:
                seen[key] = name
                unique[name] = t.detach().contiguous()
        save_file(unique, str(tmp / "weights.safetensors"))
        _write_json(tmp / "graph.json", graph_json)
        _write_json(tmp / "meta.json", {**meta, "tensor_aliases": aliases})
        manifest = {"format": ARTIFACT_FORMAT, "producer": "sagequant",
                    "files": {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size}
                              for f in FILES}}
        _write_json(tmp / "manifest.json", manifest)
        if target.exists() and _exchange(tmp, target):
            shutil.rmtree(tmp)  # it now holds the previous artifact
            return target
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, backup)
        try:
            os.rename(tmp, target)
        except BaseException:
            if backup is not None:  # put the previous artifact back where it was
                os.rename(backup, target)
            raise
        if backup is not None:
            shutil.rmtree(backup)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_artifact(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"artifact directory {str(d)!r} does not exist")
    manifest_path = d / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{str(d)!r} is not a sagequant artifact: manifest.json is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: corrupt manifest ({e})") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{manifest_path}: artifact format {manifest.get('format')!r}, "
                            f"this sagequant reads format {ARTIFACT_FORMAT}")
    for name in FILES:
        path = d / name
        expected = manifest.get("files", {}).get(name, {}).get("sha256")
        if not path.is_file():
            raise ArtifactError(f"artifact {str(d)!r} is missing {name}")
        if expected is None or _sha256(path) != expected:
            raise ArtifactError(f"checksum mismatch for {path}: the file was modified or truncated "
                                "after it was written; refusing to load it")
    try:
        graph_json = json.loads((d / "graph.json").read_text())
        meta = json.loads((d / "meta.json").read_text())
        # Copies: the file's tensors are only 8-byte aligned, and some CPU kernels round
        # differently on unaligned memory, which would break bit-identical reloads.
        tensors = {k: v.clone() for k, v in load_file(str(d / "weights.safetensors")).items()}
    except (json.JSONDecodeError, SafetensorError) as e:
        raise ArtifactError(f"artifact {str(d)!r} is corrupt: {e}") from None
    for alias, source in meta.pop("tensor_aliases", {}).items():
        tensors[alias] = tensors[source]
    return graph_json, tensors, meta
