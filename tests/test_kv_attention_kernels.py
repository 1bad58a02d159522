"""Attention kernels over the paged KV cache: registry selection, clear errors, and the Triton
decode kernel against the reference math through Triton's interpreter (when triton is present)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sagequant.ir.kv_plan import KVQuantPlan
from sagequant.lowering.attention import select_attention_kernel
from sagequant.lowering.registry import KernelNotFoundError


def test_cpu_reference_is_selected_for_every_kv_dtype():
    for kv in ("none", "int8", "fp8"):
        assert select_attention_kernel(KVQuantPlan(kv), 80, "cpu").name == "cpu_paged_attention_ref"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")
def test_cuda_kernel_names_what_is_missing():
    with pytest.raises(KernelNotFoundError, match="head_dim 80 not in"):
        select_attention_kernel(KVQuantPlan("fp8"), 80, "cuda")
    with pytest.raises(KernelNotFoundError, match="no CUDA device"):
        select_attention_kernel(KVQuantPlan("fp8"), 64, "cuda")
    with pytest.raises(KernelNotFoundError, match="none registered"):
        select_attention_kernel(KVQuantPlan("fp8"), 64, "rocm")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_decode_kernel_in_interpreter():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "kv_attention_selfcheck.py"
    run = subprocess.run([sys.executable, str(script), "--interpret"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all passed" in run.stdout
