"""The 4-bit int32-word kernels' CPU side: the word layout they read, which path each M gets
(and the dispatch table lowering records), their constraints, and the NF4 registry row. The
kernels themselves run in Triton's interpreter through selfcheck's word cases (test_cuda_kernels)
and on the GPU through benchmarks/cuda_round2.py."""
from __future__ import annotations

import pytest
import torch

from sagequant.backends.cuda import kernels, layout
from sagequant.ir.formats import pack_nibbles
from sagequant.ir.quant_spec import QuantSpec
from sagequant.lowering.registry import REGISTRY

QWEN2_7B = {"q_o": (3584, 3584), "k_v": (512, 3584), "gate_up": (37888, 3584),
            "down": (3584, 18944)}


@pytest.mark.parametrize("signed", [True, False])
def test_int32_view_puts_element_8j_plus_p_in_nibble_p(signed):
    """The kernels' premise: the packed [N, K/2] bytes viewed as int32 hold element 8j + p of a
    row in bits 4p..4p+3 of word j."""
    gen = torch.Generator().manual_seed(0)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (5, 48), generator=gen, dtype=torch.int16)
    words = pack_nibbles(codes).view(torch.int32)
    assert words.shape == (5, 6)
    for p in range(8):
        nib = (words >> (4 * p)) & 0xF
        if signed:  # the kernels XOR with 0x88888888 then subtract 8: the same as sign-extending
            nib = (nib ^ 8) - 8
        assert torch.equal(nib.to(torch.int16), codes[:, p::8])


def test_magic_number_decode_is_exact():
    """u | 0x4B000000 read as fp32 is 2**23 + u, so one subtraction gives u - 8 exactly."""
    u = torch.arange(16, dtype=torch.int32)
    f = (u | 0x4B000000).view(torch.float32)
    assert torch.equal(f - 8388616.0, (u - 8).float())


@pytest.mark.parametrize("fmt", ["int4", "uint4"])
def test_word_paths_by_m_on_7b_shapes(fmt):
    for n, k in QWEN2_7B.values():
        paths = {m: layout.choose(m, n, k, bits=4, group=128, fmt=fmt).path
                 for m in (1, 2, 16, 32, 64, 128, 255, 256, 1024, 4096)}
        assert paths[1] == "gemv4" and paths[2] == paths[16] == paths[32] == "mma4"
        assert paths[64] == ("mma4" if n <= layout.WORD_NARROW_N else "tiled")
        assert paths[128] == paths[255] == "tiled"
        assert paths[256] == paths[1024] == paths[4096] == "dequant4_mm"  # the word dequantizer


def test_byte_paths_without_a_word_layout():
    # no format (round one's choice), odd K, an 8-bit format, small groups for the MMA kernel
    assert layout.choose(1, 4096, 4096, bits=4, group=128).path == "gemv"
    assert layout.choose(1, 520, 1001, bits=4, group=128, fmt="int4").path == "gemv"
    assert layout.choose(8, 4096, 4096, bits=8, group=128, fmt="int8").path == "splitk"
    assert layout.choose(8, 4096, 4096, bits=4, group=64, fmt="int4").path == "splitk"
    assert layout.choose(1, 4096, 4096, bits=4, group=64, fmt="int4").path == "gemv4"


def test_nf4_has_only_word_paths():
    got = [layout.choose(m, 3584, 18944, bits=4, group=128, fmt="nf4").path for m in (1, 8, 63, 64)]
    assert got == ["gemv4", "mma4", "mma4", "dequant4_mm"]
    assert layout.choose(8, 512, 4096, bits=4, group=64, fmt="nf4").path == "dequant4_mm"
    with pytest.raises(ValueError, match="in_features % 8"):
        layout.choose(1, 64, 1004, bits=4, group=128, fmt="nf4")


def test_word_rejects_say_why():
    assert "int8" in layout.word_rejects("int8", 4096, 128, 128)
    assert "in_features % 8 == 0" in layout.word_rejects("int4", 4100, 128, 128)
    assert "group_size 64" in layout.word_rejects("int4", 4096, 64, 128)
    assert layout.word_rejects("nf4", 4096, layout.BIG_GROUP, 128) is None


