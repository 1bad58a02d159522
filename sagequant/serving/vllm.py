"""`sagequant engine start --engine vllm`: hand the compiled model to vLLM for serving at scale.

The artifact is exported as a compressed-tensors checkpoint directory (config.json with its
quantization_config, safetensors weights, tokenizer files), which vLLM loads natively; then
`vllm serve` runs on it with flags matching the compiled config. vLLM's own KV-cache options are
fp8 (and auto); an int8 KV cache has no vLLM equivalent and is refused.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from .launch import ServingError

_VLLM_KV_DTYPES = {"none": None, "fp8": "fp8"}


def vllm_command(checkpoint_dir: str | Path, *, served_model_name: str, host: str, port: int,
                 kv_cache_dtype: str, max_model_len: int | None = None,
                 max_num_seqs: int | None = None, executable: str = "vllm") -> list[str]:
    """The `vllm serve` command line for a compressed-tensors checkpoint directory."""
    if kv_cache_dtype not in _VLLM_KV_DTYPES:
        raise ServingError(f"--kv-quant {kv_cache_dtype} has no vLLM equivalent (vLLM's "
                           "--kv-cache-dtype takes fp8 or auto); use --kv-quant fp8 or none, or "
                           "the sagequant engine")
    cmd = [executable, "serve", str(checkpoint_dir), "--quantization", "compressed-tensors",
           "--host", host, "--port", str(port), "--served-model-name", served_model_name]
    if _VLLM_KV_DTYPES[kv_cache_dtype]:
        cmd += ["--kv-cache-dtype", _VLLM_KV_DTYPES[kv_cache_dtype]]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    return cmd


def missing_requirements() -> list[str]:
    """What this machine lacks to hand off to vLLM (empty when everything is there)."""
    from ..backends.export import FORMATS
    missing = []
    if "compressed-tensors" not in FORMATS:
        missing.append("the compressed-tensors exporter (backends/export.py formats: "
                       f"{', '.join(FORMATS)})")
    if shutil.which("vllm") is None and importlib.util.find_spec("vllm") is None:
        missing.append("vLLM (not installed: `pip install vllm` on a machine with a supported GPU)")
    return missing


def check_available(command: list[str]) -> None:
    missing = missing_requirements()
    if missing:
        raise ServingError("cannot hand off to vLLM: missing " + "; ".join(missing)
                           + ". The command would be: " + " ".join(command))


def export_for_vllm(compiled, tokenizer, checkpoint_dir: str | Path, overwrite: bool = False) -> Path:
    return Path(compiled.export(checkpoint_dir, format="compressed-tensors", tokenizer=tokenizer,
                                overwrite=overwrite))
