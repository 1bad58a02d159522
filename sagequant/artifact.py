"""Artifact directory: graph.json (the lowered graph, no pickle), weights.safetensors, meta.json
(config, annotations are in the graph, KV plan, report) and manifest.json (sha256 and size per
file, optionally an HMAC signature).

Writes go through safe_write.output_dir: everything goes to a temporary sibling directory, is
fsynced, and replaces the target atomically (one renameat2 swap on Linux), so a crash mid-save
(even kill -9) leaves the previous artifact intact; a directory holding files sagequant did not
write is refused unless overwrite=True. Loading checks the manifest (and the signature when
SAGEQUANT_ARTIFACT_KEY is set), then every size and checksum, then every meta.json field, before
the graph is rebuilt from its closed vocabulary (ir/graph_decode.py). SECURITY.md says what
loading guarantees.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ArtifactError
from .ir.vocabulary import GraphSerializationError, check_identifier, check_json_value, check_path
from .safe_write import output_dir

ARTIFACT_FORMAT = 1
FILES = ("graph.json", "weights.safetensors", "meta.json")
KEY_ENV = "SAGEQUANT_ARTIFACT_KEY"
SIGNATURE_ALG = "hmac-sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def file_sha256(path: Path) -> str:
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


def write_artifact(directory: str | Path, graph_json: dict, tensors: dict[str, torch.Tensor],
                   meta: dict, overwrite: bool = False) -> Path:
    """Write the artifact through safe_write.output_dir: atomic, and never over files sagequant
    did not write unless overwrite=True (then only its own files are replaced)."""
    with output_dir(directory, overwrite, what="artifact") as tmp:
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
                    "files": {f: {"sha256": file_sha256(tmp / f), "bytes": (tmp / f).stat().st_size}
                              for f in FILES}}
        key = signing_key()
        if key is not None:
            manifest["signature"] = {"alg": SIGNATURE_ALG, "value": _signature(manifest, key)}
        _write_json(tmp / "manifest.json", manifest)
    return Path(directory).absolute()


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
        if file_sha256(path) != entry["sha256"]:
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


# ---- meta.json: every field checked for type and value before anything uses it, so a
# malformed or hostile file is an ArtifactError naming the field, never an AttributeError later.
# (QuantConfig and KVQuantPlan validate their own values in from_dict; api.load calls them.)

META_FIELDS = ("config", "kv_plan", "model_info", "pass_history", "scheduler_ir", "report",
               "tensor_aliases")
OPTIONAL_META_FIELDS = ("pipeline",)  # absent from artifacts written before it was recorded
_MODEL_INFO_TYPES = {"architecture": str, "model_type": str, "source": str, "vocab_size": int,
                     "num_hidden_layers": int, "kv_layers": int, "hf_config": dict, "trace": str,
                     "trace_fallback": str}


def check_meta(meta, path: Path) -> dict:
    def bad(field: str, why: str) -> ArtifactError:
        return ArtifactError(f"{path}: field {field!r} {why}")
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    for name in META_FIELDS:
        if name not in meta:
            raise bad(name, "is missing")
    known = META_FIELDS + OPTIONAL_META_FIELDS
    unknown = [k for k in meta if k not in known]
    if unknown:
        raise bad(str(unknown[0])[:80], f"is not a meta.json field ({', '.join(known)})")
    if not isinstance(meta.get("pipeline"), (dict, type(None))):
        raise bad("pipeline", f"must be a JSON object or null, got {type(meta['pipeline']).__name__}")
    for name, kind in (("config", dict), ("kv_plan", dict), ("model_info", dict), ("report", dict),
                       ("tensor_aliases", dict), ("pass_history", list), ("scheduler_ir", list)):
        if not isinstance(meta[name], kind):
            raise bad(name, f"must be a JSON {'object' if kind is dict else 'list'}, got "
                            f"{type(meta[name]).__name__}")
    try:
        for name in known:
            check_json_value(meta.get(name), "meta.json", name)
        _check_model_info(meta["model_info"], bad)
        for i, entry in enumerate(meta["pass_history"]):
            _check_pass_entry(entry, f"pass_history[{i}]", bad)
        for alias, source in meta["tensor_aliases"].items():
            check_path(alias, "meta.json", "tensor_aliases key")
            check_path(source, "meta.json", f"tensor_aliases.{alias}")
    except GraphSerializationError as e:
        raise ArtifactError(f"{path}: {str(e).removeprefix('meta.json: ')}") from None
    return meta


def _check_model_info(info: dict, bad) -> None:
    for name, kind in _MODEL_INFO_TYPES.items():
        value = info.get(name)
        if value is None:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise bad(f"model_info.{name}", f"must be {kind.__name__}, got {type(value).__name__}")
        if kind is int and value < (1 if name == "vocab_size" else 0):
            raise bad(f"model_info.{name}", f"is {value}, out of range")
    if info.get("position_ids_node") is not None:
        check_identifier(info["position_ids_node"], "meta.json", "model_info.position_ids_node")


def _check_pass_entry(entry, field: str, bad) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("pass"), str):
        raise bad(field, "must be an object with a string 'pass'")
    seconds = entry.get("seconds", 0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise bad(f"{field}.seconds", "must be a number")
    if not isinstance(entry.get("stats", {}), (dict, type(None))):
        raise bad(f"{field}.stats", "must be an object")
