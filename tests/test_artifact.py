"""Artifact save/load: bit-exact round trips, metadata that survives, atomic replacement, and
clear ArtifactErrors for missing, tampered or truncated files. No pickle anywhere."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import sagequant as sq
import sagequant.artifact as artifact
import sagequant.safe_write as safe_write
from sagequant.safe_write import OutputPathError

FILES = {"graph.json", "weights.safetensors", "meta.json", "manifest.json"}
CONFIGS = {
    "w4a16": dict(group_size=32),
    "w8a16": dict(weight_dtype="int8", group_size=None),
    "w4a16-asym": dict(group_size=32, symmetric=False),
}


def _logits_equal(a, b, eval_ids):
    # Single-token inputs (one GEMV row) are covered by test_single_token_round_trip below.
    for ids in (eval_ids, eval_ids[:, :1], torch.arange(20).view(1, 20)):
        assert torch.equal(a(ids), b(ids))


def _leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("which", list(CONFIGS))
def test_round_trip_bit_identical(compiled, helpers, eval_ids, tmp_path, which):
    cm = compiled("llama", helpers.RAGGED, **CONFIGS[which])
    out = cm.save(tmp_path / "art")
    assert out == (tmp_path / "art").absolute()
    loaded = sq.load(tmp_path / "art")
    _logits_equal(cm, loaded, eval_ids)
    assert loaded.config == cm.config
    assert loaded.graph.op_counts() == cm.graph.op_counts()
    assert loaded.graph.format() == cm.graph.format()
    assert loaded.kernel_bindings == cm.kernel_bindings
    assert loaded.scheduler_ir == cm.scheduler_ir
    assert loaded.calibration_records == cm.calibration_records
    assert loaded.kv_plan.to_dict() == cm.kv_plan.to_dict()
    assert json.loads(json.dumps(loaded.report(), default=str)) == \
        json.loads(json.dumps(cm.report(), default=str))
    # A loaded artifact saves again to the same bytes of weights and graph.
    loaded.save(tmp_path / "again")
    for f in ("graph.json", "weights.safetensors"):
        assert (tmp_path / "art" / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


def test_single_token_round_trip(compiled, helpers, tmp_path):
    mismatched = []
    for which, cfg in CONFIGS.items():
        for model_kw in ({}, helpers.RAGGED):
            cm = compiled("llama", model_kw, **cfg)
            d = cm.save(tmp_path / f"{which}-{len(model_kw)}")
            loaded = sq.load(d)
            for token in range(0, 128, 9):
                ids = torch.tensor([[token]])
                if not torch.equal(cm(ids), loaded(ids)):
                    mismatched.append((which, bool(model_kw), token))
    assert mismatched == []


@pytest.mark.parametrize("arch", ["gpt2", "gemma3"])
def test_round_trip_tied_embeddings(compiled, eval_ids, tmp_path, arch):
    cm = compiled(arch, group_size=32)
    cm.save(tmp_path / arch)
    _logits_equal(cm, sq.load(tmp_path / arch), eval_ids)


def test_artifact_contents_are_not_pickle(compiled, tmp_path):
    cm = compiled("llama", group_size=32)
    d = cm.save(tmp_path / "art")
    assert {p.name for p in d.iterdir()} == FILES
    for p in d.rglob("*"):
        assert p.suffix not in (".pt", ".pth", ".bin", ".pkl", ".pickle")
        assert not p.read_bytes().startswith(b"\x80")  # pickle protocol 2+ header
    graph = json.loads((d / "graph.json").read_text())
    assert graph["format"] == 1 and graph["nodes"]
    ops = {n["target"]["op"] for n in graph["nodes"]
           if n["op"] == "call_function" and "op" in n["target"]}
    assert "sagequant.weight_only_linear_ref.default" in ops
    annotated = [n for n in graph["nodes"] if "annotation" in n]
    assert len(annotated) == 15
    manifest = json.loads((d / "manifest.json").read_text())
    assert set(manifest["files"]) == FILES - {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (d / name).stat().st_size and len(entry["sha256"]) == 64
    tensors = load_file(str(d / "weights.safetensors"))
    q = tensors["model.model.layers.0.mlp.down_proj.qweight"]
    assert q.dtype == torch.uint8 and q.shape == (64, 48)
    assert "model.model.layers.0.mlp.down_proj.weight" not in tensors
    meta = json.loads((d / "meta.json").read_text())
    assert meta["scheduler_ir"] == cm.scheduler_ir


def test_save_over_existing_replaces_atomically(compiled, eval_ids, tmp_path):
    w4, w8 = compiled("llama", group_size=32), compiled("llama", weight_dtype="int8", group_size=None)
    target = tmp_path / "art"
    w4.save(target)
    w8.save(target)  # a previous artifact (all its files ours): replaced as a whole
    loaded = sq.load(target)
    assert loaded.config.scheme == "W8A16"
    _logits_equal(w8, loaded, eval_ids)
    assert _leftovers(tmp_path, "art") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_save_never_deletes_a_file_it_did_not_write(compiled, tmp_path):
    w4, w8 = compiled("llama", group_size=32), compiled("llama", weight_dtype="int8", group_size=None)
    target = tmp_path / "art"
    w4.save(target)
    (target / "notes.txt").write_text("the user's own notes")
    with pytest.raises(OutputPathError, match="notes.txt.*--overwrite"):
        w8.save(target)
    assert sq.load(target).config.scheme == "W4A16"
    w8.save(target, overwrite=True)  # only sagequant's files are replaced
    assert sq.load(target).config.scheme == "W8A16"
    assert (target / "notes.txt").read_text() == "the user's own notes"
    assert _leftovers(tmp_path, "art") == []


@pytest.fixture
def saved(compiled, tmp_path):
    return compiled("llama", group_size=32).save(tmp_path / "art")


def test_missing_dir(tmp_path):
    with pytest.raises(sq.ArtifactError, match="does not exist"):
        sq.load(tmp_path / "nope")


def test_missing_manifest(saved):
    (saved / "manifest.json").unlink()
    with pytest.raises(sq.ArtifactError, match="manifest.json is missing"):
        sq.load(saved)


def test_missing_file(saved):
    (saved / "meta.json").unlink()
    with pytest.raises(sq.ArtifactError, match="missing meta.json"):
        sq.load(saved)


@pytest.mark.parametrize("name", ["weights.safetensors", "graph.json", "meta.json"])
def test_flipped_byte_is_checksum_error(saved, name):
    path = saved / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(sq.ArtifactError, match="checksum") as info:
        sq.load(saved)
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["weights.safetensors", "graph.json"])
def test_truncated_file(saved, name):
    path = saved / name
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(sq.ArtifactError, match="truncated"):
        sq.load(saved)


def test_corrupt_manifest_and_wrong_format(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    (saved / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(sq.ArtifactError, match="format 99"):
        sq.load(saved)
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(sq.ArtifactError, match="corrupt manifest"):
        sq.load(saved)


def test_failed_save_keeps_previous_artifact(compiled, saved, eval_ids, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    real_save = artifact.save_file

    def half_then_fail(tensors, filename, *args, **kwargs):
        real_save(dict(list(tensors.items())[:3]), filename)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        compiled("llama", weight_dtype="int8", group_size=None).save(saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert _leftovers(saved.parent, saved.name) == []
    loaded = sq.load(saved)
    assert loaded.config.scheme == "W4A16"
    _logits_equal(compiled("llama", group_size=32), loaded, eval_ids)


def test_failed_json_write_keeps_previous_artifact(compiled, saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def bad_dump(*args, **kwargs):
        raise ValueError("Out of range float values are not JSON compliant")

    monkeypatch.setattr(artifact.json, "dump", bad_dump)
    with pytest.raises(ValueError):
        compiled("llama", weight_dtype="int8", group_size=None).save(saved)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert _leftovers(saved.parent, saved.name) == []


def test_failed_final_rename_keeps_previous_artifact(compiled, saved, monkeypatch):
    real_rename = os.rename

    def rename(src, dst):
        if ".sagequant-tmp-" in str(src):  # moving the finished temp dir into place
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(safe_write.os, "rename", rename)
    monkeypatch.setattr(safe_write, "_exchange", lambda a, b: False)  # the two-rename path (no renameat2)
    with pytest.raises(OSError):
        compiled("llama", weight_dtype="int8", group_size=None).save(saved)
    monkeypatch.undo()
    assert sq.load(saved).config.scheme == "W4A16"


def _rewrite(d, name, edit):
    """Edit one file of an artifact and re-sign the manifest, as a newer/foreign producer would."""
    import hashlib
    data = json.loads((d / name).read_text())
    edit(data)
    (d / name).write_text(json.dumps(data))
    manifest = json.loads((d / "manifest.json").read_text())
    for f, entry in manifest["files"].items():
        entry["sha256"] = hashlib.sha256((d / f).read_bytes()).hexdigest()
        entry["bytes"] = (d / f).stat().st_size
    (d / "manifest.json").write_text(json.dumps(manifest))


def _retarget_kernel(target):
    def edit(graph):
        node = next(n for n in graph["nodes"] if n["op"] == "call_function"
                    and n["target"].get("op") == "sagequant.weight_only_linear_ref.default")
        node["target"] = target
    return edit


def test_meta_without_config_is_artifact_error(saved):
    _rewrite(saved, "meta.json", lambda meta: meta.pop("config"))
    with pytest.raises(sq.ArtifactError, match="meta.json: field 'config' is missing"):
        sq.load(saved)


@pytest.mark.parametrize("target, words", [
    ({"op": "sagequant.marlin_w4a16.default"}, "sagequant.marlin_w4a16.default is not registered"),
    ({"py": "os.system"}, "not in the allow-list"),
])
def test_graph_with_foreign_call_target_is_refused(saved, target, words):
    _rewrite(saved, "graph.json", _retarget_kernel(target))
    with pytest.raises((sq.ArtifactError, ValueError), match=words):
        sq.load(saved)


def test_graph_from_incompatible_build_is_artifact_error(saved):
    _rewrite(saved, "graph.json", _retarget_kernel({"op": "sagequant.marlin_w4a16.default"}))
    with pytest.raises(sq.ArtifactError, match=str(saved)):
        sq.load(saved)
