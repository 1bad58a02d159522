"""Self-check of the fused decoder kernels (triton_fused.py) against the ops they replace.

    python -m sagequant.backends.cuda.fused_check              # on the GPU, bf16
    python -m sagequant.backends.cuda.fused_check --interpret  # on CPU, Triton's interpreter, fp16

The kernels round where the ATen ops round, so outputs should match the reference to the last
bit except where rsqrt / exp differ by an ulp (the tolerance allows a few ulps of the dtype).
The rope/cache kernel must also leave every cache entry
it does not own as it was. Exit status 1 when a case fails.
"""
from __future__ import annotations

import argparse
import sys

import torch

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # rel. Frobenius; ~1 ulp of a few outputs


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape or not bool(torch.isfinite(out).all()):
        return float("inf")
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def cases(device, dtype):
    from . import triton_fused as tf
    from .fused import rotate_half_ref
    from ...ir.ops import rms_norm
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    for shape in [(3, 200), (2, 5, 256), (1, 4096)]:
        x, r, w = rnd(*shape), rnd(*shape), rnd(shape[-1])
        total = x + r
        got, got_total = tf.add_rms_norm(x, r, w, 1e-5)
        yield f"add_rms_norm {shape}", max(_rel(got, rms_norm(total, w, 1e-5, 0.0)), _rel(got_total, total))
        yield f"rms_norm {shape}", _rel(tf.add_rms_norm(x, None, w, 1e-6)[0], rms_norm(x, w, 1e-6, 0.0))
    for b, s, heads, d in [(2, 3, 4, 64), (3, 1, 8, 128)]:
        flat = rnd(b, s, heads * d)
        x = flat.view(b, s, heads, d).transpose(1, 2)        # the view the graph rotates
        cos, sin = rnd(b, s, d)[:, None], rnd(b, s, d)[:, None]
        yield f"rotary b{b} s{s} h{heads} d{d}", _rel(tf.rotary(x, cos, sin), rotate_half_ref(x, cos, sin))
    yield from _rope_cache_cases(tf, rotate_half_ref, rnd, device, dtype)
    for shape in [(1, 300), (4, 2, 1000)]:
        a, u = rnd(*shape), rnd(*shape)
        yield f"silu_mul {shape}", _rel(tf.silu_mul(a, u), torch.nn.functional.silu(a) * u)
    gate_up = rnd(2, 3, 2 * 700)   # the halves of a merged gate_up output: strided views
    a, u = gate_up[..., :700], gate_up[..., 700:]
    yield "silu_mul halves (2, 3, 700)", _rel(tf.silu_mul(a, u), torch.nn.functional.silu(a) * u)


def _rope_cache_cases(tf, rotate_half_ref, rnd, device, dtype):
    rows, heads, kv_heads, d, bs, blocks = 3, 8, 2, 64, 16, 10
    q, k, v = rnd(rows, 1, heads * d), rnd(rows, 1, kv_heads * d), rnd(rows, 1, kv_heads * d)
    q = q.view(rows, 1, heads, d).transpose(1, 2)
    k = k.view(rows, 1, kv_heads, d).transpose(1, 2)
    v = v.view(rows, 1, kv_heads, d).transpose(1, 2)
    cos, sin = rnd(rows, 1, d)[:, None], rnd(rows, 1, d)[:, None]
    k_cache, v_cache = rnd(blocks, kv_heads, bs, d), rnd(blocks, kv_heads, bs, d)
    table = torch.tensor([[4, 1, 0], [7, 2, 0], [9, 3, 5]], dtype=torch.int32, device=device)
    pos = torch.tensor([20, 3, 40], dtype=torch.int64, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    rk = rotate_half_ref(k, cos, sin)
    for row in range(rows):
        blk, off = int(table[row, int(pos[row]) // bs]), int(pos[row]) % bs
        k_ref[blk, :, off], v_ref[blk, :, off] = rk[row, :, 0], v[row, :, 0]
    got = tf.rope_cache_decode(q, k, v, cos, sin, k_cache, v_cache, table, pos)
    yield "rope_cache_decode q", _rel(got, rotate_half_ref(q, cos, sin))
    yield "rope_cache_decode k cache", 0.0 if torch.equal(k_cache, k_ref) else _rel(k_cache, k_ref)
    yield "rope_cache_decode v cache", 0.0 if torch.equal(v_cache, v_ref) else float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interpret", action="store_true", help="CPU, Triton's interpreter (fp16)")
    args = ap.parse_args(argv)
    if args.interpret:
        from .interpret import enable_triton_interpreter
        enable_triton_interpreter()
        device, dtype = torch.device("cpu"), torch.float16
    else:
        if not torch.cuda.is_available():
            raise SystemExit("needs a CUDA GPU (or --interpret)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    failed = total = 0
    for name, err in cases(device, dtype):
        ok = err <= TOL[dtype]
        failed += not ok
        total += 1
        print(f"{'ok  ' if ok else 'FAIL'} {name}: rel {err:.2e}")
    print(f"fused kernels: {total} cases, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
