"""Pure-Python planning for the CUDA kernels: which path runs at which M, block shapes, split-K,
group geometry, and layout conversions to peers' formats. No triton, no GPU: tested on CPU.

Thresholds are constants so the H100 run (benchmarks/cuda_kernels.py) can retune them in one
place; `choose()` is the only function that reads them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import torch

from ...ir.quant_spec import QuantSpec

# --- weight-only path thresholds, by M = tokens in the batch (tuned on an H100 run) -----------
GEMV_MAX_M = 1            # M <= this: CUDA-core GEMV (no tensor cores, split-K)
SPLITK_MAX_M = 16         # M <= this: tensor-core kernel with BLOCK_M=16 and split-K
DEQUANT_MM_MIN_M = 512    # M >= this: dequantize to a 16-bit scratch, then cuBLAS (8-bit:
#                           ahead of `tiled` on all four 8B linears at 512, not at 256; §13g)
DEQUANT_CHUNK_BYTES = 32 << 20  # dequantize this many bytes of 16-bit weight per cuBLAS call
# Chunk sizes the measured dispatch also times with the side-stream overlap (H100, §13g: 16 MB
# won only int8 at M = 2048, by <= 3%; 8 MB chunks never won and are not timed).
DEQUANT_OVERLAP_CHUNK_BYTES = (16 << 20,)
# Programs (tiles x splits) to aim for, as waves over the multiprocessors.
MEMORY_BOUND_WAVES = 4    # small M: many loads in flight
COMPUTE_BOUND_WAVES = 1
MIN_K_BLOCKS_PER_SPLIT = 2
BIG_GROUP = 1 << 30       # the kernels' GROUP for per-channel / per-tensor scales: one "group"
# Group sizes the Triton kernels take: a K block (power of two >= 16) must lie in one group.
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
PATHS = ("gemv", "splitk", "tiled", "dequant_mm", "gemv4", "gemv4h", "mma4", "dequant4_mm")
# 4-bit weights read as int32 words (triton_words): int4/uint4/NF4 with K % 8 == 0. Thresholds
# and tiles from the H100 sweep of benchmarks/cuda_round2.py (BENCHMARKS.md §CUDA round 2).
WORD_FORMATS = ("int4", "uint4", "nf4")
WORD_PATHS = ("gemv4", "gemv4h", "mma4", "dequant4_mm")
# gemv4h (triton_gemv_h2): the GEMV in packed fp16 math, int4/uint4 only, ~1e-3 relative error
# (fp16 sums of 4 products); never a threshold's choice: measured dispatch times it up to this M.
H2_FORMATS = ("int4", "uint4")
H2_MAX_M = 8


def h2_rows(m: int) -> int:
    """gemv4h's rows of x a program for M rows: the next power of two, at most H2_MAX_M."""
    return min(H2_MAX_M, 1 << max(m - 1, 0).bit_length())


WORD_FLAGS = ("in_place", "prefetch", "launch_reduce", "pair_runs")  # Plan fields of variants
WORD_FIELDS = WORD_FLAGS + ("num_warps",)  # what measured dispatch keeps of a chosen word plan
WORD_GEMV_MAX_M = 1       # M <= this: the word GEMV (CUDA cores)
WORD_MMA_MAX_M = 32       # M <= this: the word tensor-core kernel
WORD_MMA_NARROW_MAX_M = 64  # ... up to this M when N <= WORD_NARROW_N (few output tiles)
WORD_NARROW_N = 4096
NF4_DEQUANT_MIN_M = 64    # NF4 from this M: dequantize (code book) to 16 bits, then cuBLAS
NF4_GEMV_BLOCK_N = 32     # NF4 GEMV rows per program (compile report; not yet timed on a GPU)
WORD_MMA_MIN_BLOCK_K = 128  # the MMA kernel's 8 per-plane dots need >= 16 words per K block
WORD_DEQUANT_MIN_M = 256  # int4/uint4 from this M: the word dequantizer + cuBLAS (ahead of
#                           `tiled` on all four 8B linears at 256, not on gate_up/down at 128)
BIG_LAYER = 32 << 20      # N*K from which small-M word kernels aim for 8 waves of programs
FP8_GEMV_MAX_M = 1        # W8A8-FP8: M <= this runs the fused quantize+GEMV kernel


