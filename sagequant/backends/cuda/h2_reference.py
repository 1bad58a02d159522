"""Pure-torch model of triton_gemv_h2's arithmetic (the inline PTX does not run under Triton's
interpreter): the same LOP3 pair masks and XOR constants on the int32 words, the fp16 dequantize,
the fp16 products summed four at a time, the fp32 widening and group scales. Tests hold it to
the float64 reference; the GPU selfcheck holds the kernel to the same tolerance.
"""
from __future__ import annotations

import torch

# (mask, XOR constant for int4, for uint4) of the four f16x2 pairs (e, e + 4) of a word, and the
# right shift applied first; element e of a word sits in bits 4e..4e+3.
PAIRS = ((0, 0x000F000F), (0, 0x00F000F0), (8, 0x000F000F), (8, 0x00F000F0))
XOR = {"int4": (0x64086408, 0x64806480), "uint4": (0x64006400, 0x64006400)}


def _halves(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An int64 tensor of 32-bit values as its (low, high) halves read as fp16."""
    lo = (v & 0xFFFF).to(torch.int32).to(torch.int16)
    hi = ((v >> 16) & 0xFFFF).to(torch.int32).to(torch.int16)
    return lo.view(torch.float16), hi.view(torch.float16)


def _round16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16)


def pair_weights(words: torch.Tensor, fmt: str, zeros: torch.Tensor | None = None
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(u - 8) / 16 (int4) or (u - z) / 16 (uint4, z broadcast against the words) of the four
    pairs as fp16 (low element e, high element e + 4), as the kernel's LOP3 + HFMA2 make them."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = []
    for i, (shift, mask) in enumerate(PAIRS):
        lop = ((w >> shift) & mask) ^ XOR[fmt][i % 2]
        lo, hi = _halves(lop)
        inplace = i % 2 == 1  # 1024 + 16u: times 1/256; else 1024 + u: times 1/16
        mul = 1 / 256 if inplace else 1 / 16
        off = torch.tensor(8.0, dtype=torch.float64) if zeros is None else zeros.double()
        add = -((64.0 if inplace else 1024.0) + off) / 16
        out.append(tuple(_round16(h.double() * mul + add) for h in (lo, hi)))
    return out


def gemv_h2(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, fmt: str, group: int,
            zeros: torch.Tensor | None = None, pair_runs: bool = False) -> torch.Tensor:
    """out[N] = dequant(W) @ x for one row x [K] and words [N, K/8] (int32), group-wise scales
    [N, K/group] (and uint4 zero points), with the kernel's roundings: x to fp16, each word's
    8 products summed in fp16 as two chains of 4 (fused multiply-adds; pair_runs: words 2j and
    2j + 1 in two chains of 8), fp32 from there on."""
    n, kw = words.shape
    run = 2 if pair_runs else 1
    x16 = x.to(torch.float16).double().reshape(kw, 8)
    acc = torch.zeros(n, dtype=torch.float32)
    for j0 in range(0, kw, run):
        g = j0 * 8 // group
        z = None if zeros is None else zeros[:, g]
        sums = []
        for half in (0, 1):
            p = None
            for j in range(j0, j0 + run):
                pairs = pair_weights(words[:, j], fmt, z)
                for q in range(4):
                    wq = pairs[q][half].double()
                    xq = x16[j, q + 4 * half]
                    p = _round16(wq * xq if p is None else wq * xq + p.double())
            sums.append(p.float())
        acc = acc + (sums[0] + sums[1]) * (scales[:, g].float() * 16)
    return acc