@pytest.mark.parametrize("shape", list(QWEN2_7B.values()))
def test_word_plans_fill_the_gpu_and_respect_groups(shape):
    n, k = shape
    for m in (1, 8, 16, 32, 64):
        plan = layout.choose(m, n, k, bits=4, group=128, fmt="int4")
        if plan.path not in ("gemv4", "mma4"):
            continue
        assert 128 % plan.block_k == 0 and plan.block_k % 8 == 0
        per, splits = layout.k_blocks_per_split(k // 8, plan.block_k // 8, plan.split_k)
        blocks = -(-k // plan.block_k)
        assert per * (splits - 1) < blocks <= per * splits  # every split has work
        tiles = -(-m // plan.block_m) * -(-n // plan.block_n) * splits
        assert tiles >= 132 or n * k < layout.BIG_LAYER  # big layers: >= one wave


@pytest.mark.parametrize("fmt,group", [("int4", 128), ("nf4", 128), ("int4", 32), ("uint4", 64)])
def test_dispatch_table_covers_every_m(fmt, group):
    n, k = 3584, 18944
    table = layout.dispatch_table(n, k, fmt, group)
    assert table[0]["m_min"] == 1 and table[-1]["m_max"] is None
    for a, b in zip(table, table[1:]):
        assert b["m_min"] == a["m_max"] + 1 and a["path"] != b["path"]
    for m in (1, 2, 17, 33, 64, 65, 500, 1024, 5000):
        row = next(r for r in table if r["m_min"] <= m and (r["m_max"] is None or m <= r["m_max"]))
        assert row["path"] == layout.choose(m, n, k, bits=4, group=group, fmt=fmt).path


def test_binding_records_the_dispatch_for_weight_only_rows_only():
    spec = QuantSpec("int4", "per_group", 128, True, "fp16")
    attrs = kernels.W4A16.binding_attrs(spec, [37888, 3584])
    assert attrs["dispatch_by_m"] == layout.dispatch_table(37888, 3584, "int4", 128)
    fp8 = QuantSpec("fp8_e4m3", "per_channel")
    assert kernels.W8A8_FP8.binding_attrs(fp8, [4096, 4096]) == {}


def test_nf4_row():
    (row,) = REGISTRY.candidates("NF4-A16", "cuda", "latency")
    assert row is kernels.NF4 and row.formats == ("nf4",) and row.k_multiple == 8
    nf4 = QuantSpec("nf4", "per_group", 128, True, "fp16")
    assert "multiple of 8" in row.rejects(nf4, 4100)
    assert "format int4" in row.rejects(QuantSpec("int4", "per_group", 128), 4096)


@pytest.mark.parametrize("shape,split", [((37888, 3584), 4), ((3584, 18944), 10),
                                         ((3584, 3584), 10), ((512, 3584), 14)])
def test_fp8_decode_config_matches_the_h100_sweep(shape, split):
    """The sweep's best split per 7B shape (BENCHMARKS.md, CUDA round 2), from the rule."""
    cfg = layout.fp8_gemv_config(*shape)
    assert (cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["split_k"]) == (32, 128, split)



def test_split_k_tile_counters_grow_without_freeing_what_graphs_hold():
    """One zeroed counter buffer per device; a larger request replaces it but keeps the old one
    alive (a CUDA graph captured with it still reads it)."""
    sk = pytest.importorskip("sagequant.backends.cuda.triton_splitk")
    dev = torch.device("cpu")
    sk._COUNTERS.pop(dev, None)
    first = sk.tile_counters(dev, 10)
    assert first.dtype == torch.int32 and first.numel() >= 10 and not first.any()
    assert sk.tile_counters(dev, first.numel()) is first
    bigger = sk.tile_counters(dev, first.numel() + 1)
    assert bigger.numel() > first.numel() and not bigger.any()
    assert any(t is first for t in sk._OUTGROWN)
    sk._COUNTERS.pop(dev, None)