@dataclass(frozen=True)
class Plan:
    """How one weight-only GEMM runs. block_* are the tile (rows of x, output features, K)."""

    path: str
    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8        # tiled: launch order swizzle, for L2 reuse of x and weight tiles
    chunk_n: int = 0        # dequant_mm: output features per dequantize+GEMM chunk (0: all)
    overlap: bool = False   # dequant_mm: dequantize chunk i+1 on a side stream during GEMM i
    swap_ab: bool = False   # tensor-core paths: compute out^T = W x^T (weight tile as MMA A)
    scale_w: bool = False   # tensor-core paths, group scales: scale the weight tile before the
    #                         MMA (one accumulator) instead of each K block's fp32 product
    # int32-word kernels (WORD_FLAGS, measured against each other at engine build):
    in_place: bool = False  # mma4, bf16/fp32 x: nibbles masked in place, x divided by 16**q
    prefetch: bool = False  # gemv4: load the next K block's words before this block's math
    launch_reduce: bool = False  # split-K summed by a second kernel, not the GEMM's last program
    pair_runs: bool = False  # gemv4h: two words (8 products a half) per fp16 run, not one

    def describe(self) -> str:
        if self.path in ("dequant_mm", "dequant4_mm"):
            return f"{self.path}(chunk_n={self.chunk_n or 'all'}{',overlap' if self.overlap else ''})"
        return (f"{self.path}(BM={self.block_m},BN={self.block_n},BK={self.block_k},"
                f"split={self.split_k},w={self.num_warps},s={self.num_stages}"
                f"{',swap' if self.swap_ab else ''}{',scale_w' if self.scale_w else ''}"
                + "".join(f",{f}" for f in WORD_FLAGS if getattr(self, f)) + ")")


def kernel_group(spec: QuantSpec, in_features: int) -> int:
    """GROUP the kernels divide K offsets by: the group size, or BIG_GROUP for one scale per row."""
    if spec.granularity == "per_group":
        return spec.group_size
    return BIG_GROUP


def weight_rows(qweight: torch.Tensor, spec: QuantSpec, n: int, k: int) -> torch.Tensor:
    """Stored codes as a row-major [N, bytes per row] tensor. Per-tensor specs store one flat row
    [1, N*K] (packed across rows for 4-bit): a free view, except 4-bit with odd K."""
    per_row = (k + 1) // 2 if spec.fmt.bits == 4 else k
    if tuple(qweight.shape) == (n, per_row) and qweight.stride(-1) == 1:
        return qweight
    if (spec.granularity == "per_tensor" and qweight.is_contiguous()
            and qweight.numel() == n * per_row and (spec.fmt.bits == 8 or k % 2 == 0)):
        return qweight.reshape(n, per_row)
    raise ValueError(f"{spec.describe()} weight of shape {[n, k]} must be stored as a row-major "
                     f"[{n}, {per_row}] tensor, got {tuple(qweight.shape)} with strides "
                     f"{qweight.stride()}")


def group_rejects(spec: QuantSpec) -> str | None:
    if spec.granularity == "per_group" and spec.group_size not in GROUP_SIZES:
        return (f"group_size {spec.group_size}: the Triton kernels need a power of two in "
                f"{GROUP_SIZES} (a K block must lie inside one group)")
    return None


def block_k_for(group: int, bits: int, preferred: int) -> int:
    """K block: a power of two in [16, preferred] dividing the group, so it lies in one group.
    (`bits` is kept for callers that want wider 4-bit blocks; 16 packed bytes is the floor.)"""
    bk = max(16, min(preferred, group))
    if bits == 4 and group >= 32:
        bk = max(bk, 32)
    return bk


