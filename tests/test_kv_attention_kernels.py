"""Attention kernels over the paged KV cache: registry selection, clear errors, and the Triton
decode kernel against the reference math through Triton's interpreter (when triton is present)."""
import importlib.util
import os
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
    root = Path(__file__).resolve().parents[1]
    # PYTHONPATH: the script's own folder comes first on its path, not this checkout's package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "kv_attention_selfcheck.py"), "--interpret"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all passed" in run.stdout


def test_fresh_prefill_attention_equals_reference():
    """The CUDA prefill shortcut (causal SDPA over the k, v just written) computes what the
    reference computes from the cache, and steps it cannot serve are left to the reference."""
    from sagequant.backends.cuda.kv_attention import fresh_prefill_attention
    from sagequant.backends.reference.kv_attention import paged_attention_ref
    from sagequant.runtime.context import AttentionStep
    from sagequant.runtime.kv_pool import PagedKVPool
    g = torch.Generator().manual_seed(0)
    pool = PagedKVPool(KVQuantPlan("int8", block_size=16), ["none", "int8"], 2, 16, 4, 2,
                       torch.float32, torch.device("cpu"))
    q = torch.randn(2, 4, 10, 16, generator=g)
    k, v = torch.randn(2, 2, 10, 16, generator=g), torch.randn(2, 2, 10, 16, generator=g)
    for slot in (0, 1):
        pool.open(slot, 20)
    for layer in (0, 1):
        pool.write(layer, [0, 1], [0, 0], k, v)
    step = AttentionStep(pool, [0, 1], [0, 0], kernel=None, new_kv=(k, v))
    got = fresh_prefill_attention(q, step, 0, 0.3, 0)
    torch.testing.assert_close(got, paged_attention_ref(q, step, 0, 0.3, 0), rtol=1e-5, atol=1e-6)
    assert fresh_prefill_attention(q, step, 1, 0.3, 0) is None      # int8 layer: attends dequantized codes
    assert fresh_prefill_attention(q, step, 0, 0.3, 4) is None      # sliding window
    later = AttentionStep(pool, [0, 1], [0, 2], kernel=None, new_kv=(k, v))
    assert fresh_prefill_attention(q, later, 0, 0.3, 0) is None     # a chunk after cached tokens
