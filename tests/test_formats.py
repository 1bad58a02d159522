"""ir/formats.py against independent float64 references (bit-pattern fp8 grids, QLoRA NF4, nibbles)."""
import math

import numpy as np
import pytest
import torch

from sagequant.ir.formats import (
    FORMATS, NF4_CODEBOOK, QuantizationError, check_finite, get_format, pack_nibbles,
    unpack_nibbles)
from sagequant.ir.quant_spec import QuantSpec, quantize


# ----------------------------------------------------------------------------- references
def fp8_grid(exp_bits: int, man_bits: int, bias: int, fn: bool) -> list[float]:
    """All non-negative finite values, in bit-pattern order (so index parity == mantissa LSB)."""
    out = []
    for e in range(2 ** exp_bits):
        for m in range(2 ** man_bits):
            if fn and e == 2 ** exp_bits - 1 and m == 2 ** man_bits - 1:
                continue  # e4m3fn: S.1111.111 is NaN, no inf
            if not fn and e == 2 ** exp_bits - 1:
                continue  # e5m2: IEEE-like inf/NaN
            if e == 0:
                out.append(m / 2 ** man_bits * 2.0 ** (1 - bias))
            else:
                out.append((1 + m / 2 ** man_bits) * 2.0 ** (e - bias))
    return out


E4M3 = fp8_grid(4, 3, 7, fn=True)
E5M2 = fp8_grid(5, 2, 15, fn=False)


def ref_fp8_round(v: float, grid: list[float]) -> float:
    """Round-to-nearest-even by search; magnitudes beyond the max saturate."""
    a = abs(v)
    if a >= grid[-1]:
        r = grid[-1]
    else:
        i = next(k for k, g in enumerate(grid) if g >= a)
        lo, hi = grid[i - 1] if i else grid[0], grid[i]
        dlo, dhi = a - lo, hi - a
        if dlo < dhi:
            r = lo
        elif dhi < dlo:
            r = hi
        else:  # tie: the even bit pattern
            r = lo if (i - 1) % 2 == 0 else hi
    return math.copysign(r, v)


