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
import hmac
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ArtifactError

from .artifact_meta import check_meta

ARTIFACT_FORMAT = 1
FILES = ("graph.json", "weights.safetensors", "meta.json")
KEY_ENV = "SAGEQUANT_ARTIFACT_KEY"
SIGNATURE_ALG = "hmac-sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


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
        key = signing_key()
        if key is not None:
            manifest["signature"] = {"alg": SIGNATURE_ALG, "value": _signature(manifest, key)}
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


def _signature(manifest: dict, key: bytes) -> str:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return hmac.new(key, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(),
                    hashlib.sha256).hexdigest()


def signing_key() -> bytes | None:
    """The user's HMAC key (env SAGEQUANT_ARTIFACT_KEY), or None: artifacts are then unsigned."""
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


def _check_manifest(manifest, path: Path) -> dict:
    def bad(field: str, why: str) -> ArtifactError:
        return ArtifactError(f"{path}: field {field!r} {why}")
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: must hold a JSON object, got {type(manifest).__name__}")
    unknown = set(manifest) - {"format", "producer", "files", "signature"}
    if unknown:
        raise bad(sorted(unknown)[0], "is not a manifest field (format, producer, files, signature)")
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path}: artifact format {manifest.get('format')!r}, "
                            f"this sagequant reads format {ARTIFACT_FORMAT}")
    if manifest.get("producer") != "sagequant":
        raise bad("producer", f"is {manifest.get('producer')!r}, not 'sagequant'")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(FILES):
        raise bad("files", f"must list exactly {', '.join(FILES)}")
    for name, entry in files.items():
        if not isinstance(entry, dict) or set(entry) != {"sha256", "bytes"}:
            raise bad(f"files.{name}", "must be an object with sha256 and bytes")
        if not isinstance(entry["sha256"], str) or not _HEX64.match(entry["sha256"]):
            raise bad(f"files.{name}.sha256", "is not a 64-digit hex sha256")
        if isinstance(entry["bytes"], bool) or not isinstance(entry["bytes"], int) or entry["bytes"] < 0:
            raise bad(f"files.{name}.bytes", "is not a non-negative integer")
    signature = manifest.get("signature")
    if signature is not None and (not isinstance(signature, dict) or signature.get("alg") != SIGNATURE_ALG
                                  or not isinstance(signature.get("value"), str) or set(signature) != {"alg", "value"}):
        raise bad("signature", f"must be {{\"alg\": \"{SIGNATURE_ALG}\", \"value\": hex}}")
    return manifest


def _verify_signature(manifest: dict, path: Path) -> None:
    key, signature = signing_key(), manifest.get("signature")
    if key is None:
        return  # nothing to check against; loading is safe without it (SECURITY.md)
    if signature is None:
        raise ArtifactError(f"{path}: the artifact is not signed, and {KEY_ENV} is set, so only "
                            "artifacts signed with that key are loaded; re-save it with the key set")
    if not hmac.compare_digest(signature["value"], _signature(manifest, key)):
        raise ArtifactError(f"{path}: field 'signature' does not match: the artifact was modified "
                            f"after it was signed, or signed with a different {KEY_ENV}")


def read_artifact(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"artifact directory {str(d)!r} does not exist")
    manifest_path = d / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(f"{str(d)!r} is not a sagequant artifact: manifest.json is missing")
    manifest = _check_manifest(_read_json(manifest_path, "corrupt manifest"), manifest_path)
    _verify_signature(manifest, manifest_path)
    for name in FILES:
        path, entry = d / name, manifest["files"][name]
        if not path.is_file():
            raise ArtifactError(f"artifact {str(d)!r} is missing {name}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ArtifactError(f"{path} is {size} bytes, the manifest says {entry['bytes']}: the file "
                                "was truncated or modified after it was written; refusing to load it")
        if _sha256(path) != entry["sha256"]:
            raise ArtifactError(f"checksum mismatch for {path}: the file was modified or truncated "
                                "after it was written; refusing to load it")
    graph_json = _read_json(d / "graph.json", "corrupt graph")
    meta = check_meta(_read_json(d / "meta.json", "corrupt metadata"), d / "meta.json")
    try:
        # Copies: the file's tensors are only 8-byte aligned, and some CPU kernels round
        # differently on unaligned memory, which would break bit-identical reloads.
        tensors = {k: v.clone() for k, v in load_file(str(d / "weights.safetensors")).items()}
    except SafetensorError as e:
        raise ArtifactError(f"{d / 'weights.safetensors'} is corrupt: {e}") from None
    for alias, source in meta.pop("tensor_aliases").items():
        if source not in tensors:
            raise ArtifactError(f"{d / 'meta.json'}: field 'tensor_aliases.{alias}' names tensor "
                                f"{source!r}, which weights.safetensors does not hold")
        tensors[alias] = tensors[source]
    return graph_json, tensors, meta


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ArtifactError(f"{path}: {what} ({type(e).__name__}: {str(e)[:200]})") from None