def split_k_for(tiles: int, k_blocks: int, sm_count: int, waves: float) -> int:
    """Split K so tiles x splits reaches `waves` of programs, keeping a few K blocks per split."""
    want = math.ceil(waves * sm_count / max(tiles, 1))
    most = max(1, k_blocks // MIN_K_BLOCKS_PER_SPLIT)
    split = max(1, min(want, most))
    per = math.ceil(k_blocks / split)
    return math.ceil(k_blocks / per)  # no empty split


def word_rejects(fmt: str, k: int, group: int, block_k: int) -> str | None:
    """Why the int32-word kernels cannot run this weight with K blocks of `block_k` elements."""
    if fmt not in WORD_FORMATS:
        return f"the 4-bit word kernels read {'/'.join(WORD_FORMATS)} weights, not {fmt}"
    if k % 8:
        return f"the 4-bit word kernels need in_features % 8 == 0 (int32 words), got {k}"
    if group % block_k:
        return (f"the 4-bit word kernels need K blocks ({block_k}) inside one group; "
                f"group_size {group} is not a multiple")
    return None


def word_path_for(m: int, n: int, k: int, fmt: str, group: int) -> str | None:
    """The word kernel for M rows of a 4-bit weight, or None where the byte kernels serve."""
    if word_rejects(fmt, k, group, 16) is not None:
        return None
    mma_ok = word_rejects(fmt, k, group, WORD_MMA_MIN_BLOCK_K) is None
    if m <= WORD_GEMV_MAX_M:
        return "gemv4"
    if fmt == "nf4" and m >= NF4_DEQUANT_MIN_M:
        return "dequant4_mm"
    max_m = WORD_MMA_NARROW_MAX_M if n <= WORD_NARROW_N else WORD_MMA_MAX_M
    if mma_ok and (m <= max_m or fmt == "nf4"):
        return "mma4"
    return "dequant4_mm" if fmt == "nf4" or m >= WORD_DEQUANT_MIN_M else None


def path_for(m: int, n: int = 0, k: int = 0, fmt: str = "", group: int = BIG_GROUP) -> str:
    """The weight-only path for M rows (tokens) of an [n, k] weight: the thresholds above, in
    one place. NF4 has only the word kernels; it raises where they cannot take the weight."""
    if m <= 0:
        raise ValueError(f"weight-only GEMM: M must be >= 1, got {m}")
    word = word_path_for(m, n, k, fmt, group) if fmt else None
    if word:
        return word
    if fmt == "nf4":
        raise ValueError(word_rejects(fmt, k, group, 16 if m <= WORD_GEMV_MAX_M else
                                      WORD_MMA_MIN_BLOCK_K) or "NF4: no kernel")
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= SPLITK_MAX_M:
        return "splitk"
    return "tiled" if m < DEQUANT_MM_MIN_M else "dequant_mm"


@functools.lru_cache(maxsize=8192)  # pure, and asked once per linear call: ~10 µs of host time
def plan_for(path: str, m: int, n: int, k: int, *, bits: int, group: int,
             sm_count: int = 132, fmt: str = "", rows: int = 1) -> Plan:
    """Tiles and split-K of `path` for a GEMM [m, k] x [n, k]^T (any path runs any M); rows:
    gemv4h's rows of x a program (h2_rows)."""
    if path == "dequant_mm":
        return Plan("dequant_mm", chunk_n=dequant_chunk_rows(n, k, DEQUANT_CHUNK_BYTES))
    big = n * k >= BIG_LAYER
    if path == "dequant4_mm":
        return Plan("dequant4_mm", chunk_n=dequant_chunk_rows(n, k, DEQUANT_CHUNK_BYTES))
    if path == "gemv4h" and rows > 1:  # one decode of a weight tile for `rows` rows of x: 64 x
        #   128 at 4 warps keeps 64 weights a thread (sm_90a, rows 8: 216 registers, no spill;
        #   713 SASS instructions a K step, 11 a weight for 8 rows, against 15 at BN=64 x 64)
        plan = Plan("gemv4h", block_m=rows, block_n=64, block_k=min(128, group), num_warps=4,
                    num_stages=1)
        tiles, waves = math.ceil(m / rows) * math.ceil(n / 64), MEMORY_BOUND_WAVES
    elif path == "gemv4h":  # tiles and waves from the H100 sweep (gemv4_sweep --h2, M = 1): 16
        #                   words a thread; BN=64 w=2 split 2 on 28672x4096 (34.4 µs against
        #                   BN=256 w=4 split 8), BN=128 w=4 at 4 waves on q|k|v, o and down
        bn = 64 if n >= 16384 else 128 if n >= 2048 else 32
        plan = Plan("gemv4h", block_m=1, block_n=bn, block_k=min(128, group),
                    num_warps=max(1, bn // 32), num_stages=1)
        tiles, waves = m * math.ceil(n / bn), MEMORY_BOUND_WAVES
    elif path == "gemv4":
        bn = 128 if n >= 16384 else 64 if n >= 2048 else 16
        if fmt == "nf4":  # code book gathers: 128 rows spill (ptxas: 255 regs), 64 use 178
            bn = min(bn, NF4_GEMV_BLOCK_N)
        plan = Plan("gemv4", block_m=1, block_n=bn, block_k=min(128, group),
                    num_warps=8 if bn == 16 else 4, num_stages=1)
        tiles, waves = m * math.ceil(n / bn), 2 * MEMORY_BOUND_WAVES if big else MEMORY_BOUND_WAVES
    elif path == "mma4":
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        bn = 128 if big or bm == 64 else 64
        plan = Plan("mma4", block_m=bm, block_n=bn, block_k=WORD_MMA_MIN_BLOCK_K,
                    num_warps=8 if bm == 64 else 4, num_stages=2 if bm == 16 else 4)
        tiles = math.ceil(m / bm) * math.ceil(n / bn)
        waves = (2 if bm == 64 else 2 * MEMORY_BOUND_WAVES if big else MEMORY_BOUND_WAVES)
    elif path == "gemv":
        plan = Plan("gemv", block_m=1, block_n=64, block_k=block_k_for(group, bits, 128),
                    num_warps=4, num_stages=2)
        tiles, waves = m * math.ceil(n / plan.block_n), MEMORY_BOUND_WAVES
    elif path == "splitk":
        plan = Plan("splitk", block_m=16, block_n=64, block_k=block_k_for(group, bits, 128),
                    num_warps=4, num_stages=4)
        tiles, waves = math.ceil(m / 16) * math.ceil(n / 64), MEMORY_BOUND_WAVES
    elif path == "tiled":
        bm = 32 if m <= 32 else 64 if m <= 64 else 128
        bn = 64 if bm <= 32 else 128
        plan = Plan("tiled", block_m=bm, block_n=bn, block_k=block_k_for(group, bits, 64),
                    num_warps=4 if bm <= 64 else 8, num_stages=4 if bm <= 64 else 3,
                    scale_w=True)
        tiles, waves = math.ceil(m / bm) * math.ceil(n / bn), COMPUTE_BOUND_WAVES
    else:
        raise ValueError(f"unknown weight-only path {path!r}; valid: {', '.join(PATHS)}")
    split = split_k_for(tiles, math.ceil(k / plan.block_k), sm_count, waves)
    return replace(plan, split_k=split)


def dequant_tile(group: int, k: int) -> tuple[int, int]:
    """(rows, K elements) of one dequantize program: 8192 weights (16 KB of 16-bit output per
    program, 64 per thread at 4 warps), the K block a power of two inside one group."""
    bk = max(16, min(512, group, 1 << max(k - 1, 1).bit_length()))
    return 8192 // bk, bk


def dequant_chunk_rows(n: int, k: int, chunk_bytes: int) -> int:
    """Rows per dequantize+GEMM chunk: equal chunks of at most ~chunk_bytes of 16-bit weight,
    a multiple of 128 rows (0: the whole weight in one chunk)."""
    chunks = math.ceil(2 * n * k / max(chunk_bytes, 1))
    if chunks <= 1:
        return 0
    rows = math.ceil(math.ceil(n / chunks) / 128) * 128
    return 0 if rows >= n else rows


def dispatch_table(n: int, k: int, fmt: str, group: int) -> list[dict]:
    """The path every M runs for an [n, k] weight, as contiguous ranges (m_max None: unbounded);
    lowering records it in the KernelBinding. Paths are constant from DEQUANT_MM_MIN_M up."""
    rows: list[dict] = []
    for m in range(1, DEQUANT_MM_MIN_M + 1):
        path = path_for(m, n, k, fmt, group)
        if rows and rows[-1]["path"] == path:
            rows[-1]["m_max"] = m
        else:
            rows.append({"m_min": m, "m_max": m, "path": path})
    rows[-1]["m_max"] = None
    return rows


def fp8_gemv_config(n: int, k: int, sm_count: int = 132) -> dict:
    """Tiles and split-K of the fused W8A8-FP8 decode GEMV, from the H100 sweep: 32 rows of 128
    bytes per step, split-K for 8 waves of programs; where the rows alone fill the GPU, split
    anyway so that a program streams at most 1024 bytes of a row (gate_up: 60.9 µs vs 68.5)."""
    block_n = 32
    split = split_k_for(math.ceil(n / block_n), math.ceil(k / 128), sm_count,
                        2 * MEMORY_BOUND_WAVES)
    if split == 1:
        split = math.ceil(k / 1024)
    return dict(BLOCK_N=block_n, BLOCK_K=128, split_k=split, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=8192)
def choose(m: int, n: int, k: int, *, bits: int, group: int, sm_count: int = 132,
           fmt: str = "") -> Plan:
    """Shape-aware path and tile choice for a weight-only GEMM [m, k] x [n, k]^T."""
    return plan_for(path_for(m, n, k, fmt, group), m, n, k, bits=bits, group=group,
                    sm_count=sm_count, fmt=fmt)


def k_blocks_per_split(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K blocks per split, actual splits) for a requested split; every split gets work."""
    blocks = math.ceil(k / block_k)
    per = math.ceil(blocks / max(1, split_k))
    return per, math.ceil(blocks / per)


def scale_strides(scales: torch.Tensor, out_features: int) -> tuple[int, int]:
    """(stride over output features, stride over groups) of a [N, G] or per-tensor [1, 1] scale."""
    if scales.dim() != 2:
        raise ValueError(f"scales must be 2-D [out_features, n_groups], got {tuple(scales.shape)}")
    sn = 0 if scales.shape[0] == 1 and out_features != 1 else scales.stride(0)
    sg = 0 if scales.shape[1] == 1 else scales.stride(1)
    return sn, sg


# --- FP8 / INT8 activation scale layouts -----------------------------------------------------

def scaled_mm_scales(act_scale: torch.Tensor, w_scale: torch.Tensor, m: int, n: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales in the form torch._scaled_mm takes: two fp32 scalars (tensor-wise), or a [M, 1]
    and a [1, N] fp32 pair (row-wise) when either side has one scale per row/channel."""
    a = act_scale.float().reshape(-1)
    b = w_scale.float().reshape(-1)
    if a.numel() == 1 and b.numel() == 1:
        return a.reshape(()), b.reshape(())
    a = a.expand(m) if a.numel() == 1 else a
    b = b.expand(n) if b.numel() == 1 else b
    return a.reshape(m, 1).contiguous(), b.reshape(1, n).contiguous()


def int_mm_rows(m: int) -> int:
    """torch._int_mm on CUDA needs more than 16 rows and a multiple of 8: rows to pad M to."""
    return max(32, math.ceil(m / 8) * 8)


# --- peer layout: torch's int4 tinygemm (torch._weight_int4pack_mm) -------------------------

TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_INNER_K_TILES = 8


def tinygemm_rejects(spec: QuantSpec, n: int, k: int) -> str | None:
    if spec.format not in ("int4", "uint4") or spec.granularity != "per_group":
        return f"tinygemm takes group-wise int4/uint4 weights, not {spec.describe()}"
    if spec.group_size not in TINYGEMM_GROUPS:
        return f"tinygemm group size must be in {TINYGEMM_GROUPS}, got {spec.group_size}"
    if k % (TINYGEMM_INNER_K_TILES * 16) or n % 8:
        return f"tinygemm needs K % {TINYGEMM_INNER_K_TILES * 16} == 0 and N % 8 == 0 (N={n}, K={k})"
    return None


def to_tinygemm(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                spec: QuantSpec, dtype: torch.dtype = torch.bfloat16
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Our packed int4 ([N, K/2] uint8, element 2i in the low nibble, signed two's complement, or
    uint4 with zero points) -> tinygemm's input: uint8 [N, K/2] holding unsigned codes u = q + 8
    with element 2i in the HIGH nibble, and scales_and_zeros [G, N, 2] where w = (u - 8) * s + z.

    Symmetric: u - 8 = q, so z = 0. Asymmetric (u in 0..15, w = (u - zp) * s): z = (8 - zp) * s.
    """
    data = qweight ^ 0x88 if spec.format == "int4" else qweight  # signed nibble -> q + 8
    swapped = ((data & 0x0F) << 4) | (data >> 4)
    s = scales.float()
    z = torch.zeros_like(s) if zeros is None else (8.0 - zeros.float()) * s
    sz = torch.stack((s.t(), z.t()), dim=-1).to(dtype).contiguous()
    return swapped.to(torch.uint8).contiguous(), sz


def dequantize_tinygemm_reference(packed_hi_first: torch.Tensor, scales_and_zeros: torch.Tensor,
                                  group: int, k: int) -> torch.Tensor:
    """Float32 weights tinygemm computes from `to_tinygemm`'s output (for tests)."""
    hi = (packed_hi_first >> 4).to(torch.int32)
    lo = (packed_hi_first & 0xF).to(torch.int32)
    u = torch.stack((hi, lo), dim=-1).flatten(-2)[:, :k].float()
    s = scales_and_zeros[..., 0].float().t().repeat_interleave(group, dim=1)[:, :k]
    z = scales_and_zeros[..., 1].float().t().repeat_interleave(group, dim=1)[:, :k]
    return (u - 8.0) * s + z
