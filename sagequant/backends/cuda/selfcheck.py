"""Self-check of the CUDA kernels against the float64 reference numerics, on small shapes chosen
to hit every edge: weight quantization on the device bit-identical to the CPU's, each weight-only
path and format, ragged last groups, odd K (a padding
nibble), forced split-K and chunked dequantize, bias, 3-D inputs; the activation quantizer (codes
and scales bit-for-bit), the fused INT8 GEMM and the FP8 torch._scaled_mm path.

    python -m sagequant.backends.cuda.selfcheck              # on the GPU
    python -m sagequant.backends.cuda.selfcheck --interpret  # on CPU, Triton's interpreter
    python -m sagequant.backends.cuda.selfcheck --only words # the 4-bit word kernels only
    python -m sagequant.backends.cuda.selfcheck --only h2    # the packed-fp16 GEMV only

Prints one line per case; exit status 1 when any case fails. Under the interpreter, activations
are fp16 (it has no bf16) and FP8 activation codes are not compared (its fp8 cast rounds
differently from the GPU's round-to-nearest-even).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from ...ir.quant_spec import QuantSpec, dequantize, quantize
from . import layout

TOL = 3e-3  # fp16/bf16 output rounding dominates: ~2e-4 (fp16) .. 2e-3 (bf16)
WEIGHT_CASES = [  # (format, granularity, group, symmetric, N, K)
    ("int4", "per_group", 32, True, 48, 200),     # ragged: 6 x 32 + 8
    ("int4", "per_group", 64, True, 40, 161),     # odd K: padding nibble, 2 x 64 + 33
    ("uint4", "per_group", 32, False, 40, 96),
    ("int8", "per_channel", None, True, 40, 96),
    ("int8", "per_tensor", None, True, 24, 64),
    ("uint8", "per_group", 16, False, 24, 80),
    ("fp8_e4m3", "per_channel", None, True, 40, 96),
    ("fp8_e5m2", "per_group", 32, True, 24, 64),
]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _differ(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Elements of a dequantized weight that differ from the reference's, bit for bit."""
    return float((out.cpu().view(torch.int16) != ref.view(torch.int16)).sum())


def weight_only_cases(device, dtype):
    from . import triton_weight_only as two
    for i, (fmt, gran, g, sym, n, k) in enumerate(WEIGHT_CASES):
        gen = torch.Generator().manual_seed(i)
        spec = QuantSpec(fmt, gran, g, sym, "fp16")
        qt = quantize(torch.randn(n, k, generator=gen), spec)
        w64 = dequantize(qt, torch.float64)
        data, scale = qt.data.to(device), qt.scale.to(device)
        zero = None if qt.zero_point is None else qt.zero_point.to(device)
        group = layout.kernel_group(spec, k)
        rows = two.dequantize_weight(data, scale, zero, spec, [n, k], dtype, rows=(8, n))
        differ = _differ(rows, dequantize(qt)[8:].to(dtype))
        yield f"dequantize_weight {spec.describe()} rows 8..{n} bit-exact", differ, differ == 0
        for path, m in (("gemv", 3), ("splitk", 5), ("tiled", 37), ("dequant_mm", 9)):
            for variant in ("plain", "split", "bias3d", "swap", "scale_w", "overlap"):
                plan = layout.plan_for(path, m, n, k, bits=spec.fmt.bits, group=group, sm_count=4)
                if variant == "split":
                    plan = replace(plan, split_k=3, chunk_n=16)
                if variant == "overlap":
                    if path != "dequant_mm":
                        continue
                    plan = replace(plan, chunk_n=8, overlap=True)  # 3+ chunks: both scratches
                if variant == "swap":
                    if path not in ("splitk", "tiled"):
                        continue
                    plan = replace(plan, swap_ab=True, split_k=2)
                if variant == "scale_w":
                    if path not in ("splitk", "tiled"):
                        continue
                    plan = replace(plan, scale_w=not plan.scale_w, swap_ab=path == "splitk")
                x = torch.randn(m, k, generator=gen).to(dtype)
                bias = torch.randn(n, generator=gen).to(dtype) if variant == "bias3d" else None
                xin = x.reshape(1, m, k) if variant == "bias3d" else x
                ref = x.double() @ w64.t() + (0 if bias is None else bias.double())
                out = two.weight_only_linear(xin.to(device), data, scale, zero,
                                             None if bias is None else bias.to(device), spec,
                                             [n, k], plan=plan)
                err = _rel(out.reshape(m, n).cpu(), ref)
                yield f"wo {spec.describe()} N={n} K={k} {plan.describe()} {variant}", err, err <= TOL


