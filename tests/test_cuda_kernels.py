"""CUDA backend on a CPU machine: the module imports without a GPU or triton, the registry rows
carry their constraints, selecting them here fails naming the kernel and the missing hardware,
and the pure-Python planning (choose(), split-K, scale layouts, tinygemm packing) is right.
With triton installed, the kernels themselves run through Triton's CPU interpreter."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
import torch

import sagequant
from sagequant.backends.cuda import hardware, kernels, layout
from sagequant.ir.quant_spec import QuantSpec, dequantize, quantize
from sagequant.lowering.registry import REGISTRY, KernelNotFoundError

G128 = QuantSpec("int4", "per_group", 128, True, "fp16")
QWEN2_7B = {"q_o": (3584, 3584), "k_v": (512, 3584), "gate_up": (37888, 3584),
            "down": (3584, 18944)}
ROWS = {  # scheme -> (kernel, weight formats, op, activation_quant)
    "W4A16": ("cuda_w4a16_triton", ("int4", "uint4"), kernels.WO_OP, False),
    "W8A16": ("cuda_w8a16_triton", ("int8", "uint8"), kernels.WO_OP, False),
    "FP8-W8A16": ("cuda_fp8_w8a16_triton", ("fp8_e4m3", "fp8_e5m2"), kernels.WO_OP, False),
    "W8A8-FP8": ("cuda_w8a8_fp8_scaled_mm", ("fp8_e4m3",), kernels.FP8_OP, True),
    "W8A8-INT8": ("cuda_w8a8_int8_triton", ("int8",), kernels.INT8_OP, True),
}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU errors")


def test_imports_without_triton_or_gpu():
    code = ("import sys, sagequant, sagequant.backends.cuda.kernels; "
            "assert 'triton' not in sys.modules, 'triton imported at module import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("scheme", sorted(ROWS))
@pytest.mark.parametrize("priority", ["latency", "throughput", "memory"])
def test_registry_rows(scheme, priority):
    name, formats, op, act = ROWS[scheme]
    (row,) = REGISTRY.candidates(scheme, "cuda", priority)
    assert (row.name, row.formats, row.activation_quant) == (name, formats, act)
    assert row.op is getattr(torch.ops.sagequant, op).default
    if scheme == "W8A8-FP8":  # torch._scaled_mm: per-tensor / per-channel weight scales only
        assert row.granularities == ("per_tensor", "per_channel") and row.k_multiple == 16
    else:
        assert row.group_sizes and all(g & (g - 1) == 0 for g in row.group_sizes)


def test_row_constraints_say_why():
    fp8, int8, w4 = kernels.W8A8_FP8, kernels.W8A8_INT8, kernels.W4A16
    assert "per_group" in fp8.rejects(QuantSpec("fp8_e4m3", "per_group", 128), 4096)
    assert "multiple of 16" in fp8.rejects(QuantSpec("fp8_e4m3", "per_channel"), 4008)
    assert "uint8" in int8.rejects(QuantSpec("uint8", "per_channel", symmetric=False), 4096)
    assert "group_size 100" in w4.rejects(QuantSpec("int4", "per_group", 100), 4096)
    assert "group_size 16" in int8.rejects(QuantSpec("int8", "per_group", 16), 4096)


@no_gpu
@pytest.mark.parametrize("scheme", sorted(ROWS))
def test_select_on_cpu_names_kernel_and_hardware(scheme):
    name, formats, _, _ = ROWS[scheme]
    spec = QuantSpec(formats[0], "per_channel", None, True)
    with pytest.raises(KernelNotFoundError) as err:
        REGISTRY.select(scheme, "cuda", "latency", spec, 4096, layer="model.layers.0.mlp.up_proj")
    msg = str(err.value)
    assert name in msg and "no CUDA device" in msg and "up_proj" in msg and "fallback" in msg


@no_gpu
def test_explicit_fallback_to_cpu_is_recorded():
    kernel, fallback_from = REGISTRY.select("W4A16", "cuda", "latency", G128, 4096, layer="l",
                                            fallback="cpu")
    assert kernel.backend == "cpu" and fallback_from == "cuda"


@no_gpu
def test_compile_for_cuda_on_cpu_fails_clearly(tiny, calib_ids):
    cfg = sagequant.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=32,
                                backend="cuda")
    with pytest.raises(KernelNotFoundError, match="cuda_w4a16_triton: no CUDA device"):
        sagequant.compile(tiny("llama"), cfg, calibration_data=calib_ids)


def test_capability_and_triton_reasons(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FakeA100")
    assert kernels.W8A8_FP8.available() == (
        "needs compute capability >= 8.9 for FP8 tensor cores (torch._scaled_mm); FakeA100 has 8.0")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    assert "triton package is not installed" in kernels.W4A16.available()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert "needs compute capability >= 8.0" in kernels.W8A8_INT8.available()


def test_ops_refuse_cpu_tensors():
    qt = quantize(torch.randn(32, 64), G128.__class__("int4", "per_group", 32))
    with pytest.raises(RuntimeError, match="cuda_weight_only_linear runs on CUDA tensors"):
        torch.ops.sagequant.cuda_weight_only_linear(torch.randn(2, 64), qt.data, qt.scale, None,
                                                    None, qt.spec.encode(), [32, 64])


def test_fake_kernels_give_output_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 5, 64, dtype=torch.bfloat16)
        w = torch.empty(48, 32, dtype=torch.uint8)
        out = torch.ops.sagequant.cuda_weight_only_linear(x, w, torch.empty(48, 2), None, None,
                                                          G128.encode(), [48, 64])
        assert out.shape == (2, 5, 48) and out.dtype == torch.bfloat16


# --- choose(): thresholds and plans ---------------------------------------------------------

def test_choose_thresholds():
    assert layout.path_for(1) == "gemv"
    assert layout.path_for(layout.GEMV_MAX_M + 1) == "splitk"
    assert layout.path_for(layout.SPLITK_MAX_M) == "splitk"
    assert layout.path_for(layout.SPLITK_MAX_M + 1) == "tiled"
    assert layout.path_for(layout.DEQUANT_MM_MIN_M - 1) == "tiled"
    assert layout.path_for(layout.DEQUANT_MM_MIN_M) == "dequant_mm"
    with pytest.raises(ValueError, match="M must be >= 1"):
        layout.path_for(0)
    with pytest.raises(ValueError, match="unknown weight-only path"):
        layout.plan_for("magic", 1, 64, 64, bits=4, group=128)


@pytest.mark.parametrize("shape", sorted(QWEN2_7B))
@pytest.mark.parametrize("group", [32, 128, layout.BIG_GROUP])
def test_plans_are_valid(shape, group):
    n, k = QWEN2_7B[shape]
    for m in (1, 8, 16, 64, 256, 1024, 4096):
        plan = layout.choose(m, n, k, bits=4, group=group, sm_count=132)
        if plan.path == "dequant_mm":
            rows = plan.chunk_n or n
            assert rows % 128 == 0 or rows == n
            continue
        bk = plan.block_k
        assert bk >= 16 and bk & (bk - 1) == 0 and group % bk == 0  # a K block in one group
        per, splits = layout.k_blocks_per_split(k, bk, plan.split_k)
        blocks = math.ceil(k / bk)
        assert splits >= 1 and (splits - 1) * per < blocks <= splits * per  # no empty split
        if plan.path != "gemv":
            assert plan.block_m >= 16 and plan.block_n >= 16  # tl.dot minimums


def test_small_m_fills_the_gpu():
    for n, k in QWEN2_7B.values():
        plan = layout.choose(1, n, k, bits=4, group=128, sm_count=132)
        programs = math.ceil(n / plan.block_n) * plan.split_k
        most = max(1, math.ceil(k / plan.block_k) // layout.MIN_K_BLOCKS_PER_SPLIT)
        assert programs >= 132 or plan.split_k == most


def test_dequant_chunks():
    assert layout.dequant_chunk_rows(3584, 3584, 64 << 20) == 0  # 25.7 MB: one chunk
    rows = layout.dequant_chunk_rows(37888, 3584, 32 << 20)
    assert rows % 128 == 0 and 2 * rows * 3584 <= (32 << 20) * 1.1
    assert math.ceil(37888 / rows) == math.ceil(2 * 37888 * 3584 / (32 << 20))


# --- scale layouts ---------------------------------------------------------------------------

def test_scale_strides_and_groups():
    assert layout.scale_strides(torch.ones(48, 7), 48) == (7, 1)
    assert layout.scale_strides(torch.ones(48, 1), 48) == (1, 0)
    assert layout.scale_strides(torch.ones(1, 1), 48) == (0, 0)
    assert layout.kernel_group(QuantSpec("int8", "per_channel"), 4096) == layout.BIG_GROUP
    assert layout.kernel_group(G128, 4096) == 128
    assert "power of two" in layout.group_rejects(QuantSpec("int4", "per_group", 96))


def test_weight_rows_views_per_tensor_storage():
    spec = QuantSpec("int8", "per_tensor")
    qt = quantize(torch.randn(6, 10), spec)
    assert tuple(qt.data.shape) == (1, 60)
    rows = layout.weight_rows(qt.data, spec, 6, 10)
    assert rows.shape == (6, 10) and rows.data_ptr() == qt.data.data_ptr()
    odd = quantize(torch.randn(6, 9), QuantSpec("int4", "per_tensor"))
    with pytest.raises(ValueError, match=r"row-major \[6, 5\]"):
        layout.weight_rows(odd.data, odd.spec, 6, 9)


def test_scaled_mm_scales():
    tok, ch = torch.rand(5, 1), torch.rand(7, 1).half()
    a, b = layout.scaled_mm_scales(tok, ch, 5, 7)
    assert a.shape == (5, 1) and b.shape == (1, 7) and a.dtype == b.dtype == torch.float32
    assert b.is_contiguous() and torch.equal(b[0], ch[:, 0].float())
    a, b = layout.scaled_mm_scales(torch.tensor([[0.5]]), torch.ones(1, 1), 5, 7)
    assert a.dim() == b.dim() == 0
    a, b = layout.scaled_mm_scales(torch.tensor([[0.5]]), ch, 5, 7)  # static x, per-channel w
    assert a.shape == (5, 1) and bool((a == 0.5).all())
    assert [layout.int_mm_rows(m) for m in (1, 16, 17, 33)] == [32, 32, 32, 40]


# --- peer layout: tinygemm --------------------------------------------------------------------

@pytest.mark.parametrize("fmt,sym", [("int4", True), ("uint4", False)])
def test_tinygemm_conversion(fmt, sym):
    spec = QuantSpec(fmt, "per_group", 64, sym, "fp16")
    qt = quantize(torch.randn(16, 256), spec)
    packed, sz = layout.to_tinygemm(qt.data, qt.scale, qt.zero_point, spec, torch.float32)
    assert packed.shape == (16, 128) and sz.shape == (4, 16, 2)
    got = layout.dequantize_tinygemm_reference(packed, sz, 64, 256)
    torch.testing.assert_close(got, dequantize(qt), rtol=0, atol=1e-6)


def test_tinygemm_nibble_order():
    spec = QuantSpec("int4", "per_group", 32)
    data = torch.tensor([[0x21] * 16], dtype=torch.uint8)  # ours: elements (1, 2); tinygemm: u+8
    packed, _ = layout.to_tinygemm(data, torch.ones(1, 1), None, spec)
    assert packed[0, 0].item() == (1 + 8) << 4 | (2 + 8)  # element 0 in the high nibble
    assert layout.tinygemm_rejects(spec, 64, 100) is not None
    assert layout.tinygemm_rejects(QuantSpec("int4", "per_group", 128), 64, 256) is None


@pytest.mark.skipif(not hasattr(torch, "_weight_int4pack_mm_for_cpu"), reason="torch lacks it")
def test_tinygemm_scales_match_torch_cpu_kernel():
    spec = QuantSpec("uint4", "per_group", 64, False, "fp16")
    qt = quantize(torch.randn(64, 256), spec)
    packed, sz = layout.to_tinygemm(qt.data, qt.scale, qt.zero_point, spec)
    codes = torch.stack(((packed >> 4).int(), (packed & 15).int()), -1).flatten(-2)
    w = torch._convert_weight_to_int4pack_for_cpu(codes, 2)
    x = torch.randn(3, 256).bfloat16()
    out = torch._weight_int4pack_mm_for_cpu(x, w, 64, sz)
    ref = x.double() @ layout.dequantize_tinygemm_reference(packed, sz, 64, 256).double().t()
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-2


# --- the kernels themselves, on CPU through Triton's interpreter (skipped without triton) -------

@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernels_in_triton_interpreter():
    run = subprocess.run([sys.executable, "-m", "sagequant.backends.cuda.selfcheck", "--interpret"],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert ", 0 failed" in run.stdout


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_kernels_compile_for_sm90():
    """Every configuration choose() launches compiles for sm_90a (no GPU needed)."""
    run = subprocess.run([sys.executable, "-m", "sagequant.backends.cuda.aot_check", "--defaults"],
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0 and ", 0 failed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
