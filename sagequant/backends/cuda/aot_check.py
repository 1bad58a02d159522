"""Compile every Triton kernel configuration the CUDA backend launches for an sm_90a target, on
any machine with triton (no GPU): catches compile errors before a GPU run and reports what the
compiler made of each (shared memory, registers and spills from ptxas, which MMA instructions).

    python -m sagequant.backends.cuda.aot_check [--defaults] [--filter TEXT] [--arch 90] [--sass]

Exit status 1 when a configuration fails to compile (spills are reported as WARN). Compiled
without launch-time knowledge, so pointers and the shape arguments in ALIGNED_INTS are declared
16-divisible, as the JIT specializes them on the 7B shapes: without that, loads do not vectorize.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from . import layout

QWEN2_7B = ((3584, 3584), (512, 3584), (37888, 3584), (3584, 18944))
WO_FLAGS = {  # format -> constexpr flags of the weight-only kernels
    "int4": dict(BITS=4, SIGNED=True, FP8=0, ASYM=False),
    "uint4": dict(BITS=4, SIGNED=False, FP8=0, ASYM=True),
    "int8": dict(BITS=8, SIGNED=True, FP8=0, ASYM=False),
    "fp8_e4m3": dict(BITS=8, SIGNED=False, FP8=1, ASYM=False),
}


# Integer arguments a real launch on the 7B shapes sees as multiples of 16 (the JIT specializes
# them, and pointers, as 16-divisible: that is what lets loads vectorize and pipeline).
ALIGNED_INTS = {"N", "K", "KB", "k_per_split", "stride_xm", "stride_wn", "stride_om", "stride_am",
                "stride_bn", "stride_qm", "MN", "GROUP", "KW", "words_per_split",
                # paged-KV kernels: cache / q / tail strides are multiples of head_dim
                "stride_qb", "stride_qh", "stride_kn", "stride_kh", "stride_kt", "sqb", "sqh",
                "skb", "skh", "svb", "svh", "scb", "sc_n", "sc_h", "sc_t", "st_s", "st_i", "st_h",
                "st_t"}
WORD_KINDS = {"int4": 0, "uint4": 1, "nf4": 2}  # triton_words.KINDS, without importing triton


def _signature(fn, types: dict, constexprs: dict) -> tuple[dict, dict]:
    """Triton signature (every parameter typed, i32 unless named in `types`) and the
    divisibility attributes a launch with 16-byte aligned tensors and 7B shapes gets."""
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: constexpr parameters without a value: {missing}")
    sig = {name: "constexpr" if name in constexprs else types.get(name, "i32")
           for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or name in ALIGNED_INTS}
    return sig, attrs


def weight_only_plans(defaults_only: bool = False) -> list:
    """The plans choose() makes on the 7B shapes, plus (unless defaults_only) the sweep's
    alternatives; split-K folded to 1 (the SPLIT flag is compiled both ways)."""
    plans = set()
    for n, k in QWEN2_7B:
        for m in (1, 8, 16, 64, 256, 1024):
            for path in ("gemv", "splitk", "tiled"):
                plans.add(layout.plan_for(path, m, n, k, bits=4, group=128))
    extra = []
    for p in ([] if defaults_only else plans):  # the sweep's alternatives
        if p.path != "gemv":
            extra += [replace(p, swap_ab=True), replace(p, block_n=128), replace(p, block_k=64),
                      replace(p, scale_w=not p.scale_w)]
    if not defaults_only:  # what an engine build times (measured_dispatch), byte kernels only
        from .measured_dispatch import candidates
        extra += [p for n, k in QWEN2_7B for m in (2, 8, 16, 32, 64, 256, 1024)
                  for p in candidates(m, n, k, "int4", 128) if p.path in ("splitk", "tiled")]
    return sorted({replace(p, split_k=1) for p in plans | set(extra)}, key=lambda p: p.describe())


def word_plans(fmt: str, defaults_only: bool = False) -> list:
    """The int32-word kernel plans choose() makes on the 7B shapes (plus, unless defaults_only,
    the variants an engine build times against them), split-K folded to 1."""
    from .measured_dispatch import word_variants
    chosen = [layout.choose(m, n, k, bits=4, group=128, fmt=fmt)
              for n, k in QWEN2_7B for m in (1, 8, 16, 32, 64)]
    extra = [] if defaults_only else [v for p in chosen for v in word_variants(p, fmt)]
    if fmt in layout.H2_FORMATS:  # the packed-fp16 GEMV measured dispatch also times
        h2 = [layout.plan_for("gemv4h", 1, n, k, bits=4, group=128, fmt=fmt) for n, k in QWEN2_7B]
        extra += h2 + [v for p in h2 for v in word_variants(p, fmt)]
        rows = [layout.plan_for("gemv4h", m, n, k, bits=4, group=128, fmt=fmt, rows=m)
                for n, k in QWEN2_7B for m in (2, 4, 8)]
        extra += rows + [replace(p, pair_runs=True) for p in rows]
    plans = {replace(p, split_k=1, launch_reduce=False) for p in chosen + extra}
    return sorted((p for p in plans if p.path in ("gemv4", "gemv4h", "mma4")),
                  key=lambda p: p.describe())


def word_configs(dt: str, defaults_only: bool = False):
    """The int32-word kernels (triton_words) and the fused FP8 decode GEMV, as launched."""
    from . import triton_fp8_gemv as fg
    from . import triton_gemv_h2 as th
    from . import triton_words as tw
    for fmt, kind in WORD_KINDS.items():
        base = {"x_ptr": f"*{dt}", "w_ptr": "*i32", "s_ptr": "*fp16",
                "z_ptr": "*i32" if kind == 1 else "*fp16", "book_ptr": "*fp32" if kind == 2
                else "*fp16", "b_ptr": f"*{dt}"}
        for plan in word_plans(fmt, defaults_only):
            # no split, summed in the GEMM, partials for _splitk_reduce (plan.launch_reduce)
            for split in (0, 2) if defaults_only else (0, 2, 1):
                types = dict(base, out_ptr=f"*{dt}", ws_ptr="*fp32" if split else f"*{dt}",
                             cnt_ptr="*i32" if split == 2 else "*fp32" if split else f"*{dt}")
                const = dict(KIND=kind, HAS_BIAS=True, SPLIT=split, BLOCK_N=plan.block_n,
                             BLOCK_KW=plan.block_k // 8)
                fn = {"gemv4": tw._gemv_kernel, "gemv4h": th._gemv_h2_kernel}.get(
                    plan.path, tw._mma_kernel)
                if plan.path == "gemv4h":  # x read as int32 words, K blocks even
                    const.update(PAIR_RUNS=plan.pair_runs, BF16=dt == "bf16", EVEN=True)
                    if plan.block_m > 1:   # rows of x a program
                        fn = th._gemv_h2_rows_kernel
                        const.update(ROWS=plan.block_m)
                    else:
                        const.update(PREFETCH=plan.prefetch)
                    types.pop("book_ptr")
                elif plan.path == "mma4":
                    const.update(BLOCK_M=plan.block_m, IN_PLACE=plan.in_place)
                else:
                    const.update(PREFETCH=plan.prefetch)
                yield f"word {fmt} {dt} {plan.describe()} split={split}", fn, types, const, \
                    dict(num_warps=plan.num_warps, num_stages=plan.num_stages)
                if plan.path == "gemv4h" and split == 0 and not defaults_only:  # ragged K
                    yield f"word {fmt} {dt} {plan.describe()} split={split} ragged", fn, types, \
                        dict(const, EVEN=False), dict(num_warps=plan.num_warps, num_stages=1)
        for group in (128, layout.BIG_GROUP):   # group-wise and per-channel tiles
            bn, bk = layout.dequant_tile(group, 4096)
            yield f"word dequant {fmt} {dt} {bn}x{bk}", tw._dequant_kernel, \
                dict(base, out_ptr=f"*{dt}"), dict(KIND=kind, BLOCK_N=bn, BLOCK_KW=bk // 8), \
                dict(num_warps=4)
    for static in (False, True):
        for split in (False, True):
            cfg = layout.fp8_gemv_config(3584, 3584)
            cfg.pop("split_k")
            opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            types = {"x_ptr": f"*{dt}", "w_ptr": "*u8", "sw_ptr": "*fp16",
                     "static_ptr": "*fp32" if static else "*fp16", "b_ptr": f"*{dt}",
                     "out_ptr": "*fp32" if split else f"*{dt}"}
            const = dict(cfg, STATIC=static, HAS_BIAS=True, SPLIT=split, BLOCK_A=fg.AMAX_BLOCK)
            yield f"fp8 decode gemv {dt} static={static} split={split}", fg._fp8_gemv_kernel, \
                types, const, opts


def fused_configs(dt: str):
    """The fused decoder-layer kernels (triton_fused) at Llama-3-8B width."""
    from . import triton_fused as tf
    for res in (False, True):
        yield f"fused add_rms_norm {dt} residual={res}", tf._add_rms_norm, \
            {"x_ptr": f"*{dt}", "r_ptr": f"*{dt}", "w_ptr": f"*{dt}", "out_ptr": f"*{dt}",
             "sum_ptr": f"*{dt}", "eps": "fp32"}, dict(HAS_RES=res, BLOCK=4096), dict(num_warps=8)
    yield f"fused rotary {dt}", tf._rotary, \
        {"x_ptr": f"*{dt}", "cos_ptr": f"*{dt}", "sin_ptr": f"*{dt}", "out_ptr": f"*{dt}"}, \
        dict(HALF=64), dict(num_warps=1)
    yield f"fused rope_cache_decode {dt}", tf._rope_cache_decode, \
        {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "cos_ptr": f"*{dt}",
         "sin_ptr": f"*{dt}", "qo_ptr": f"*{dt}", "kc_ptr": f"*{dt}", "vc_ptr": f"*{dt}",
         "table_ptr": "*i32", "pos_ptr": "*i64"}, dict(BS=16, HALF=64), dict(num_warps=1)
    yield f"fused silu_mul {dt}", tf._silu_mul, {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}",
                                                 "out_ptr": f"*{dt}"}, dict(BLOCK=1024), dict(num_warps=4)


def kv_configs(dt: str):
    """The paged-KV decode kernels (triton_kv_attention, triton_kv_write) at Llama-3-8B's
    attention shape (32 / 8 heads, head_dim 128, block 16)."""
    from . import triton_kv_attention as ka
    from . import triton_kv_write as kw
    for kv, code in (("none", dt), ("int8", "i8"), ("fp8", "fp8e4nv")):
        launch = ka.LAUNCH[kv]
        for group in (128, 32) if kv != "none" else (128,):
            types = {"q_ptr": f"*{dt}", "k_ptr": f"*{code}", "v_ptr": f"*{code}",
                     "ks_ptr": "*fp16", "vs_ptr": "*fp16", "table_ptr": "*i32", "lens_ptr": "*i32",
                     "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "qk_scale": "fp32",
                     "tail_ptr": f"*{dt}", "slot_ptr": "*i64"}
            const = dict(HEADS=32, REP=4, BLOCK_H=16, D=128, BS=16, BLOCK_N=launch.tile_tokens,
                         GROUP=group, QUANT=kv != "none")
            yield f"kv decode attention {kv} {dt} group={group} {launch.describe()}", \
                ka._decode_partial, types, const, \
                dict(num_warps=launch.num_warps, num_stages=launch.num_stages)
    yield "kv decode combine", ka._combine, {"acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32",
                                             "out_ptr": f"*{dt}"}, \
        dict(HEADS=32, D=128, SPLITS_P2=64), dict(num_warps=4)
    for code, qmax in (("i8", 127.0), ("fp8e4nv", 448.0)):
        for rope in (True, False):
            types = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "qo_ptr",
                                          "tail_ptr")}
            types.update(kc_ptr=f"*{code}", vc_ptr=f"*{code}", ks_ptr="*fp16", vs_ptr="*fp16",
                         table_ptr="*i32", pos_ptr="*i64", slot_ptr="*i64", flag_ptr="*u8", tiny="fp32")
            yield f"kv quant cache write {code} {dt} rope={rope}", kw._quant_cache_decode, types, \
                dict(BS=16, D=128, GROUP=128, QMAX=qmax, INT8=code == "i8", ROPE=rope), dict(num_warps=4)


def configs(defaults_only: bool = False):
    """(kernel name, fn, types, constexprs, options) for every configuration launched."""
    from . import triton_w8a8 as w8
    from . import triton_splitk as sk
    from . import triton_weight_only as wo
    yield from fused_configs("bf16")
    yield from kv_configs("bf16")
    yield from word_configs("bf16", defaults_only)  # the dtype they were timed in (fp16 compiles the same code)
    for dt in ("bf16", "fp16"):
        for fmt, flags in WO_FLAGS.items():
            for plan in weight_only_plans(defaults_only):
                for split in (False, True):
                    if dt == "fp16" and (split or plan.swap_ab):
                        continue
                    types = {"x_ptr": f"*{dt}", "w_ptr": "*u8", "s_ptr": "*fp16",
                             "z_ptr": "*i32" if flags["ASYM"] else "*fp16", "b_ptr": f"*{dt}",
                             "out_ptr": "*fp32" if split else f"*{dt}"}
                    opts = dict(num_warps=plan.num_warps, num_stages=plan.num_stages)
                    if plan.path == "gemv":
                        const = dict(flags, HAS_BIAS=True, SPLIT=split, BLOCK_N=plan.block_n,
                                     BLOCK_K=plan.block_k)
                        yield f"gemv {fmt} {dt} {plan.describe()} split={split}", \
                            wo._wo_gemv_kernel, types, const, opts
                    else:
                        group = 128 if flags["BITS"] == 4 else layout.BIG_GROUP  # as timed
                        const = dict(flags, HAS_BIAS=True, SPLIT=split, BLOCK_M=plan.block_m,
                                     BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
                                     GROUP_M=plan.group_m, SWAP_AB=plan.swap_ab,
                                     SCALE=wo.scale_mode(group, 3584, plan))
                        yield f"mma {fmt} {dt} {plan.describe()} split={split}", \
                            wo._wo_mma_kernel, types, const, opts
            types = {"w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*i32", "out_ptr": f"*{dt}"}
            for group in (128, layout.BIG_GROUP):   # group-wise and per-channel tiles
                bn, bk = layout.dequant_tile(group, 4096)
                yield f"dequant {fmt} {dt} {bn}x{bk}", wo._dequant_kernel, types, \
                    dict(flags, BLOCK_N=bn, BLOCK_K=bk), dict(num_warps=4)
        yield f"splitk_reduce {dt}", sk._splitk_reduce, \
            {"ws_ptr": "*fp32", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}"}, \
            dict(HAS_BIAS=True, BLOCK=1024), dict(num_warps=4)
        for qdt, qmax in (("i8", 127.0), ("fp8e4nv", 448.0)):
            for static in (False, True):
                for single, block in ((True, 4096), (False, 4096), (True, 128)):
                    types = {"x_ptr": f"*{dt}", "q_ptr": f"*{qdt}", "s_ptr": "*fp32",
                             "static_ptr": "*fp32"}
                    const = dict(QMAX=qmax, INT8=qdt == "i8", STATIC=static, SINGLE=single,
                                 BLOCK_K=block)
                    yield f"act_quant {qdt} {dt} static={static} single={single} {block}", \
                        w8._act_quant_kernel, types, const, \
                        dict(num_warps=8 if block >= 4096 else 4)
        for m in (1, 64, 256):
            cfg = w8.int8_gemm_config(m, 3584, 3584)
            cfg.pop("split_k")
            opts = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            for grouped in (False, True):
                for split in (False, True):
                    types = {"a_ptr": "*i8", "b_ptr": "*i8", "sa_ptr": "*fp32", "sb_ptr": "*fp16",
                             "bias_ptr": f"*{dt}", "out_ptr": "*fp32" if split else f"*{dt}"}
                    const = dict(cfg, GROUPED=grouped, HAS_BIAS=True, SPLIT=split, GROUP_M=8)
                    yield f"int8_gemm {dt} M={m} grouped={grouped} split={split} {cfg}", \
                        w8._int8_gemm_kernel, types, const, opts


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ptxas -v."""
    import triton.backends.nvidia as nv
    ptxas = Path(nv.__file__).parent / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        run = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(src), "-o",
                              str(Path(d) / "k.cubin")], capture_output=True, text=True)
    text = run.stdout + run.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return (int(regs.group(1)) if regs else -1,
            int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0)