def quantize_parity_cases(device):
    """quantize() on the device gives the CPU's codes, scales and zero points bit for bit (the
    layer-wise compile rounds on the GPU; the CPU reference path must get the same artifact)."""
    for i, (fmt, gran, g, sym, n, k) in enumerate(WEIGHT_CASES + [("int4", "per_group", 128, True, 512, 576)]):
        for scale_dtype in ("fp16", "fp32"):
            spec = QuantSpec(fmt, gran, g, sym, scale_dtype)
            w = torch.randn(n, k, generator=torch.Generator().manual_seed(100 + i))
            ref, got = quantize(w, spec), quantize(w.to(device), spec)
            pairs = [(ref.data, got.data), (ref.scale, got.scale)] + (
                [] if ref.zero_point is None else [(ref.zero_point, got.zero_point)])
            differ = sum(int((a != b.cpu()).sum()) for a, b in pairs)
            yield f"quantize on {device} == on cpu, {spec.describe()} N={n} K={k}", float(differ), differ == 0


WORD_CASES = [  # (format, granularity, group, symmetric, N, K): K % 8 == 0, groups >= 128 blocks
    ("int4", "per_group", 128, True, 40, 320),    # ragged: 2 x 128 + 64
    ("uint4", "per_group", 128, False, 24, 256),
    ("nf4", "per_group", 128, True, 40, 384),
    ("nf4", "per_group", 64, True, 24, 192),      # gemv4 only (mma4 needs 128-element blocks)
    ("int4", "per_channel", None, True, 24, 264),
]


