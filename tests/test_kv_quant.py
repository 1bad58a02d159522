"""KV block quantization against a float64 reference, the plan's layout JSON and its errors."""
import json

import pytest
import torch

from sagequant.config import ConfigError
from sagequant.ir.formats import QuantizationError
from sagequant.ir.kv_plan import KVQuantPlan
from sagequant.ir.kv_quant import dequantize_blocks, kv_spec, quantize_blocks

QMAX = {"int8": 127.0, "fp8": 448.0}


def _reference(x: torch.Tensor, dtype: str, group: int | None, scale_dtype: torch.dtype):
    """float64: per (block, head, group) absmax over all tokens of the block -> scale, codes."""
    n, h, bs, d = x.shape
    g = group or d
    xg = x.double().reshape(n, h, bs, d // g, g)
    scale = (xg.abs().amax(dim=(2, 4)) / QMAX[dtype]).to(scale_dtype)    # [n, h, groups]
    scaled = xg / scale.double()[:, :, None, :, None]
    if dtype == "int8":
        codes = torch.round(scaled).clamp(-128, 127)
    else:
        codes = scaled.clamp(-448, 448).float().to(torch.float8_e4m3fn).double()
    return codes.reshape(x.shape), scale


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
@pytest.mark.parametrize("group", [None, 16])
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_blocks_match_float64_reference(dtype, group, precision):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 16, 32, generator=g) * torch.linspace(0.1, 4, 32)  # uneven channels
    codes, scales = quantize_blocks(x, kv_spec(dtype, precision), group)
    ref_codes, ref_scale = _reference(x, dtype, group, getattr(torch, {"fp16": "float16", "fp32": "float32"}[precision]))
    assert codes.element_size() == 1 and scales.shape == (3, 2, 32 // (group or 32))
    assert torch.equal(scales, ref_scale)
    assert torch.equal(codes.double(), ref_codes)
    back = dequantize_blocks(codes, scales, torch.float64)
    assert torch.allclose(back, ref_codes * ref_scale.double().repeat_interleave(group or 32, -1)[:, :, None, :])
    # Error bound: half a step for int8; fp8 e4m3 has 3 mantissa bits (relative 2^-4) plus
    # the subnormal floor.
    step = ref_scale.double().repeat_interleave(group or 32, -1)[:, :, None, :]
    err = (back - x.double()).abs()
    bound = step * 0.5 if dtype == "int8" else x.double().abs() * 2 ** -4 + step * 2 ** -9
    assert bool((err <= bound * (1 + 1e-6)).all())


def test_nan_in_cache_values_is_refused():
    x = torch.zeros(1, 1, 16, 8)
    x[0, 0, 3, 2] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_blocks(x, kv_spec("int8", "fp16"), None)


def test_group_must_divide_head_dim():
    with pytest.raises(QuantizationError, match="does not divide head_dim 12"):
        quantize_blocks(torch.ones(1, 1, 16, 12), kv_spec("fp8", "fp16"), 8)
    with pytest.raises(ConfigError, match="group_size=8 does not divide the model's head_dim=12"):
        KVQuantPlan(dtype="int8", group_size=8).check_head_dim(12)


def test_plan_json_has_block_and_scale_layout():
    plan = KVQuantPlan(dtype="fp8", block_size=32, group_size=64, scale_precision="fp32")
    data = json.loads(json.dumps(plan.to_dict()))
    assert "block_size=32" in data["layout"]["codes"] and "fp8_e4m3" in data["layout"]["codes"]
    assert data["layout"]["scales"].startswith("[num_blocks, kv_heads, head_dim/64] fp32")
    assert KVQuantPlan.from_dict(data) == plan
    data["layout"]["codes"] = "something else"
    with pytest.raises(ConfigError, match="layout"):
        KVQuantPlan.from_dict(data)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_pool_blocks_do_not_depend_on_how_tokens_arrived(dtype):
    """A block's codes are quantize(its tokens) with its own absmax whether its tokens came in
    one prefill, one at a time, or in a batched decode step next to another sequence; the open
    block (40 = 2 x 16 + 8 tokens) is the tail's 16-bit tokens, which gather returns as they
    are."""
    from sagequant.runtime.kv_pool import PagedKVPool

    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 40, 8, generator=g)   # 2 sequences, 2 kv heads, 40 tokens, head_dim 8
    v = torch.randn(2, 2, 40, 8, generator=g)
    plan = KVQuantPlan(dtype=dtype, block_size=16, group_size=4)

    def pool():
        p = PagedKVPool(plan, [dtype], 2, 8, 8, 2, torch.float32, torch.device("cpu"))
        p.open(0, 40)
        p.open(1, 40)
        return p

    whole, single, batched = pool(), pool(), pool()
    whole.write(0, [0, 1], [0, 0], k, v)
    for t in range(40):
        for row in (0, 1):
            single.write(0, [row], [t], k[row:row + 1, :, t:t + 1], v[row:row + 1, :, t:t + 1])
    batched.write(0, [0, 1], [0, 0], k[:, :, :7], v[:, :, :7])
    for t in range(7, 40):
        batched.write(0, [0, 1], [t, t], k[:, :, t:t + 1], v[:, :, t:t + 1])
    for other in (single, batched):
        for name in ("k", "v", "k_scale", "v_scale"):
            assert torch.equal(getattr(whole.layers[0], name).float(), getattr(other.layers[0], name).float())
        for row in (0, 1):
            assert torch.equal(whole.layers[0].tail[row, :, :, :8],
                               other.layers[0].tail[row, :, :, :8])
    # Every full block holds quantize_blocks of exactly its tokens; the open one is the tail's.
    spec = kv_spec(dtype, "fp16")
    for row in (0, 1):
        for b, block in enumerate(whole.blocks[row][:2]):
            codes, scales = quantize_blocks(k[row, :, 16 * b:16 * b + 16], spec, 4)
            assert torch.equal(whole.layers[0].k[block].float(), codes.float())
            assert torch.equal(whole.layers[0].k_scale[block], scales)
        got_k, got_v = whole.gather(0, row, 40)
        assert got_k.shape == (2, 40, 8)
        assert torch.equal(got_k[:, 32:], k[row, :, 32:])
        assert torch.equal(got_v[:, 32:], v[row, :, 32:])
        second = whole.blocks[row][1]
        full = dequantize_blocks(whole.layers[0].k[second], whole.layers[0].k_scale[second],
                                 torch.float32)
        assert torch.equal(got_k[:, 16:32], full)


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_a_nan_token_is_refused_when_written_not_when_its_block_fills(dtype):
    """Each token is checked as it enters the open block: a prefill that leaves a NaN in the
    tail and a decode write of one both raise at once (eager) or set the step's flag (CUDA
    graphs), though no block has been quantized yet."""
    from sagequant.runtime.kv_pool import PagedKVPool

    plan = KVQuantPlan(dtype=dtype, block_size=16)
    pool = PagedKVPool(plan, [dtype], 1, 8, 4, 1, torch.float32, torch.device("cpu"))
    pool.open(0, 32)
    k = torch.randn(1, 1, 5, 8)
    k[0, 0, 3, 2] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        pool.write(0, [0], [0], k, torch.randn(1, 1, 5, 8))
    pool.write(0, [0], [0], torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8))
    index = pool.decode_index([0], [5])
    index.nonfinite = torch.zeros(1, dtype=torch.bool)
    bad = torch.randn(1, 1, 1, 8)
    bad[..., 0] = float("inf")
    pool.write_decode(0, index, torch.randn(1, 1, 1, 8), bad)
    assert bool(index.nonfinite)


def test_truncate_into_a_full_block_reopens_it_from_its_codes():
    """A prefill that fills its last block leaves no tail; truncating back into that block (a
    rejected speculative token) must reopen it from its dequantized codes, not a stale tail."""
    from sagequant.runtime.kv_pool import PagedKVPool

    plan = KVQuantPlan(dtype="int8", block_size=16)
    pool = PagedKVPool(plan, ["int8"], 1, 8, 4, 1, torch.float32, torch.device("cpu"))
    pool.open(0, 48)
    k, v = torch.randn(1, 1, 32, 8), torch.randn(1, 1, 32, 8)
    pool.write(0, [0], [0], k, v)
    pool.advance([0], 32)
    want_k, want_v = pool.gather(0, 0, 32)
    pool.truncate(0, 20)
    got_k, got_v = pool.gather(0, 0, 20)
    assert torch.equal(got_k, want_k[:, :20]) and torch.equal(got_v, want_v[:, :20])
    assert (got_k[:, 16:] - k[0, :, 16:20]).abs().max() < 0.05   # the codes' values, not zeros