def _loop_histogram(cubin: bytes) -> str:
    """The SASS of the kernel's longest loop (the body of its longest backward branch), counted
    by opcode: what the K loop issues per step, to compare variants without a GPU."""
    import triton.backends.nvidia as nv
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(Path(nv.__file__).parent / "bin" / "cuobjdump"), "-sass",
                               str(path)], capture_output=True, text=True).stdout
    op = r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);"  # addr, guard, op, rest
    code = [m.groups() for m in re.finditer(op, sass)]
    at = {int(a, 16): i for i, (a, _, _, _) in enumerate(code)}
    loop: list = []
    for i, (_, _, op, rest) in enumerate(code):
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        start = at.get(int(target.group(1), 16)) if target else None
        if start is not None and start < i and i + 1 - start > len(loop):
            loop = code[start:i + 1]
    counts: dict[str, int] = {}
    for _, _, op, _ in loop:
        counts[op] = counts.get(op, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:10]
    return f"loop={len(loop)} " + " ".join(f"{op}={n}" for op, n in top)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--filter", default="", help="only configurations whose name contains this")
    ap.add_argument("--defaults", action="store_true", help="only the plans choose() makes")
    ap.add_argument("--sass", action="store_true",
                    help="also count the SASS instructions of each kernel's main loop")
    args = ap.parse_args(argv)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    target = GPUTarget("cuda", args.arch, 32)
    bad = total = warned = 0
    for name, fn, types, const, opts in configs(args.defaults):
        if args.filter not in name:
            continue
        total += 1
        try:
            sig, attrs = _signature(fn, types, const)
            src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
            kernel = triton.compile(src, target=target, options=opts)
            ptx = kernel.asm["ptx"]
            regs, st, ld = _ptxas_report(ptx, args.arch)
            mma = ("wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "-")
            ok = True
            warned += st > 0 or ld > 0
            line = (f"regs={regs:3d} spill={st}/{ld} smem={kernel.metadata.shared:6d} "
                    f"mma={mma:8s} {name}")
            if args.sass:
                line += "\n       " + _loop_histogram(kernel.asm["cubin"])
        except Exception as err:  # report and go on: one broken config must not hide the rest
            ok, line = False, f"COMPILE ERROR {name}: {type(err).__name__}: {str(err)[:400]}"
        bad += not ok
        tag = "FAIL " if not ok else "WARN " if "spill=0/0" not in line else "ok   "
        print(tag + line, flush=True)
    print(f"aot_check: {total - bad} passed, {bad} failed, {warned} spill registers "
          f"(sm_{args.arch}a)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