def word_cases(device, dtype, only_h2=False):
    """The int32-word kernels (gemv4, mma4) on every 4-bit format, forced and by choose();
    only_h2: gemv4h's cases only."""
    from . import triton_weight_only as two
    for i, (fmt, gran, g, sym, n, k) in enumerate(WORD_CASES):
        gen = torch.Generator().manual_seed(100 + i)
        spec = QuantSpec(fmt, gran, g, sym, "fp16")
        qt = quantize(torch.randn(n, k, generator=gen), spec)
        w64 = dequantize(qt, torch.float64)
        data, scale = qt.data.to(device), qt.scale.to(device)
        zero = None if qt.zero_point is None else qt.zero_point.to(device)
        group = layout.kernel_group(spec, k)
        from .triton_words import dequantize_words
        if not only_h2:
            rows = dequantize_words(data, scale, zero, fmt, group, (8, n), k,
                                    torch.empty((n - 8, k), dtype=dtype, device=device))
            differ = _differ(rows, dequantize(qt)[8:].to(dtype))
            yield f"dequantize_words {spec.describe()} rows 8..{n} bit-exact", differ, differ == 0
        runs = [("gemv4", 1, {}), ("gemv4", 3, dict(split_k=3)), ("auto", 1, {}),
                ("gemv4", 2, dict(split_k=2, prefetch=True, block_n=32, num_warps=1)),
                ("dequant4_mm", 9, dict(chunk_n=16)), ("dequant4_mm", 9, {}),
                ("dequant4_mm", 9, dict(chunk_n=8, overlap=True))]
        if layout.word_rejects(fmt, k, group, layout.WORD_MMA_MIN_BLOCK_K) is None:
            runs += [("mma4", 5, {}), ("mma4", 5, dict(split_k=2)), ("mma4", 37, {}),
                     ("mma4", 70, dict(block_m=32, block_n=32)), ("auto", 9, {}),
                     ("auto", 70, {})]
        if fmt in layout.H2_FORMATS and device != "cpu":  # inline PTX: not in the interpreter
            runs += [("gemv4h", 1, {}), ("gemv4h", 3, dict(split_k=3)),
                     ("gemv4h", 2, dict(split_k=2, prefetch=True, block_n=32, num_warps=1)),
                     ("gemv4h", 1, dict(split_k=2, block_n=256, num_warps=4, launch_reduce=True)),
                     ("gemv4h", 2, dict(x_dtype=torch.float16, split_k=2)),
                     ("gemv4h", 8, dict(split_k=2, prefetch=True)),  # EVEN K: clamped prefetch
                     ("gemv4h", 1, dict(pair_runs=True)),
                     ("gemv4h", 3, dict(split_k=3, pair_runs=True)),
                     ("gemv4h", 2, dict(split_k=2, prefetch=True, pair_runs=True)),
                     ("gemv4h", 8, dict(x_dtype=torch.float16, pair_runs=True, launch_reduce=True,
                                        split_k=2)),
                     ("gemv4h", 8, dict(block_m=8)),   # rows of x a program: one decode
                     ("gemv4h", 5, dict(block_m=8, pair_runs=True, split_k=2)),  # rows past M
                     ("gemv4h", 3, dict(block_m=2, split_k=3)),
                     ("gemv4h", 6, dict(block_m=4, x_dtype=torch.float16, pair_runs=True,
                                        launch_reduce=True, split_k=2))]
        for path, m, over in [r for r in runs if r[0] == "gemv4h" or not only_h2]:
            over = dict(over)
            x_dtype = over.pop("x_dtype", dtype)
            for with_bias in (False, True):
                plan = None if path == "auto" else replace(layout.plan_for(
                    path, m, n, k, bits=4, group=group, sm_count=4), **over)
                x = torch.randn(m, k, generator=gen).to(x_dtype)
                bias = torch.randn(n, generator=gen).to(x_dtype) if with_bias else None
                xin = x.reshape(1, m, k) if with_bias else x
                ref = x.double() @ w64.t() + (0 if bias is None else bias.double())
                out = two.weight_only_linear(xin.to(device), data, scale, zero,
                                             None if bias is None else bias.to(device), spec,
                                             [n, k], plan=plan)
                err = _rel(out.reshape(m, n).cpu(), ref)
                name = plan.describe() if plan else "auto " + layout.choose(
                    m, n, k, bits=4, group=group, fmt=fmt).describe()
                yield (f"word {spec.describe()} N={n} K={k} M={m} {name}"
                       f"{' bias3d' if with_bias else ''}"
                       f"{'' if x_dtype == dtype else ' x ' + str(x_dtype)[6:]}"), err, err <= TOL


def word_variant_cases(device, dtype, only_h2=False):
    """The int32-word kernels' variants (layout.WORD_FLAGS) give the same bits as the plain plan:
    split-K summed by the GEMM's last program or by a second kernel (the same order), the GEMVs'
    prefetch (gemv4h on the GPU only), the MMA's in-place planes (fp32 x under the interpreter,
    which has no bf16; fp16 has not the range, so it keeps shifted planes); the tile counters are
    left zeroed."""
    from . import triton_splitk as sk
    from . import triton_words as tw
    gen = torch.Generator().manual_seed(120)
    n, k = 40, 512
    spec = QuantSpec("int4", "per_group", 128, True, "fp16")
    qt = quantize(torch.randn(n, k, generator=gen), spec)
    data, scale = qt.data.to(device), qt.scale.to(device)
    in_place_dtype = torch.float32 if device == "cpu" else dtype
    for path, m, over, flag, dt in (
            ("gemv4", 3, dict(split_k=4, block_n=16), "launch_reduce", dtype),
            ("gemv4", 2, dict(split_k=3, block_n=32, num_warps=1), "prefetch", dtype),
            ("mma4", 18, dict(split_k=3, block_n=32), "launch_reduce", dtype),
            ("mma4", 5, dict(split_k=2), "in_place", in_place_dtype),
            *([] if device == "cpu" else [  # gemv4h: inline PTX, not in the interpreter
                ("gemv4h", 8, dict(split_k=4, block_n=32, num_warps=1), "prefetch", dtype),
                ("gemv4h", 3, dict(split_k=4), "launch_reduce", dtype)])):
        if only_h2 and path != "gemv4h":
            continue
        plan = replace(layout.plan_for(path, m, n, k, bits=4, group=128, sm_count=4), **over)
        x = torch.randn(m, k, generator=gen).to(dt).to(device)
        bias = torch.randn(n, generator=gen).to(dt).to(device)
        outs = []
        for variant in (plan, replace(plan, **{flag: True})):
            out = torch.empty(m, n, dtype=dt, device=device)
            tw.word_linear(x, data, scale, None, bias, out, "int4", 128, variant)
            outs.append(out.cpu())
        differ = int((outs[0] != outs[1]).sum())
        ref = x.cpu().double() @ dequantize(qt, torch.float64).t() + bias.cpu().double()
        err = _rel(outs[1], ref)
        counters = int(sk.tile_counters(torch.device(device), 1).abs().sum())
        yield (f"word {plan.describe()} M={m} {str(dt)[6:]}: {flag} changes {differ} elements, "
               f"rel {err:.1e}, counters left {counters}"), float(differ + counters), \
            differ == 0 and counters == 0 and err <= TOL


