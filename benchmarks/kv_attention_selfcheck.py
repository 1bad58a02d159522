"""Self-check of the Triton paged decode-attention kernel against the CPU reference kernel's math
(gather + dequantize + SDPA, in float64), on pools written through PagedKVPool itself.

    python benchmarks/kv_attention_selfcheck.py              # on the GPU (bf16 and fp16)
    python benchmarks/kv_attention_selfcheck.py --interpret  # on CPU via Triton's interpreter

Cases cover int8 / fp8 / 16-bit caches, one scale per head or per channel group, block size 16
and 32, grouped-query (rep 4) and plain multi-head, a sliding window, sequences of 1 token to
several splits, shuffled block tables. Prints one line per case; exit status 1 on any failure.
"""
from __future__ import annotations

import argparse
import importlib
import random
import sys

import torch

TOL = 2e-2  # relative L2 vs float64: bf16 q / p / dequantized k, v rounding is ~4e-3


def _case(kv, group, bs, heads, kv_heads, d, lens, window, dtype, device, impl, seed=0):
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
                                      max(lens), None, window)
    return float((out.double() - ref).norm() / ref.norm())


CASES = [  # kv, group, block, heads, kv_heads, head_dim, lens, window
    ("int8", None, 16, 8, 2, 64, [1, 17, 300], 0),
    ("fp8", None, 16, 8, 2, 64, [5, 64, 700], 0),
    ("int8", 32, 32, 4, 4, 128, [33, 2000], 0),
    ("fp8", 16, 32, 16, 4, 32, [40, 129], 0),
    ("none", None, 16, 8, 2, 64, [3, 250], 0),
    ("int8", None, 16, 8, 1, 64, [90, 300], 50),
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interpret", action="store_true", help="CPU, Triton's interpreter, fp16")
    args = ap.parse_args()
    if args.interpret:
        from sagequant.backends.cuda.interpret import enable_triton_interpreter
        enable_triton_interpreter()
        device, dtypes = torch.device("cpu"), [torch.float16]
    else:
        if not torch.cuda.is_available():
            print("no CUDA device; use --interpret on CPU")
            return 1
        device, dtypes = torch.device("cuda"), [torch.bfloat16, torch.float16]
    impl = importlib.import_module("sagequant.backends.cuda.triton_kv_attention")
    failed = 0
    for dtype in dtypes:
        for kv, group, bs, heads, kvh, d, lens, window in CASES:
            if args.interpret and max(lens) > 300:
                lens = [min(n, 300) for n in lens]
            err = _case(kv, group, bs, heads, kvh, d, lens, window, dtype, device, impl)
            ok = err < TOL
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} kv={kv:4s} group={group} block={bs} heads={heads}/{kvh} "
                  f"d={d} lens={lens} window={window} {str(dtype)[6:]}: rel err {err:.2e}")
    print("all passed" if not failed else f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