def ref_nf4_book() -> np.ndarray:
    off = 0.9677083
    pos = torch.special.ndtri(torch.linspace(off, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(off, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return (v / v.max()).numpy()


def ref_pack(codes: list[int]) -> list[int]:
    nib = [c & 0xF for c in codes] + ([0] if len(codes) % 2 else [])
    return [nib[2 * i] | (nib[2 * i + 1] << 4) for i in range(len(nib) // 2)]


# ----------------------------------------------------------------------------- format table
@pytest.mark.parametrize("name, bits, qmin, qmax", [
    ("int8", 8, -128, 127), ("uint8", 8, 0, 255), ("int4", 4, -8, 7), ("uint4", 4, 0, 15),
    ("fp8_e4m3", 8, -448.0, 448.0), ("fp8_e5m2", 8, -57344.0, 57344.0), ("nf4", 4, 0, 1.0)])
def test_format_table(name, bits, qmin, qmax):
    f = get_format(name)
    assert (f.bits, f.qmin, f.qmax, f.packed) == (bits, qmin, qmax, bits == 4)


def test_fp8_grid_reference_sanity():
    assert len(E4M3) == 127 and E4M3[-1] == 448.0 and E4M3[1] == 2.0 ** -9
    assert len(E5M2) == 124 and E5M2[-1] == 57344.0 and E5M2[1] == 2.0 ** -16
    assert all(b > a for a, b in zip(E4M3, E4M3[1:])) and all(b > a for a, b in zip(E5M2, E5M2[1:]))


def test_unknown_format():
    with pytest.raises(QuantizationError, match="unknown quantization format 'int3'.*int4"):
        get_format("int3")


# ----------------------------------------------------------------------------- integer encode
@pytest.mark.parametrize("name, vals, want", [
    ("int4", [2.5, 3.5, -2.5, -3.5, 0.5, 1.5, -0.5, 6.49, 7.5, 9.0, -8.4, -8.5, -100.0],
             [2, 4, -2, -4, 0, 2, 0, 6, 7, 7, -8, -8, -8]),
    ("int8", [126.5, 127.5, -127.5, -128.5, -1000.0, 0.49], [126, 127, -128, -128, -128, 0]),
    ("uint4", [-0.6, 0.5, 14.5, 15.4, 40.0], [0, 0, 14, 15, 15]),
    ("uint8", [-3.0, 254.5, 255.49, 300.0, 1.5], [0, 254, 255, 255, 2]),
])
def test_int_encode_half_even_and_saturation(name, vals, want):
    codes = get_format(name).encode(torch.tensor(vals))
    assert codes.tolist() == want


def test_int_encode_random_vs_reference():
    torch.manual_seed(0)
    x = torch.randn(4000, dtype=torch.float64) * 6
    x[::7] = torch.floor(x[::7]) + 0.5  # many exact half-way points
    for name, (lo, hi) in {"int4": (-8, 7), "int8": (-128, 127)}.items():
        ref = [min(max(int(np.rint(v)), lo), hi) for v in x.tolist()]
        assert get_format(name).encode(x.float()).tolist() == ref


# ----------------------------------------------------------------------------- fp8
FP8 = [("fp8_e4m3", E4M3), ("fp8_e5m2", E5M2)]


def _edge_values(grid):
    vals = [0.0, grid[1], grid[1] / 2, grid[1] * 0.49, grid[1] * 0.51, grid[1] * 1.5,
            grid[2] * 1.5, grid[-1], grid[-1] * 1.01, grid[-1] * 1e3, (grid[-1] + grid[-2]) / 2,
            1.0, 1.0 + (grid[grid.index(1.0) + 1] - 1.0) / 2]
    vals += [(a + b) / 2 for a, b in zip(grid, grid[1:])]  # every tie in the grid
    return vals + [-v for v in vals]


@pytest.mark.parametrize("name, grid", FP8)
def test_fp8_encode_edges_vs_reference(name, grid):
    vals = _edge_values(grid)
    got = get_format(name).encode(torch.tensor(vals, dtype=torch.float32)).double().tolist()
    want = [ref_fp8_round(v, grid) for v in vals]
    assert got == want
    assert set(abs(g) for g in got) <= set(grid)


@pytest.mark.parametrize("name, grid", FP8)
def test_fp8_quantize_random_vs_reference(name, grid):
    torch.manual_seed(1)
    x = torch.randn(3000) * torch.logspace(-6, 5, 3000)  # subnormals .. beyond max
    spec = QuantSpec(name, "per_tensor", scale_dtype="fp32")
    qt = quantize(x, spec, scale=torch.ones(1, 1))
    assert qt.data.dtype == get_format(name).storage_dtype
    want = [ref_fp8_round(v, grid) for v in x.double().tolist()]
    assert qt.data.double().flatten().tolist() == want


@pytest.mark.parametrize("name, grid", FP8)
def test_fp8_saturates_to_max(name, grid):
    x = torch.tensor([1e6, -1e6, grid[-1] * 1.2, -grid[-1] * 1.2, float(torch.finfo(torch.float32).max)])
    got = get_format(name).encode(x).double().tolist()
    assert got == [grid[-1], -grid[-1], grid[-1], -grid[-1], grid[-1]]


# ----------------------------------------------------------------------------- nf4
def test_nf4_codebook_matches_qlora_construction():
    ref = ref_nf4_book()
    assert len(NF4_CODEBOOK) == 16 and ref.shape == (16,)
    np.testing.assert_allclose(np.array(NF4_CODEBOOK), ref, atol=1e-6, rtol=0)
    assert NF4_CODEBOOK[7] == 0.0 and NF4_CODEBOOK[0] == -1.0 and NF4_CODEBOOK[-1] == 1.0


def test_nf4_encode_nearest_vs_bruteforce():
    torch.manual_seed(2)
    x = torch.cat([torch.rand(5000) * 2.4 - 1.2, torch.tensor(NF4_CODEBOOK), torch.tensor([0.0])])
    fmt = get_format("nf4")
    codes = fmt.encode(x)
    book = np.array(NF4_CODEBOOK, dtype=np.float64)
    xv = np.clip(x.double().numpy(), -1, 1)
    want = np.abs(xv[:, None] - book[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(codes.numpy(), want)
    np.testing.assert_array_equal(fmt.decode(codes).double().numpy(), book[want])


# ----------------------------------------------------------------------------- nibble packing
def test_pack_exact_bytes_signed_and_unsigned():
    packed = pack_nibbles(torch.tensor([1, -1, 7, -8, 3]))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0xF1, 0x87, 0x03] == ref_pack([1, -1, 7, -8, 3])
    assert pack_nibbles(torch.tensor([0, 15, 9, 4])).tolist() == [0xF0, 0x49]
    assert pack_nibbles(torch.tensor([[2, -3], [-7, 5]])).tolist() == [[0xD2], [0x59]]


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 4, 9), (2, 3, 8)])
@pytest.mark.parametrize("signed", [True, False])
def test_pack_unpack_round_trip(shape, signed):
    g = torch.Generator().manual_seed(3)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, shape, generator=g, dtype=torch.int16)
    packed = pack_nibbles(codes)
    assert packed.shape == shape[:-1] + ((shape[-1] + 1) // 2,)
    flat = codes.reshape(-1, shape[-1]).tolist()
    assert packed.reshape(len(flat), -1).tolist() == [ref_pack(r) for r in flat]
    out = unpack_nibbles(packed, shape[-1], signed=signed)
    assert out.shape == codes.shape and torch.equal(out, codes)


def test_unpack_errors():
    packed = pack_nibbles(torch.zeros(2, 5, dtype=torch.int16))
    with pytest.raises(QuantizationError, match="last dim 3, expected 2"):
        unpack_nibbles(packed, 4, signed=True)
    with pytest.raises(QuantizationError, match="expected 4"):
        unpack_nibbles(packed, 8, signed=False)
    with pytest.raises(QuantizationError, match="uint8"):
        unpack_nibbles(packed.to(torch.int8), 5, signed=True)


@pytest.mark.parametrize("name", ["int4", "uint4", "int8", "uint8"])
def test_storage_round_trip(name):
    f = get_format(name)
    codes = torch.arange(int(f.qmin), int(f.qmax) + 1, dtype=torch.int16)[:-1].reshape(1, -1)
    data = f.to_storage(codes)
    assert data.dtype == (torch.uint8 if f.packed else f.storage_dtype)
    assert data.shape[-1] == ((codes.shape[-1] + 1) // 2 if f.packed else codes.shape[-1])
    assert torch.equal(f.from_storage(data, codes.shape[-1]), codes)


# ----------------------------------------------------------------------------- check_finite
@pytest.mark.parametrize("bad, n_nan, n_inf", [(float("nan"), 1, 0), (float("inf"), 0, 1),
                                               (float("-inf"), 0, 1)])
def test_check_finite(bad, n_nan, n_inf):
    x = torch.ones(4, 4)
    x[1, 2] = bad
    with pytest.raises(QuantizationError, match=f"w.q_proj contains {n_nan} NaN and {n_inf} Inf"):
        check_finite(x, "w.q_proj")
    check_finite(torch.ones(3), "ok")
    check_finite(torch.arange(3), "ints")