def activation_cases(device, dtype, interpret):
    from . import triton_w8a8 as w8
    gen = torch.Generator().manual_seed(7)
    for fmt in ("int8", "fp8_e4m3"):
        for k in (100, 9000):  # one-pass and looped rows
            x = (torch.randn(6, k, generator=gen) * 3).to(dtype)
            x[2] = 0  # an all-zero row gets scale 1
            for static in (None, torch.tensor([[0.05]])):
                gran = "per_tensor" if static is not None else "per_token"
                spec = QuantSpec(fmt, gran, None, True, "fp32", dynamic=static is None)
                ref = quantize(x, spec, scale=static)
                q, s = w8.quantize_activation(x.to(device), fmt,
                                              None if static is None else static.to(device))
                same = (q.cpu().view(torch.uint8).reshape(-1)
                        == ref.data.view(torch.uint8).reshape(-1)).float().mean().item()
                scales_ok = static is not None or torch.equal(s.cpu(), ref.scale)
                exact = same == 1.0 or (interpret and fmt != "int8")
                yield (f"act-quant {fmt} K={k} {gran} codes equal {same:.4f} scales equal "
                       f"{scales_ok}"), 1.0 - same, bool(exact and scales_ok)


def w8a8_cases(device, dtype):
    """The GEMMs on the reference's own activation codes, so only the GEMM is compared."""
    from . import triton_w8a8 as w8
    gen = torch.Generator().manual_seed(11)
    cases = [(gran, g, fmt, act) for gran, g in (("per_channel", None), ("per_group", 32),
                                                 ("per_tensor", None))
             for fmt in ("int8", "fp8_e4m3") for act in ("per_token", "per_tensor")
             if not (fmt == "fp8_e4m3" and gran == "per_group")]
    dev = lambda t: t.to(device)  # noqa: E731
    for gran, g, fmt, act in cases:
        n, k, m = 48, 128, 19
        wspec = QuantSpec(fmt, gran, g, True, "fp16")
        qt = quantize(torch.randn(n, k, generator=gen), wspec)
        x = torch.randn(m, k, generator=gen).to(dtype)
        bias = torch.randn(n, generator=gen).to(dtype)
        aspec = QuantSpec(fmt, act, None, True, "fp32", dynamic=act == "per_token")
        xq = quantize(x, aspec, scale=None if act == "per_token" else torch.tensor([[0.03]]))
        codes = xq.data.reshape(m, k)
        wq = layout.weight_rows(qt.data, wspec, n, k)
        ref = dequantize(xq, torch.float64).reshape(m, k) @ dequantize(qt, torch.float64).t() \
            + bias.double()
        name = f"w8a8 {fmt} weight {gran}{'' if g is None else g} act {act} bias"
        if fmt == "int8":
            out = w8.int8_linear(dev(codes), dev(xq.scale), dev(wq), dev(qt.scale),
                                 layout.kernel_group(wspec, k), dev(bias), dtype)
            split = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2, split_k=3)
            alt = w8.int8_linear(dev(codes), dev(xq.scale), dev(wq), dev(qt.scale),
                                 layout.kernel_group(wspec, k), dev(bias), dtype, config=split)
            err = _rel(alt.cpu(), ref)
            yield name + " split-K 3", err, err <= TOL
            if gran != "per_group" and device == "cuda":
                alt = w8.int8_linear_int_mm(dev(codes), dev(xq.scale), dev(wq),
                                            dev(qt.scale), dev(bias), dtype)
                err = _rel(alt.cpu(), ref)
                yield name + " torch._int_mm", err, err <= TOL
        else:
            out = w8.fp8_linear(dev(codes), dev(xq.scale), dev(wq), dev(qt.scale),
                                dev(bias), dtype, fast_accum=False)
        err = _rel(out.cpu(), ref)
        yield name, err, err <= 5e-3


