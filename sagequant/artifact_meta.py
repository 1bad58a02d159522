"""meta.json of an artifact: every field checked for type and value before anything uses it, so
a malformed or hostile file is an ArtifactError naming the field, never an AttributeError later.
(QuantConfig and KVQuantPlan validate their own values in from_dict; api.load calls them.)"""
from __future__ import annotations

from pathlib import Path

from .errors import ArtifactError
from .ir.vocabulary import GraphSerializationError, check_identifier, check_json_value, check_path

META_FIELDS = ("config", "kv_plan", "model_info", "pass_history", "scheduler_ir", "report",
               "tensor_aliases")
_MODEL_INFO_TYPES = {"architecture": str, "model_type": str, "source": str, "vocab_size": int,
                     "num_hidden_layers": int, "kv_layers": int, "hf_config": dict}


def check_meta(meta, path: Path) -> dict:
    def bad(field: str, why: str) -> ArtifactError:
        return ArtifactError(f"{path}: field {field!r} {why}")
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    for name in META_FIELDS:
        if name not in meta:
            raise bad(name, "is missing")
    unknown = [k for k in meta if k not in META_FIELDS]
    if unknown:
        raise bad(str(unknown[0])[:80], f"is not a meta.json field ({', '.join(META_FIELDS)})")
    for name, kind in (("config", dict), ("kv_plan", dict), ("model_info", dict), ("report", dict),
                       ("tensor_aliases", dict), ("pass_history", list), ("scheduler_ir", list)):
        if not isinstance(meta[name], kind):
            raise bad(name, f"must be a JSON {'object' if kind is dict else 'list'}, got "
                            f"{type(meta[name]).__name__}")
    try:
        for name in META_FIELDS:
            check_json_value(meta[name], "meta.json", name)
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
