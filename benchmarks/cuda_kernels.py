"""CUDA kernel table on the Qwen2-7B layer shapes (issue 5), in one command on a GPU machine:

    PYTHONUNBUFFERED=1 python3 benchmarks/cuda_kernels.py --out "$OUT"     (about 5-6 minutes)

1. correctness: every kernel variant against the float64 reference numerics of
   sagequant.ir.quant_spec (dequantize -> float64 matmul; W8A8 also quantizes x the reference
   way) at several M, on the four 7B shapes plus a ragged-group and an odd-K shape; bias and
   fp16 activations; activation codes bit-for-bit; split-K determinism; the CPU reference ops.
2. timing: CUDA-graph replays, rotating weight copies so each replay streams >= 4x the L2, at
   M in {1, 8, 16, 64, 256, 1024, 4096}, bf16 F.linear and the peers in the same run; the
   memory floor at M=1 from the measured copy bandwidth.
3. sweep: tile / split-K / chunk alternatives of the W4A16 paths with the time that is left.
Writes cuda_kernels.json and cuda_kernels.md under --out; prints the tables last. Sections stop
starting new work past fixed fractions of --budget-s, so partial results still get written.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_bench_lib as lib  # noqa: E402
import cuda_variants as cv  # noqa: E402

SHAPES = {"q_o": (3584, 3584), "k_v": (512, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}
CHECK_ONLY = {"ragged": (1000, 4000), "odd_k": (520, 1001)}  # 31 groups + 32; K odd, 7 + 105
MS = (1, 8, 16, 64, 256, 1024, 4096)
CHECK_MS = (1, 7, 16, 64, 300, 1024)
EXTRA_MS = (1, 16, 64, 1024)  # bias and fp16 checks
ACT = torch.bfloat16
TOL = {"bf16": 5e-3, "wo": 5e-3, "fp8_dyn": 1e-2, "fp8_static": 1e-2, "int8_dyn": 1e-2}
SECTION_END = {"check": 0.40, "time": 0.82, "sweep": 0.95}
SWEEP_EVERY = 1  # --smoke runs every 9th sweep case
PATH_VARIANTS = ("w4a16:gemv", "w4a16:splitk", "w4a16:tiled", "w4a16:dequant_mm")


def ctx_for(layer, v, x, bias=None) -> dict:
    from sagequant.backends.cuda import triton_w8a8
    ctx = {"layer": layer, "fmt": "int4" if v.fmt in ("tinygemm", "bf16") else v.fmt, "bias": bias,
           "static_scale": (x.abs().amax().float() / 448.0).reshape(1, 1)}
    if v.name == "fp8-mm-only":
        ctx["fp8_x"] = triton_w8a8.quantize_activation(x, "fp8_e4m3")
    return ctx


def randn(*shape, gen=None, dtype=None, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, device=lib.DEVICE, generator=gen) * scale).to(dtype or ACT)


def applies(v, layer, m, dtype=None) -> bool:
    dtype = dtype or ACT
    if not v.min_m <= m <= v.max_m:
        return False
    if v.needs_k16 and (layer.n % 16 or layer.k % 16):
        return False
    return not (v.fmt == "tinygemm" and (dtype != torch.bfloat16 or layer.tinygemm is None))


def check_one(v, layer, m, dtype, bias=False, seed=0) -> dict:
    gen = torch.Generator(device=lib.DEVICE).manual_seed(seed)
    x = randn(m, layer.k, gen=gen, dtype=dtype)
    b = randn(layer.n, gen=gen, dtype=dtype, scale=0.1) if bias else None
    ctx = ctx_for(layer, v, x, b)
    ref = cv.reference(layer, v.ref, ctx["fmt"], x, b, ctx["static_scale"])
    lib.poison(m * layer.n, dtype)
    out = v.call(x, cv.weight_args(layer, v.fmt), m, ctx)
    lib.sync()
    err = lib.rel_errors(out, ref)
    return {"variant": v.name, "shape": layer.name, "m": m, "dtype": str(dtype).split(".")[-1],
            "bias": bias, **err, "pass": err["finite"] and err["rel_fro"] <= TOL[v.ref]}


def correctness(res, layers, variants, budget) -> None:
    stop = SECTION_END["check"] * budget.limit
    plan = [(v, layer, m, ACT, False) for v in variants.values() for layer in layers.values()
            for m in CHECK_MS]
    for name in ("k_v", "q_o"):  # Qwen2's q/k/v carry a bias; fp16 models exist too
        for v in variants.values():
            if v.registered:
                plan += [(v, layers[name], m, dt, bias) for m in EXTRA_MS
                         for dt, bias in ((ACT, True), (torch.float16, name == "k_v"))]
    for v, layer, m, dtype, bias in plan:
        if not applies(v, layer, m, dtype):
            continue
        if budget.elapsed() > stop:
            res["skipped"].append(f"correctness {v.name} {layer.name} M={m}: budget")
            continue
        try:
            rec = check_one(v, layer, m, dtype, bias, seed=len(res["correctness"]))
        except Exception as err:
            rec = {"variant": v.name, "shape": layer.name, "m": m, "pass": False,
                   "error": lib.short_error(err)}
        res["correctness"].append(rec)
        if not rec["pass"] and sum(not r["pass"] for r in res["correctness"]) <= 8:
            print("CHECK FAIL", json.dumps(rec), flush=True)
    extra_checks(res, layers, variants)
    print(f"correctness: {sum(r['pass'] for r in res['correctness'])}/{len(res['correctness'])} "
          f"passed ({budget.elapsed():.0f}s)", flush=True)


def extra_checks(res, layers, variants) -> None:
    """Activation codes bit-for-bit, split-K determinism, and the CPU reference ops."""
    from sagequant.backends.cuda import triton_w8a8
    from sagequant.ir.quant_spec import QuantSpec, quantize
    out = res["extra"]
    specs = cv.act_specs(QuantSpec)
    x = randn(64, layers["q_o"].k, scale=3.0)
    for fmt, key in (("fp8_e4m3", "fp8_dyn"), ("int8", "int8_dyn")):
        try:
            q, s = triton_w8a8.quantize_activation(x, fmt)
            ref = quantize(x, specs[key])
            same = (q.view(torch.uint8) == ref.data.view(torch.uint8)).float().mean().item()
            out[f"act_codes_equal_{fmt}"] = same
            out[f"act_scales_equal_{fmt}"] = bool(torch.equal(s, ref.scale))
        except Exception as err:
            out[f"act_codes_equal_{fmt}"] = lib.short_error(err)
    layer = layers["q_o"]
    for vname in ("w4a16", "w4a16:splitk", "w4a16:gemv"):
        v = variants[vname]
        x1 = randn(1, layer.k)
        try:
            a = [v.call(x1, cv.weight_args(layer, v.fmt), 1, ctx_for(layer, v, x1)) for _ in range(3)]
            out[f"deterministic_{vname}"] = all(torch.equal(a[0], t) for t in a[1:])
        except Exception as err:
            out[f"deterministic_{vname}"] = lib.short_error(err)
    ops = torch.ops.sagequant
    layer = layers["k_v"]
    for v in variants.values():  # the registered op on GPU vs the reference op on the CPU
        if not v.registered:
            continue
        try:
            x = randn(7, layer.k)
            ctx = ctx_for(layer, v, x)
            qt = layer.q[v.fmt]
            gpu = v.call(x, cv.weight_args(layer, v.fmt), 7, ctx).float().cpu()
            args = [x.cpu(), qt.data.cpu(), qt.scale.cpu(),
                    None if qt.zero_point is None else qt.zero_point.cpu(), None, qt.spec.encode(),
                    [layer.n, layer.k]]
            if v.ref == "wo":
                cpu = ops.weight_only_linear_ref(*args)
            else:
                act = specs[v.ref]
                cpu = ops.w8a8_linear_ref(*args, act.encode(),
                                          ctx["static_scale"].cpu() if v.ref.endswith("static") else None)
            out[f"vs_cpu_reference_op_{v.name}"] = lib.rel_errors(gpu, cpu.double())["rel_fro"]
        except Exception as err:
            out[f"vs_cpu_reference_op_{v.name}"] = lib.short_error(err)


def timing(res, layers, variants, budget, l2) -> None:
    from sagequant.backends.cuda import layout
    stop = SECTION_END["time"] * budget.limit
    for v in variants.values():
        for name in SHAPES:
            layer = layers[name]
            if budget.elapsed() > stop:
                res["skipped"].append(f"timing {v.name} {name}: budget")
                continue
            try:
                args0 = cv.weight_args(layer, v.fmt)
            except Exception as err:
                res["errors"].append(f"timing {v.name} {name}: {lib.short_error(err)}")
                continue
            n_copies = lib.copies_for(lib.tensor_bytes(*args0), l2)
            copies = [args0] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in args0)
                                for _ in range(n_copies - 1)]
            fails = 0
            for m in MS:
                if not applies(v, layer, m) or fails >= 2:
                    continue
                x = randn(m, layer.k)
                ctx = ctx_for(layer, v, x)
                rec = {"variant": v.name, "shape": name, "m": m,
                       "weight_bytes": lib.tensor_bytes(*args0)}
                if v.registered and v.ref == "wo":
                    spec = layer.q[v.fmt].spec
                    rec["path"] = layout.choose(m, layer.n, layer.k, bits=spec.fmt.bits,
                                                group=layout.kernel_group(spec, layer.k)).path
                try:
                    rec.update(lib.time_graph([functools.partial(v.call, x, a, m, ctx) for a in copies]))
                except Exception as err:
                    fails += 1
                    rec["error"] = lib.short_error(err)
                    res["errors"].append(f"timing {v.name} {name} M={m}: {rec['error']}")
                res["timing"].append(rec)
            del copies
            torch.cuda.empty_cache()
        print(f"timed {v.name} ({budget.elapsed():.0f}s)", flush=True)


def sweep_cases():
    """(shape, M, path, plan overrides), most useful first; {} is the default plan, timed first
    in each group."""
    small = [{}, dict(block_n=32), dict(block_n=128), dict(block_k=64), dict(num_warps=8),
             dict(split_mult=2), dict(split_mult=0.5)]
    splitk = small + [dict(swap_ab=True), dict(swap_ab=True, block_n=128), dict(scale_w=True),
                      dict(num_stages=3), dict(num_stages=6)]
    gemv = small + [dict(num_warps=2), dict(block_n=16, num_warps=2), dict(num_stages=1),
                    dict(num_stages=3)]
    tiled = [{}, dict(swap_ab=True), dict(scale_w=False), dict(block_m=64, block_n=64, block_k=128),
             dict(block_m=128, block_n=128, block_k=128), dict(block_m=128, block_n=256),
             dict(block_m=64, block_n=256, num_warps=8), dict(num_stages=4), dict(num_stages=2),
             dict(split_mult=2), dict(swap_ab=True, block_n=256, num_warps=8)]
    chunks = [{}, dict(chunk_bytes=0), dict(chunk_bytes=16 << 20), dict(chunk_bytes=64 << 20)]
    groups = [("gate_up", 1, "splitk", splitk), ("gate_up", 1, "gemv", gemv),
              ("gate_up", 16, "splitk", splitk), ("gate_up", 256, "tiled", tiled),
              ("gate_up", 64, "tiled", tiled), ("gate_up", 4096, "dequant_mm", chunks),
              ("down", 4096, "dequant_mm", chunks), ("q_o", 1, "splitk", splitk),
              ("q_o", 1, "gemv", gemv), ("down", 1, "splitk", splitk), ("down", 1, "gemv", gemv),
              ("q_o", 16, "splitk", splitk), ("k_v", 1, "splitk", splitk), ("k_v", 1, "gemv", gemv),
              ("q_o", 256, "tiled", tiled), ("down", 256, "tiled", tiled),
              ("gate_up", 1024, "tiled", tiled), ("gate_up", 1024, "dequant_mm", chunks)]
    return [(shape, m, path, o) for shape, m, path, overs in groups for o in overs]


def sweep(res, layers, variants, budget, l2) -> None:
    from sagequant.backends.cuda import layout
    stop = SECTION_END["sweep"] * budget.limit
    for shape, m, path, over in sweep_cases()[::SWEEP_EVERY]:
        if budget.elapsed() > stop:
            res["skipped"].append(f"sweep {shape} M={m} {path} {over}: budget")
            continue
        layer, v = layers[shape], variants[f"w4a16:{path}"]
        spec = layer.q["int4"].spec
        base = layout.plan_for(path, m, layer.n, layer.k, bits=4, group=spec.group_size)
        over = dict(over)
        if "split_mult" in over:
            over["split_k"] = max(1, int(base.split_k * over.pop("split_mult")))
        if "chunk_bytes" in over:
            over["chunk_n"] = layout.dequant_chunk_rows(layer.n, layer.k, over.pop("chunk_bytes"))
        rec = {"shape": shape, "m": m, "path": path}
        try:
            plan = replace(base, **over)
            rec["plan"] = plan.describe()
            x = randn(m, layer.k)
            ctx = {**ctx_for(layer, v, x), "plan": plan}
            err = lib.rel_errors(v.call(x, cv.weight_args(layer, "int4"), m, ctx),
                                 cv.reference(layer, "wo", "int4", x, None, None))
            args0 = cv.weight_args(layer, "int4")
            copies = [args0] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in args0)
                                for _ in range(lib.copies_for(lib.tensor_bytes(*args0), l2) - 1)]
            rec.update(lib.time_graph([functools.partial(v.call, x, a, m, ctx) for a in copies]))
            rec["rel_fro"] = err["rel_fro"]
            del copies
        except Exception as e:
            rec["error"] = lib.short_error(e)
        res["sweep"].append(rec)
    print(f"sweep: {len(res['sweep'])} plans ({budget.elapsed():.0f}s)", flush=True)


def smoke_mode() -> None:
    global SHAPES, CHECK_ONLY, MS, CHECK_MS, EXTRA_MS, ACT, SWEEP_EVERY
    lib.DEVICE = "cpu"
    lib.import_sagequant()
    from sagequant.backends.cuda import hardware, interpret
    interpret.enable_triton_interpreter()
    hardware.require_cuda_tensors = lambda kernel, **tensors: None
    SHAPES = {"q_o": (64, 256), "k_v": (32, 256), "gate_up": (96, 256), "down": (64, 512)}
    CHECK_ONLY = {"ragged": (40, 200), "odd_k": (24, 161)}
    MS, CHECK_MS, EXTRA_MS, ACT, SWEEP_EVERY = (1, 16, 64), (1, 7, 16, 64), (1, 16), torch.float16, 9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for cuda_kernels.json / .md")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget (seconds)")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="no GPU: tiny shapes on CPU through the Triton interpreter (checks this "
                         "script and the kernels' logic; its timings mean nothing)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = lib.Budget(args.budget_s)
    if args.smoke:
        smoke_mode()
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/cuda_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "--smoke runs it on CPU through the Triton interpreter")
    sq = lib.import_sagequant()
    import cuda_report  # noqa: E402
    res = {"env": lib.environment(), "correctness": [], "extra": {}, "timing": [], "sweep": [],
           "errors": [], "skipped": [], "command": " ".join(sys.argv)}
    res["env"]["copy_GBps"] = lib.measure_bandwidth()
    res["env"]["bf16_8192_TFLOPs"] = lib.measure_matmul_tflops()
    print(json.dumps(res["env"]), flush=True)
    l2 = res["env"]["l2_bytes"] or (50 << 20)
    layers = {name: cv.prepare(sq, name, n, k, seed=i)
              for i, (name, (n, k)) in enumerate({**SHAPES, **CHECK_ONLY}.items())}
    variants = cv.build_variants()
    save = functools.partial(cuda_report.write, out, res)
    for section in ("correctness", "timing", "sweep"):
        if section == "sweep" and args.skip_sweep:
            continue
        try:
            if section == "correctness":
                correctness(res, layers, variants, budget)
                for layer in layers.values():
                    layer.deq.clear()
                torch.cuda.empty_cache()
            elif section == "timing":
                timing(res, {k: layers[k] for k in SHAPES}, variants, budget, l2)
            else:
                sweep(res, layers, variants, budget, l2)
        except Exception as err:  # keep what the other sections measured
            res["errors"].append(f"{section} aborted: {lib.short_error(err)}")
        save(SHAPES, MS, PATH_VARIANTS)
    res["env"]["elapsed_s"] = round(budget.elapsed(), 1)
    print(save(SHAPES, MS, PATH_VARIANTS))


if __name__ == "__main__":
    main()