def fp8_gemv_cases(device, dtype, interpret):
    """The fused W8A8-FP8 decode kernel (quantize x inside the GEMV) against the reference's
    quantize -> dequantize -> float64 GEMM; 1e-2 because a code that rounds the other way at a
    tie-breaking boundary moves one element by one e4m3 step. Under the interpreter, whose fp8
    cast is wrong just below powers of two (31.6 -> 16), the reference dequantizes the codes of
    triton_w8a8's quantizer (the same rounding code), which tests the GEMV's own logic."""
    from . import triton_fp8_gemv as fg
    from . import triton_w8a8 as w8
    gen = torch.Generator().manual_seed(13)
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    for gran in ("per_channel", "per_tensor"):
        for act in ("per_token", "per_tensor"):
            for n, k, m, cfg in ((48, 320, 1, None), (40, 2100, 2, dict(BLOCK_N=16, BLOCK_K=128,
                                                                       split_k=3, num_warps=2,
                                                                       num_stages=1))):
                wspec = QuantSpec("fp8_e4m3", gran, None, True, "fp16")
                qt = quantize(torch.randn(n, k, generator=gen), wspec)
                x = (torch.randn(m, k, generator=gen) * 2).to(dtype)
                bias = torch.randn(n, generator=gen).to(dtype) if cfg is None else None
                static = None if act == "per_token" else torch.tensor([[0.02]])
                aspec = QuantSpec("fp8_e4m3", act, None, True, "fp32", dynamic=static is None)
                if interpret:
                    codes, xs = w8.quantize_activation(x, "fp8_e4m3", static)
                    xdq = codes.double() * xs.double()
                else:
                    xdq = dequantize(quantize(x, aspec, scale=static), torch.float64).reshape(m, k)
                ref = xdq @ dequantize(qt, torch.float64).t()
                ref = ref + (0 if bias is None else bias.double())
                wq = layout.weight_rows(qt.data, wspec, n, k)
                out = fg.fp8_gemv(dev(x), dev(static), dev(wq), dev(qt.scale), dev(bias), dtype,
                                  config=cfg)
                err = _rel(out.cpu(), ref)
                yield (f"fp8 gemv weight {gran} act {act} N={n} K={k} M={m}"
                       f"{' split 3' if cfg else ' bias'}"), err, err <= 1e-2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="CUDA kernel self-check")
    ap.add_argument("--interpret", action="store_true", help="CPU tensors, Triton interpreter")
    ap.add_argument("--only", choices=("words", "h2"), help="only the 4-bit int32-word kernels' "
                    "cases (h2: only the packed-fp16 GEMV's)")
    args = ap.parse_args(argv)
    if args.interpret:
        from .interpret import enable_triton_interpreter
        enable_triton_interpreter()
        device, dtype = "cpu", torch.float16
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
    else:
        print("selfcheck: no CUDA device; run with --interpret (needs triton)", file=sys.stderr)
        return 2
    failed = total = 0
    h2 = args.only == "h2"
    groups = [word_cases(device, dtype, h2), word_variant_cases(device, dtype, h2)]
    if args.only is None:
        groups = [quantize_parity_cases(device), *groups,
                  fp8_gemv_cases(device, dtype, args.interpret), weight_only_cases(device, dtype),
                  activation_cases(device, dtype, args.interpret), w8a8_cases(device, dtype)]
    for cases in groups:
        for name, err, ok in cases:
            total += 1
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {err:.2e} {name}", flush=True)
    print(f"selfcheck: {total - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
