"""`sagequant engine start | list | stop` and `--engine vllm` as a user runs them: flag mapping,
artifact checks, background engines with stale pid files, and the vLLM command line (run against a
stand-in `vllm` executable that records its arguments)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

import sagequant as sq
from sagequant.serving.launch import QUANTIZATIONS, ServeOptions, ServingError, quant_config
from sagequant.serving.state import list_engines, write_entry
from sagequant.serving.vllm import check_available, missing_requirements, vllm_command
from sagequant.tools.cli import main


@pytest.fixture(scope="module")
def artifact(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny-w8a16"
    assert main(["compile", "--model", str(tiny_checkpoint), "--weight-dtype", "int8",
                 "--activation-dtype", "a16", "--group-size", "32", "--output", str(out)]) == 0
    return out


@pytest.mark.parametrize("name,scheme", [("int4", "W4A16"), ("int8", "W8A16"), ("w8a16", "W8A16"),
                                         ("fp8", "FP8-W8A16"), ("w8a8", "W8A8-INT8"), ("nf4", "NF4-A16")])
def test_quantization_flag_maps_to_scheme(name, scheme):
    cfg = quant_config(ServeOptions(model="m", quantization=name, kv_quant="fp8"))
    assert cfg.scheme == scheme and cfg.kv_cache_dtype == "fp8" and cfg.backend == "cpu"
    assert set(QUANTIZATIONS) == {"int4", "int8", "fp8", "w8a16", "w8a8", "nf4", "none"}


def test_quantization_none_keeps_every_layer_float(tiny):
    cm = sq.compile(tiny("llama"), quant_config(ServeOptions(model="m", quantization="none")))
    assert cm.report()["quantized_layers"] == 0 and cm.report()["kernels"] == {}
    with pytest.raises(sq.ConfigError, match="--quantization none keeps"):
        quant_config(ServeOptions(model="m", quantization="none", activation_dtype="fp8"))
    assert quant_config(ServeOptions(model="m", quantization="fp8", activation_dtype="fp8")).scheme == "W8A8-FP8"


def _run_cli(*argv, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "sagequant", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_artifact_flags_that_disagree_are_refused(artifact, capsys):
    assert main(["engine", "start", str(artifact), "--quantization", "int4", "--port", "0"]) == 2
    assert "was compiled as W8A16; --quantization int4 asks for W4A16" in capsys.readouterr().err
    assert main(["engine", "start", str(artifact), "--kv-quant", "fp8", "--port", "0"]) == 2
    assert "kv_cache_dtype='none'; --kv-quant fp8 differs" in capsys.readouterr().err
    assert main(["engine", "start", "/no/such/model", "--port", "0"]) == 2
    assert "--quantization is required" in capsys.readouterr().err


def test_tampered_artifact_is_refused_at_start(artifact, tmp_path, capsys):
    import shutil
    bad = tmp_path / "tampered"
    shutil.copytree(artifact, bad)
    weights = bad / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40
    weights.write_bytes(bytes(data))
    assert main(["engine", "start", str(bad), "--port", "0", "--state-dir", str(tmp_path / "s")]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").glob("*.json"))


def test_vllm_command_line():
    cmd = vllm_command("ckpt", served_model_name="m", host="127.0.0.1", port=8001,
                       kv_cache_dtype="fp8", max_model_len=4096, max_num_seqs=16)
    assert cmd == ["vllm", "serve", "ckpt", "--quantization", "compressed-tensors", "--host",
                   "127.0.0.1", "--port", "8001", "--served-model-name", "m", "--kv-cache-dtype",
                   "fp8", "--max-model-len", "4096", "--max-num-seqs", "16"]
    plain = vllm_command("ckpt", served_model_name="m", host="::1", port=1, kv_cache_dtype="none")
    assert "--kv-cache-dtype" not in plain and "--max-model-len" not in plain
    with pytest.raises(ServingError, match="--kv-quant int8 has no vLLM equivalent"):
        vllm_command("ckpt", served_model_name="m", host="h", port=1, kv_cache_dtype="int8")


def test_vllm_missing_pieces_are_named(monkeypatch):
    import sagequant.backends.export as export_mod
    monkeypatch.setattr(export_mod, "FORMATS", ("onnx", "tensorrt"))
    monkeypatch.setenv("PATH", "/nonexistent")
    missing = missing_requirements()
    assert any("compressed-tensors exporter" in m for m in missing)
    if not any("vLLM" in m for m in missing):
        pytest.skip("vllm is importable here")
    with pytest.raises(ServingError, match=r"vLLM \(not installed.*The command would be: vllm serve x"):
        check_available(["vllm", "serve", "x"])


def test_engine_vllm_hand_off_runs_vllm_serve(artifact, tmp_path):
    """Export to compressed-tensors and run `vllm serve` with matching flags; a stand-in vllm
    executable records the arguments and what it was given to load."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "vllm-args.json"
    fake = bin_dir / "vllm"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"d = sys.argv[2]\njson.dump({{'argv': sys.argv[1:], 'files': sorted(os.listdir(d))}}, "
                    f"open({str(record)!r}, 'w'))\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    ckpt = tmp_path / "ct"
    res = _run_cli("engine", "start", str(artifact), "--engine", "vllm", "--export-dir", str(ckpt),
                   "--port", "8123", "--max-batch", "4",
                   env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert res.returncode == 0, res.stderr
    got = json.loads(record.read_text())
    assert got["argv"] == ["serve", str(ckpt), "--quantization", "compressed-tensors", "--host",
                           "127.0.0.1", "--port", "8123", "--served-model-name", "tiny-w8a16",
                           "--max-num-seqs", "4"]
    assert {"config.json", "tokenizer.json"} <= set(got["files"])
    qcfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"


def test_vllm_not_installed_fails_before_compiling(tmp_path):
    res = _run_cli("engine", "start", "smollm2", "--quantization", "int4", "--engine", "vllm",
                   env={"PATH": os.path.dirname(sys.executable)}, timeout=120)
    if "vllm" in res.stdout:
        pytest.skip("vllm is installed here")
    assert res.returncode == 2
    assert "cannot hand off to vLLM: missing vLLM (not installed" in res.stderr
    assert "--quantization compressed-tensors" in res.stderr  # the command it would have run


def test_missing_server_package_is_named_before_the_model_loads(monkeypatch, tmp_path):
    import importlib.util
    from sagequant.serving import launch
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    # a model path that does not exist: reaching the loader would raise a different error
    with pytest.raises(ServingError, match=r"engine start needs fastapi .*pip install fastapi"):
        launch.build_server(ServeOptions(model=str(tmp_path / "absent"), quantization="int8"))


def test_stale_entries_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_entry(tmp_path, {"id": "gone-1", "pid": dead.pid})
    write_entry(tmp_path, {"id": "not-ours-2", "pid": os.getppid()})  # alive, but not sagequant
    (tmp_path / "garbage-3.json").write_text("{not json")
    running, stale = list_engines(tmp_path)
    assert running == [] and sorted(e["id"] for e in stale) == ["garbage-3", "gone-1", "not-ours-2"]
    assert list(tmp_path.glob("*.json")) == []
    assert main(["engine", "stop", "gone-1", "--state-dir", str(tmp_path)]) == 2
    assert main(["engine", "stop", "--state-dir", str(tmp_path)]) == 2  # needs an id or --all


def test_background_engine_start_list_stop(artifact, tmp_path, capsys):
    state = tmp_path / "state"
    res = _run_cli("engine", "start", str(artifact), "--background", "--port", "0",
                   "--state-dir", str(state), "--max-seq-len", "64", "--start-timeout", "200")
    assert res.returncode == 0, res.stdout + res.stderr
    (entry,), _ = list_engines(state)
    assert entry["host"] == "127.0.0.1" and entry["id"] == f"tiny-w8a16-{entry['port']}"
    body = json.dumps({"model": "tiny-w8a16", "prompt": "hi", "max_tokens": 3}).encode()
    req = urllib.request.Request(entry["url"] + "/v1/completions", body,
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.read())["usage"]["completion_tokens"] == 3
    assert main(["engine", "list", "--state-dir", str(state)]) == 0
    assert entry["id"] in capsys.readouterr().out
    assert main(["engine", "stop", entry["id"], "--state-dir", str(state)]) == 0
    assert f"stopped {entry['id']}" in capsys.readouterr().out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(entry["pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    assert list_engines(state) == ([], [])
    main(["engine", "list", "--state-dir", str(state)])
    assert "no engines running" in capsys.readouterr().out
