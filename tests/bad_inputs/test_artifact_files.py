"""Catalogue, artifacts I: the files themselves (missing, truncated, corrupt, wrong version, a
malformed manifest) and HMAC signing. Every case is an ArtifactError naming the file and field."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

import sagequant as sq

from bad_input_tools import rehash, tamper

KEY = "SAGEQUANT_ARTIFACT_KEY"


def test_missing_directory(tmp_path):
    with pytest.raises(sq.ArtifactError, match="does not exist"):
        sq.load(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["manifest.json", "graph.json", "weights.safetensors", "meta.json"])
def test_missing_file(art, refused, name):
    (art / name).unlink()
    refused(name)


MANIFEST_EDITS = {
    "fields wiped": (lambda m: m.clear() or m.update({"files": []}), "format None"),
    "format 99": (lambda m: m.update(format=99), "format 99"),
    "format as text": (lambda m: m.update(format="1"), "format '1'"),
    "foreign producer": (lambda m: m.update(producer="other-tool"), "'producer'"),
    "a file left out": (lambda m: m["files"].pop("graph.json"), "'files'"),
    "an extra file": (lambda m: m["files"].update({"x.py": {"sha256": "0" * 64, "bytes": 1}}), "'files'"),
    "digest not hex": (lambda m: m["files"]["meta.json"].update(sha256="zz" * 32), "'files.meta.json.sha256'"),
    "size negative": (lambda m: m["files"]["graph.json"].update(bytes=-1), "'files.graph.json.bytes'"),
    "size as text": (lambda m: m["files"]["graph.json"].update(bytes="10"), "'files.graph.json.bytes'"),
    "unknown field": (lambda m: m.update(loader="evil"), "'loader'"),
    "bad signature shape": (lambda m: m.update(signature="abc"), "'signature'"),
}


@pytest.mark.parametrize("case", list(MANIFEST_EDITS))
def test_malformed_manifest(art, refused, case):
    edit, words = MANIFEST_EDITS[case]
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))
    refused("manifest.json", words)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe binary", ""])
def test_manifest_not_a_json_object(art, refused, text):
    (art / "manifest.json").write_bytes(text.encode("latin-1"))
    refused("manifest.json")


@pytest.mark.parametrize("name", ["weights.safetensors", "graph.json", "meta.json"])
def test_truncated_file_is_named(art, refused, name):
    data = (art / name).read_bytes()
    (art / name).write_bytes(data[: len(data) // 3])
    refused(name, "truncated")


@pytest.mark.parametrize("name", ["weights.safetensors", "graph.json", "meta.json"])
def test_flipped_byte_fails_the_checksum(art, refused, name):
    data = bytearray((art / name).read_bytes())
    data[len(data) // 2] ^= 0x20
    (art / name).write_bytes(bytes(data))
    refused(name, "checksum")


@pytest.mark.parametrize("name, content, words", [
    ("graph.json", b"{not json", "corrupt graph"),
    ("meta.json", b"[]", "must hold a JSON object"),
    ("weights.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "weights.safetensors is corrupt"),
    ("graph.json", b"[" * 100000 + b"]" * 100000, "graph"),  # nesting bomb: no RecursionError escapes
])
def test_corrupt_content_with_a_valid_checksum(art, refused, name, content, words):
    (art / name).write_bytes(content)
    rehash(art)
    refused(name.split(".")[0], words)


def test_hostile_tensor_name_in_the_weights_file(art, refused):
    tensors = load_file(str(art / "weights.safetensors"))
    tensors["model.__class__"] = next(iter(tensors.values())).clone()
    save_file(tensors, str(art / "weights.safetensors"))
    rehash(art)
    refused("weights.safetensors", "tensor name", "__class__")


# ---- signing -------------------------------------------------------------------------------------

@pytest.fixture
def signed(compiled, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY, "key-one")
    return compiled("llama", group_size=32).save(tmp_path / "signed")


def test_signed_artifact_loads_with_and_without_the_key(signed, monkeypatch):
    assert json.loads((signed / "manifest.json").read_text())["signature"]["alg"] == "hmac-sha256"
    sq.load(signed)
    monkeypatch.delenv(KEY)
    sq.load(signed)  # safety does not depend on the signature: the vocabulary checks still run


def test_key_set_refuses_an_unsigned_artifact(art, refused, monkeypatch):
    monkeypatch.setenv(KEY, "key-one")
    refused("manifest.json", "not signed", KEY)


def test_signed_artifact_edited_and_rehashed_is_refused(signed, monkeypatch):
    tamper(signed, "meta.json", lambda m: m["model_info"].update(source="elsewhere"))
    with pytest.raises(sq.ArtifactError, match="'signature' does not match"):
        sq.load(signed)


def test_signature_from_another_key_is_refused(signed, monkeypatch):
    monkeypatch.setenv(KEY, "key-two")
    with pytest.raises(sq.ArtifactError, match="signature' does not match.*different"):
        sq.load(signed)


def test_copied_artifact_keeps_its_signature(signed, tmp_path):
    copy = shutil.copytree(signed, tmp_path / "copy")
    sq.load(copy)
