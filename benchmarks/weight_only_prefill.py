"""Weight-only GEMMs at prefill M on one GPU (issue 18, BENCHMARKS.md §13g).

Llama-3-8B's four linears (q|k|v 6144x4096, o 4096x4096, gate|up 28672x4096, down 4096x14336),
int4 g128 and int8 per-channel (symmetric, fp32 scales: the engine's W4A16 / W8A16), bf16
activations, M = 64 .. 2048:
- the dequantize kernels' bandwidth: int4 through the byte kernel (what int4 dequant_mm ran
  before) and the int32-word kernel (now), int8 through the byte kernel; GB/s counts packed
  weight + scales read and the 16-bit weight written;
- every path the measured dispatch times at that M (measured_dispatch.candidates: the M
  thresholds' own choice, dequantize + cuBLAS whole / 32 MB chunks / 8 and 16 MB chunks with the
  side-stream overlap, tiled, mma4, splitk), a few extra `tiled` tile variants, and the bf16
  cuBLAS GEMM on the dequantized weight; the fastest candidate is what an engine build installs;
- correctness in the same run: both dequantizers bit for bit against ir.quant_spec.dequantize,
  and every path's output against a float64 GEMM of the reference weight.
Timing: backends/cuda/measure_paths._graph_us (5 calls in one CUDA graph, median of 3 replays),
the engine build's own timer.

    python benchmarks/weight_only_prefill.py --out DIR [--budget-s 200]
    python benchmarks/weight_only_prefill.py --smoke   # CPU: Triton interpreter, tiny shapes
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_bench_lib as lib  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SMOKE_SHAPES = {"a": (384, 256), "b": (128, 512)}
MS, SMOKE_MS = (64, 128, 256, 512, 1024, 2048), (40, 130)
TILED_VARIANTS = {"bk128": dict(block_k=128), "swap": dict(swap_ab=True),
                  "swap_bk128": dict(swap_ab=True, block_k=128)}
TILED_VARIANTS_MIN_M = 256  # (each variant is a compile; below this the tiled tiles differ anyway)
TOL = 5e-3  # bf16 output rounding is ~2e-3 of the Frobenius norm


def formats():
    from sagequant.ir.quant_spec import QuantSpec
    return {"int4_g128": QuantSpec("int4", "per_group", 128, True, "fp32"),
            "int8_channel": QuantSpec("int8", "per_channel", None, True, "fp32")}


def timer(smoke: bool):
    if smoke:  # the interpreter runs the kernels; its times mean nothing
        return lambda fn: (fn(), None)[1]
    from sagequant.backends.cuda.measure_paths import _graph_us
    return lambda fn: round(_graph_us(fn), 2)


def rel_fro(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out.double() - ref).norm() / ref.norm())


def bits_differ(out: torch.Tensor, ref: torch.Tensor) -> int:
    return int((out.view(torch.int16) != ref.view(torch.int16)).sum())


def dequant_rows(name, spec, qt, n, k, dtype, time_us) -> list[dict]:
    """Both dequantizers on the whole weight: µs, GB/s, bits differing from the reference."""
    from sagequant.backends.cuda import layout
    from sagequant.backends.cuda.triton_weight_only import dequantize_weight
    from sagequant.backends.cuda.triton_words import dequantize_words
    from sagequant.ir.quant_spec import dequantize
    ref = dequantize(qt).to(dtype)
    out = torch.empty((n, k), dtype=dtype, device=qt.data.device)
    group = layout.kernel_group(spec, k)
    kernels = {"byte": lambda: dequantize_weight(qt.data, qt.scale, None, spec, [n, k], dtype,
                                                 out=out)}
    if spec.format == "int4":
        kernels["word"] = lambda: dequantize_words(qt.data, qt.scale, None, "int4", group,
                                                   (0, n), k, out)
    moved = qt.data.numel() * qt.data.element_size() + qt.scale.numel() * 4 + 2 * n * k
    rows = []
    for kernel, fn in kernels.items():
        out.fill_(float("nan"))
        fn()
        differ = bits_differ(out, ref)
        us = time_us(fn)
        rows.append({"shape": name, "format": spec.describe(), "kernel": kernel, "us": us,
                     "GB_s": round(moved / us / 1e3, 1) if us else None, "bits_differ": differ})
    return rows


def plans_at(m, n, k, spec, group, sms):
    """(label, plan): the registry's candidates (first: the M thresholds' choice), then, from
    TILED_VARIANTS_MIN_M, the extra tiled variants."""
    from sagequant.backends.cuda import layout, measured_dispatch
    cands = measured_dispatch.candidates(m, n, k, spec.format, group, sms)
    out = [("candidate", p) for p in cands]
    base = layout.plan_for("tiled", m, n, k, bits=spec.fmt.bits, group=group, sm_count=sms,
                           fmt=spec.format)
    for label, over in (TILED_VARIANTS.items() if m >= TILED_VARIANTS_MIN_M else ()):
        p = replace(base, **over)
        if layout.group_rejects(spec) is None and group % p.block_k == 0 and p not in cands:
            out.append((f"tiled_{label}", p))
    return out


def gemm_rows(name, spec, qt, n, k, dtype, ms, time_us, budget, smoke) -> list[dict]:
    from sagequant.backends.cuda import layout, measured_dispatch
    from sagequant.backends.cuda.hardware import sm_count
    from sagequant.backends.cuda.triton_weight_only import weight_only_linear
    from sagequant.ir.quant_spec import dequantize
    dev = qt.data.device
    sms = sm_count(dev) if not smoke else 4
    group = layout.kernel_group(spec, k)
    w64 = dequantize(qt, torch.float64)
    w16 = w64.to(dtype)
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for m in ms:
        if budget.left() < 0:
            rows.append({"shape": name, "format": spec.describe(), "m": m, "skipped": "budget"})
            continue
        x = torch.randn(m, k, device=dev, generator=gen).to(dtype)
        ref = x.double() @ w64.t()
        bf16 = torch.mm(x, w16.t())
        row = {"shape": name, "format": spec.describe(), "n": n, "k": k, "m": m,
               "bf16_us": time_us(lambda: torch.mm(x, w16.t())), "bf16_rel_fro": rel_fro(bf16, ref),
               "paths": []}
        for label, plan in plans_at(m, n, k, spec, group, sms):
            entry = {"plan": plan.describe(), "kind": label}
            fn = lambda p=plan: weight_only_linear(x, qt.data, qt.scale, None, None, spec,  # noqa: E731
                                                  [n, k], plan=p)
            try:
                err = rel_fro(fn(), ref)
                entry.update(us=time_us(fn), rel_fro=err, ok=err <= TOL)
            except Exception as e:  # recorded; the other paths still run
                entry["error"] = lib.short_error(e)
            row["paths"].append(entry)
        timed = [p for p in row["paths"] if p.get("us") is not None and p.get("ok")]
        cands = [p for p in timed if p["kind"] == "candidate"]
        if cands:
            best = min(cands, key=lambda p: p["us"])
            row.update(registry_choice=best["plan"], registry_us=best["us"],
                       thresholds=row["paths"][0]["plan"], thresholds_us=row["paths"][0].get("us"),
                       best_any=min(timed, key=lambda p: p["us"])["plan"])
            row["x_bf16"] = round(best["us"] / row["bf16_us"], 3) if row["bf16_us"] else None
        rows.append(row)
        print(f"{name} {spec.describe()} M={m}: bf16 {row['bf16_us']} | " + ", ".join(
            f"{p['plan']} {p.get('us')}{'' if p.get('ok', False) else ' ERR'}"
            for p in row["paths"]), flush=True)
    return rows


def install_and_route(rows, spec, n, k, dtype, dev) -> list[dict]:
    """Install the measured choices as an engine build would and read back what each M runs."""
    from sagequant.backends.cuda import layout, measured_dispatch
    from sagequant.backends.cuda.hardware import sm_count
    measured = [r for r in rows if "registry_choice" in r]
    if not measured or dev.type != "cuda":
        return []
    key = measured_dispatch.key(dev, spec, [n, k], False, dtype)
    group = layout.kernel_group(spec, k)
    sms = sm_count(dev)
    by_desc = {}
    for r in measured:
        for _, plan in plans_at(r["m"], n, k, spec, group, sms):
            by_desc[(r["m"], plan.describe())] = plan
    table = [{"m": r["m"], "path": by_desc[(r["m"], r["registry_choice"])].path,
              "chunk_n": by_desc[(r["m"], r["registry_choice"])].chunk_n,
              "overlap": by_desc[(r["m"], r["registry_choice"])].overlap} for r in measured]
    measured_dispatch.install(key, table)
    return [{"m": r["m"], "routes_to": measured_dispatch.plan_for(
        key, r["m"], n, k, bits=spec.fmt.bits, group=group, sm_count=sms,
        fmt=spec.format).describe()} for r in measured]


def layer_totals(rows) -> list[dict]:
    """Per format and M: the four linears' best µs summed against bf16 (one decoder layer's
    GEMMs; full depth is 32 of these)."""
    out = []
    for fmt in sorted({r["format"] for r in rows}):
        for m in sorted({r["m"] for r in rows}):
            got = [r for r in rows if r["format"] == fmt and r["m"] == m and "registry_us" in r]
            if len(got) < len({r["shape"] for r in rows}):
                continue
            q, b = sum(r["registry_us"] for r in got), sum(r["bf16_us"] for r in got)
            out.append({"format": fmt, "m": m, "quant_us": round(q, 1), "bf16_us": round(b, 1),
                        "x_bf16": round(q / b, 3)})
    return out


def markdown(result) -> str:
    lines = ["Dequantize (whole weight):", "",
             lib.markdown_table(["shape", "format", "kernel", "µs", "GB/s", "bits differing"],
                                [[r["shape"], r["format"], r["kernel"], r["us"], r["GB_s"],
                                  r["bits_differ"]] for r in result["dequant"]]), "",
             "GEMMs (µs): bf16 cuBLAS, the registry's fastest candidate, the thresholds' path, "
             "the best dequantize + cuBLAS and the best tiled of any variant:", ""]
    body = []
    for r in result["gemm"]:
        if "paths" not in r:
            continue
        ok = [p for p in r["paths"] if p.get("ok")]
        dq = min((p for p in ok if p["plan"].startswith("dequant")), key=lambda p: p["us"] or 0,
                 default=None)
        tl_ = min((p for p in ok if p["plan"].startswith("tiled")), key=lambda p: p["us"] or 0,
                  default=None)
        worst = max((p.get("rel_fro", 0) for p in r["paths"]), default=0)
        body.append([r["shape"], r["format"], r["m"], r["bf16_us"], r.get("registry_choice"),
                     r.get("registry_us"), r.get("x_bf16"), r.get("thresholds_us"),
                     dq and f"{dq['us']} {dq['plan']}", tl_ and f"{tl_['us']} {tl_['plan']}",
                     f"{worst:.2e}"])
    lines.append(lib.markdown_table(["shape", "format", "M", "bf16", "registry choice", "µs",
                                     "× bf16 time", "thresholds µs", "best dequant+cuBLAS",
                                     "best tiled", "worst rel_fro"], body))
    lines += ["", "One layer's four linears (sum of the registry's choices vs bf16):", "",
              lib.markdown_table(["format", "M", "quantized µs", "bf16 µs", "× bf16 time"],
                                 [[t["format"], t["m"], t["quant_us"], t["bf16_us"], t["x_bf16"]]
                                  for t in result["layer_totals"]])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        from sagequant.backends.cuda.interpret import enable_triton_interpreter
        enable_triton_interpreter()
        lib.DEVICE = "cpu"
    lib.import_sagequant()
    from sagequant.ir.quant_spec import quantize
    dev = torch.device(lib.DEVICE)
    dtype = torch.float16 if args.smoke else torch.bfloat16
    shapes, ms = (SMOKE_SHAPES, SMOKE_MS) if args.smoke else (SHAPES, MS)
    budget, time_us = lib.Budget(args.budget_s), timer(args.smoke)
    result = {"env": lib.environment(), "ms": list(ms), "dequant": [], "gemm": [], "routes": {}}
    with torch.no_grad():
        for fmt, spec in formats().items():
            for name, (n, k) in shapes.items():
                gen = torch.Generator(device=dev).manual_seed(n + k)
                w = torch.randn(n, k, device=dev, generator=gen) * 0.02
                qt = quantize(w, spec)
                del w
                result["dequant"] += dequant_rows(name, spec, qt, n, k, dtype, time_us)
                rows = gemm_rows(name, spec, qt, n, k, dtype, ms, time_us, budget, args.smoke)
                result["gemm"] += rows
                result["routes"][f"{fmt} {name}"] = install_and_route(rows, spec, n, k, dtype, dev)
                del qt
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    result["layer_totals"] = layer_totals([r for r in result["gemm"] if "paths" in r])
    result["elapsed_s"] = round(budget.elapsed(), 1)
    text = markdown(result)
    print(text)
    bad = [p for r in result["gemm"] for p in r.get("paths", []) if not p.get("ok")]
    bad += [r for r in result["dequant"] if r["bits_differ"]]
    print(f"weight_only_prefill: {len(bad)} failing rows, {result['elapsed_s']} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "weight_only_prefill.json").write_text(json.dumps(result, indent=1))
        (args.out / "weight_only_prefill.md").write_text(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
