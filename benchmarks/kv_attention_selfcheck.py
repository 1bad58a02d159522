"""Self-check of the Triton paged-KV decode kernels on pools written through PagedKVPool itself.

    python benchmarks/kv_attention_selfcheck.py              # on the GPU (bf16 and fp16)
    python benchmarks/kv_attention_selfcheck.py --interpret  # on CPU via Triton's interpreter

Attention (triton_kv_attention.py) against the CPU reference kernel's math (gather + dequantize +
SDPA, in float64): int8 / fp8 / 16-bit caches, one scale per head or per channel group, block
size 16 and 32, grouped-query (rep 4) and plain multi-head, a sliding window, sequences of 1
token to several splits of several tiles, shuffled block tables.
The reference reads each open block from the pool's 16-bit tail, as the kernel must.
Cache write (triton_kv_write.py): rotated q and k against the ATen rotary (bit-equal in the
interpreter, within fused_check's tolerance on the GPU, where the two round a few outputs an ulp
apart), then codes, scales and 16-bit tails against PagedKVPool.write_decode of the kernel's own
rotated k, with writes that fill their block (cached 15, 31) and writes that do not: bit-equal
(fp8 codes by value; in the interpreter, whose fp8 cast halves values rounding into the next
binade, they may be that half where the reference is a power of two); a NaN must set the step's
flag or raise.
Prints one line per case; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import random
import sys

import torch

TOL = 2e-2  # relative L2 vs float64: bf16 q / p / dequantized k, v rounding is ~4e-3


def _case(kv, group, bs, heads, kv_heads, d, lens, window, launch, dtype, device, impl, seed=0):
    from sagequant.backends.reference.kv_attention import causal_mask
    from sagequant.ir.kv_plan import KVQuantPlan
    from sagequant.runtime.kv_pool import PagedKVPool

    torch.manual_seed(seed)
    plan = KVQuantPlan(dtype=kv, block_size=bs, group_size=group)
    blocks = sum(-(-n // bs) for n in lens) + 3
    pool = PagedKVPool(plan, [kv], kv_heads, d, blocks, len(lens), dtype, device)
    # Shuffle the free list so block tables are not contiguous.
    random.Random(seed).shuffle(pool._free)
    for slot, n in enumerate(lens):
        pool.open(slot, n)
        k = torch.randn(1, kv_heads, n, d, device=device) * 2
        v = torch.randn(1, kv_heads, n, d, device=device)
        if n > 1:   # prefill all but the last token, then one decode write
            pool.write(0, [slot], [0], k[:, :, :-1].to(dtype), v[:, :, :-1].to(dtype))
        pool.write(0, [slot], [n - 1], k[:, :, -1:].to(dtype), v[:, :, -1:].to(dtype))
    slots = list(range(len(lens)))
    q = torch.randn(len(lens), heads, 1, d, device=device).to(dtype)
    ref = torch.empty(q.shape, dtype=torch.float64, device=device)
    for row, (slot, n) in enumerate(zip(slots, lens)):
        k, v = pool.gather(0, slot, n, dtype=torch.float64)
        rep = heads // kv_heads
        mask = causal_mask(n - 1, 1, n, window, device)
        ref[row] = torch.nn.functional.scaled_dot_product_attention(
            q[row:row + 1].double(), k.repeat_interleave(rep, 0)[None],
            v.repeat_interleave(rep, 0)[None], attn_mask=mask)[0]
    cache = pool.layers[0]
    out = impl.paged_decode_attention(q, cache.k, cache.v, cache.k_scale, cache.v_scale,
                                      pool.block_table(slots),
                                      torch.tensor(lens, dtype=torch.int32, device=device),
                                      max(lens), None, window,
                                      impl.DecodeLaunch(**launch) if launch else None,
                                      tail=cache.tail, slots=torch.tensor(slots, device=device))
    return float((out.double() - ref).norm() / ref.norm())


DEFAULT = {}   # triton_kv_attention.LAUNCH of the cache dtype
SPLIT_TILES = dict(tile_tokens=32, target_programs=4)   # few splits of several tiles each
CASES = [  # kv, group, block, heads, kv_heads, head_dim, lens, window, launch
    ("int8", None, 16, 8, 2, 64, [1, 17, 300], 0, DEFAULT),
    ("fp8", None, 16, 8, 2, 64, [5, 64, 700], 0, DEFAULT),
    ("int8", 32, 32, 4, 4, 128, [33, 2000], 0, DEFAULT),
    ("fp8", 16, 32, 16, 4, 32, [40, 129], 0, DEFAULT),
    ("none", None, 16, 8, 2, 64, [3, 250], 0, DEFAULT),
    ("int8", None, 16, 8, 1, 64, [90, 300], 50, DEFAULT),
    ("fp8", None, 16, 8, 2, 64, [1, 200, 261], 0, SPLIT_TILES),
    ("none", None, 32, 4, 1, 32, [31, 250], 70, SPLIT_TILES),
    ("int8", 16, 16, 4, 2, 32, [2, 97], 0, dict(tile_tokens=16, target_programs=2, num_stages=1)),
]
WRITE_CASES = [  # kv, group, block, heads, kv_heads, head_dim, cached tokens per row, rotary
    ("int8", None, 16, 8, 2, 64, [0, 5, 15, 16, 40], True),
    ("fp8", None, 16, 8, 2, 64, [0, 5, 15, 16, 40], True),
    ("int8", 32, 32, 4, 4, 128, [3, 31, 33], False),   # 31: the write fills a 32-token block
    ("fp8", 16, 16, 4, 2, 32, [7, 31], True),
]


def _codes_equal(got: torch.Tensor, ref: torch.Tensor, interpreted: bool) -> bool:
    """int8 codes bit for bit; fp8 codes by value (-0 and +0 alike)."""
    if got.dtype != torch.float8_e4m3fn:
        return torch.equal(got, ref)
    g, r = got.float(), ref.float()
    same = g == r
    if interpreted:   # the interpreter's fp8 cast halves values that round into the next binade
        same |= (r != 0) & (torch.frexp(r.abs()).mantissa == 0.5) & (g * 2 == r)
    return bool(same.all())


def _rotation_ok(got: torch.Tensor, ref: torch.Tensor, interpreted: bool) -> bool:
    """Bit-equal in the interpreter; on the GPU within fused_check's rotary tolerance (the ATen
    ops and the kernel may round a few outputs an ulp apart)."""
    from sagequant.backends.cuda.fused_check import TOL
    if interpreted:
        return torch.equal(got, ref)
    return float((got.double() - ref.double()).norm() / ref.double().norm()) <= TOL[got.dtype]


def _write_case(kv, group, bs, heads, kv_heads, d, starts, rope, dtype, device, nan=None):
    """Decode-step cache write of one token per row after `starts` cached tokens, through the
    engine's entry (fused.quantized_cache_decode); returns the names of what differs from the
    reference (empty: all equal): rotary of q and k vs the ATen rotary, then the block write vs
    PagedKVPool.write_decode of the kernel's own rotated k. nan "flag" / "raise": a NaN in k
    must set the step's device flag / raise at once in an eager step (no flag)."""
    from sagequant.backends.cuda.fused import quantized_cache_decode, rotate_half_ref
    from sagequant.ir.formats import QuantizationError
    from sagequant.ir.kv_plan import KVQuantPlan
    from sagequant.runtime.kv_pool import PagedKVPool

    torch.manual_seed(0)
    rows = len(starts)
    pool = PagedKVPool(KVQuantPlan(dtype=kv, block_size=bs, group_size=group), [kv], kv_heads, d,
                       sum(n // bs + 1 for n in starts) + 2, rows, dtype, device)
    random.Random(0).shuffle(pool._free)
    for slot, n in enumerate(starts):
        pool.open(slot, n + 1)
        if n:
            pool.write(0, [slot], [0], (torch.randn(1, kv_heads, n, d, device=device) * 3).to(dtype),
                       torch.randn(1, kv_heads, n, d, device=device).to(dtype))
    ref_pool = copy.deepcopy(pool)
    rnd = lambda *shape: torch.randn(*shape, device=device).to(dtype)  # noqa: E731
    q, k, v = rnd(rows, heads, 1, d), rnd(rows, kv_heads, 1, d) * 2, rnd(rows, kv_heads, 1, d)
    if nan:
        k[0, 0, 0, 3] = float("nan")
    cos, sin = (rnd(rows, 1, 1, d), rnd(rows, 1, 1, d)) if rope else (None, None)
    index = pool.decode_index(list(range(rows)), starts)
    index.nonfinite = None if nan == "raise" else torch.zeros(1, dtype=torch.bool, device=device)
    c, r = pool.layers[0], ref_pool.layers[0]
    if nan == "raise":
        try:
            quantized_cache_decode(q, k, v, cos, sin, c, index)
        except QuantizationError:
            return []
        return ["no error"]
    got_q = quantized_cache_decode(q, k, v, cos, sin, c, index)
    if nan == "flag":
        return [] if bool(index.nonfinite) else ["flag"]
    interpreted = device.type == "cpu"
    got_k = torch.stack([c.tail[row, 0, :, n % bs] for row, n in enumerate(starts)])[:, :, None]
    ref_q, ref_k = (rotate_half_ref(q, cos, sin), rotate_half_ref(k, cos, sin)) if rope else (q, k)
    wrong = [n for n, got, ref in (("q", got_q, ref_q), ("rotated k", got_k, ref_k))
             if not _rotation_ok(got, ref, interpreted)]
    ref_index = ref_pool.decode_index(list(range(rows)), starts)
    ref_index.nonfinite = torch.zeros(1, dtype=torch.bool, device=device)
    ref_pool.write_decode(0, ref_index, got_k, v)
    wrong += [n for n in ("k_scale", "v_scale", "tail") if not torch.equal(getattr(c, n), getattr(r, n))]
    wrong += [n for n in ("k", "v") if not _codes_equal(getattr(c, n), getattr(r, n), interpreted)]
    return wrong + (["flag"] if bool(index.nonfinite) else [])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interpret", action="store_true", help="CPU, Triton's interpreter, fp16")
    ap.add_argument("--dtypes", nargs="+", choices=["bf16", "fp16"], default=["bf16", "fp16"],
                    help="activation dtypes on the GPU")
    args = ap.parse_args()
    if args.interpret:
        from sagequant.backends.cuda.interpret import enable_triton_interpreter
        enable_triton_interpreter()
        device, dtypes = torch.device("cpu"), [torch.float16]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --interpret on CPU")
            return 1
        named = {"bf16": torch.bfloat16, "fp16": torch.float16}
        device, dtypes = torch.device("cuda"), [named[d] for d in args.dtypes]
    impl = importlib.import_module("sagequant.backends.cuda.triton_kv_attention")
    failed = 0
    for dtype in dtypes:
        for kv, group, bs, heads, kvh, d, lens, window, launch in CASES:
            if args.interpret and max(lens) > 300:
                lens = [min(n, 300) for n in lens]
            err = _case(kv, group, bs, heads, kvh, d, lens, window, launch, dtype, device, impl)
            ok = err < TOL
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} kv={kv:4s} group={group} block={bs} heads={heads}/{kvh} "
                  f"d={d} lens={lens} window={window} {launch} {str(dtype)[6:]}: rel err {err:.2e}")
        for case in WRITE_CASES + [WRITE_CASES[0][:-1] + (True, "flag"), WRITE_CASES[1] + ("raise",)]:
            wrong = _write_case(*case[:8], dtype=dtype, device=device, nan=case[8] if len(case) > 8 else None)
            failed += bool(wrong)
            print(f"{'FAIL' if wrong else 'ok  '} write kv={case[0]:4s} group={case[1]} block={case[2]} "
                  f"heads={case[3]}/{case[4]} d={case[5]} cached={case[6]} rotary={case[7]}"
                  f"{' NaN: ' + case[8] if len(case) > 8 else ''} {str(dtype)[6:]}"
                  + (f": differs in {wrong}" if wrong else ": equal"))
    print("all passed" if not failed else f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
