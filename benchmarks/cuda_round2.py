"""Second round of the CUDA kernel table (issue 5): the 4-bit int32-word kernels, their tile sweep,
NF4, and the peers (GemLite, bitsandbytes NF4, torch tinygemm, torch._scaled_mm) in one run:

    PYTHONPATH=.peers/site python3 benchmarks/cuda_round2.py --out "$OUT" [--sweep]

Qwen2-7B layer shapes, random weights built on the GPU, bf16 activations. Every variant is first
checked once per (shape, M) against float64 reference numerics (rel_fro over a fresh x), then
timed with CUDA graphs over rotated weight copies (each replay streams >= 4x the L2). --sweep
times tile / warp / stage / split-K alternatives of the word kernels (each checked too) and
prints the best plan per (shape, M). Peers that fail to import or run are reported, not fatal.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_bench_lib as lib  # noqa: E402

SHAPES = {"gate_up": (37888, 3584), "down": (3584, 18944), "q_o": (3584, 3584), "k_v": (512, 3584)}
MS = (1, 8, 16, 64, 256, 1024, 4096)
GROUP = 128
MIN_M = {"w4a16:dequant4_mm": 64}
TOL = {"wo": 5e-3, "nf4-bnb": 5e-3, "fp8": 1e-2}


class Shape:
    """One layer shape: the float weight, bf16, our int4 / NF4 / FP8 weights and peers' layouts."""

    def __init__(self, name, n, k, seed):
        from sagequant.ir.quant_spec import QuantSpec, quantize
        from sagequant.backends.cuda import layout
        self.name, self.n, self.k = name, n, k
        gen = torch.Generator(device="cuda").manual_seed(seed)
        self.w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
        self.w16 = self.w.to(torch.bfloat16)
        self.specs = {"int4": QuantSpec("int4", "per_group", GROUP, True, "fp16"),
                      "nf4": QuantSpec("nf4", "per_group", GROUP, True, "fp16"),
                      "fp8": QuantSpec("fp8_e4m3", "per_channel", None, True, "fp16")}
        self.q = {f: quantize(self.w, s, what=name) for f, s in self.specs.items()}
        self.deq = {}
        self.peers, self.peer_errors = {}, {}
        qt = self.q["int4"]
        try:
            packed, sz = layout.to_tinygemm(qt.data, qt.scale, None, qt.spec)
            self.peers["tinygemm"] = (torch._convert_weight_to_int4pack(
                packed, layout.TINYGEMM_INNER_K_TILES), sz)
        except Exception as err:
            self.peer_errors["tinygemm"] = lib.short_error(err)

    def ref64(self, fmt):
        from sagequant.ir.quant_spec import dequantize
        if fmt not in self.deq:
            self.deq[fmt] = self.w16.double() if fmt == "bf16" else dequantize(self.q[fmt], torch.float64)
        return self.deq[fmt]


def gemlite_layer(shape):
    """GemLite A16W4 (HQQ-style uint4 codes, (q - z) * s): our symmetric int4 codes + 8, z = 8."""
    from gemlite.helper import A16Wn
    from sagequant.ir.formats import unpack_nibbles
    qt = shape.q["int4"]
    codes = (unpack_nibbles(qt.data, shape.k, signed=True) + 8).to(torch.uint8)
    s = qt.scale.to(torch.bfloat16)
    return A16Wn(device="cuda", dtype=torch.bfloat16).from_weights(
        codes, s, torch.full_like(s, 8), W_nbits=4, group_size=GROUP)


def bnb_weight(shape):
    import bitsandbytes.functional as bf
    return bf.quantize_4bit(shape.w16, blocksize=64, quant_type="nf4", compress_statistics=False)


def variants(ops):
    """name -> (weight builder(shape) -> tuple of tensors/objects to rotate, call(x, w, shape),
    reference kind). Builders are called once per weight copy."""
    from sagequant.backends.cuda import layout, triton_w8a8, triton_weight_only as two

    def q_args(fmt):
        return lambda s: (s.q[fmt].data.clone(), s.q[fmt].scale.clone())

    def ours(fmt):
        def call(x, a, s):
            return ops.cuda_weight_only_linear(x, a[0], a[1], None, None, s.specs[fmt].encode(),
                                               [s.n, s.k])
        return call

    def byte_path(x, a, s):  # round 1's choice (byte kernels), for before/after in one run
        spec = s.specs["int4"]
        path = layout.path_for(x.shape[0])  # no format given: the byte kernels
        plan = layout.plan_for(path, x.shape[0], s.n, s.k, bits=4, group=GROUP)
        return two.weight_only_linear(x, a[0], a[1], None, None, spec, [s.n, s.k], plan=plan)

    def forced(path):
        def call(x, a, s):
            plan = layout.plan_for(path, x.shape[0], s.n, s.k, bits=4, group=GROUP)
            return two.weight_only_linear(x, a[0], a[1], None, None, s.specs["int4"], [s.n, s.k],
                                          plan=plan)
        return call

    def fp8_fused(x, a, s):
        from sagequant.ir.quant_spec import QuantSpec
        act = QuantSpec("fp8_e4m3", "per_token", None, True, "fp32", dynamic=True)
        return ops.cuda_w8a8_fp8_linear(x, a[0], a[1], None, None, s.specs["fp8"].encode(),
                                        [s.n, s.k], act.encode(), None)

    def fp8_mm_only(x, a, s):
        xq, xs = s.fp8_x
        return triton_w8a8.fp8_linear(xq, xs, a[0], a[1], None, x.dtype)

    def bnb_call(x, a, s):
        import bitsandbytes as bnb
        return bnb.matmul_4bit(x, a[0].t(), quant_state=a[1])

    return {
        "bf16": (lambda s: (s.w16.clone(),), lambda x, a, s: F.linear(x, a[0]), "bf16"),
        "w4a16": (q_args("int4"), ours("int4"), "int4"),
        "w4a16-round1": (q_args("int4"), byte_path, "int4"),
        "nf4": (q_args("nf4"), ours("nf4"), "nf4"),
        "w4a16:dequant4_mm": (q_args("int4"), forced("dequant4_mm"), "int4"),
        "w8a8-fp8": (q_args("fp8"), fp8_fused, "fp8"),
        "peer:fp8-mm-only": (q_args("fp8"), fp8_mm_only, "fp8"),
        "peer:tinygemm": (lambda s: tuple(t.clone() for t in s.peers["tinygemm"]),
                          lambda x, a, s: torch._weight_int4pack_mm(x, a[0], GROUP, a[1]), "int4"),
        "peer:gemlite": (lambda s: (gemlite_layer(s),), lambda x, a, s: a[0](x), "int4"),
        "peer:bnb-nf4": (lambda s: bnb_weight(s), bnb_call, "nf4-bnb"),
    }


def reference(shape, kind, x, weights):
    from sagequant.ir.quant_spec import QuantSpec, dequantize, quantize
    if kind == "nf4-bnb":
        import bitsandbytes.functional as bf
        w = bf.dequantize_4bit(weights[0], weights[1]).double()
        return x.double() @ w.t()
    if kind == "fp8":
        act = QuantSpec("fp8_e4m3", "per_token", None, True, "fp32", dynamic=True)
        return dequantize(quantize(x, act, what="x"), torch.float64) @ shape.ref64("fp8").t()
    return x.double() @ shape.ref64(kind).t()


def check(call, x, w, shape, kind):
    lib.poison(x.shape[0] * shape.n, x.dtype)
    out = call(x, w, shape)
    torch.cuda.synchronize()
    err = lib.rel_errors(out, reference(shape, kind, x, w))
    tol = TOL.get(kind, TOL["wo"])
    return {**err, "pass": err["finite"] and err["rel_fro"] <= tol}


def time_it(call, x, copies, shape):
    return lib.time_graph([functools.partial(call, x, w, shape) for w in copies])


def table(res, shapes, budget, l2, ops, ms) -> None:
    from sagequant.backends.cuda import triton_w8a8
    for vname, (build, call, kind) in variants(ops).items():
        for sname, shape in shapes.items():
            if budget.left() < 20:
                res["skipped"].append(f"table {vname} {sname}: budget")
                continue
            try:
                w0 = build(shape)
                nbytes = sum(lib.tensor_bytes(t) for t in w0 if isinstance(t, torch.Tensor))
                if vname == "peer:gemlite":
                    nbytes = sum(lib.tensor_bytes(t) for t in w0[0].get_tensor_args())
                copies = [w0] + [build(shape) for _ in range(lib.copies_for(nbytes, l2, most=64) - 1)]
            except Exception as err:
                res["errors"].append(f"{vname} {sname} build: {lib.short_error(err)}")
                continue
            for m in ms:
                if m < MIN_M.get(vname, 1):
                    continue
                x = (torch.randn(m, shape.k, device="cuda")).to(torch.bfloat16)
                shape.fp8_x = triton_w8a8.quantize_activation(x, "fp8_e4m3")
                rec = {"variant": vname, "shape": sname, "m": m, "weight_bytes": nbytes}
                try:
                    rec.update(check(call, x, w0, shape, kind))
                    rec.update(time_it(call, x, copies, shape))
                except Exception as err:
                    rec["error"] = lib.short_error(err)
                res["timing"].append(rec)
                if not rec.get("pass", False):
                    print("FAIL", json.dumps(rec), flush=True)
            del copies, w0
            torch.cuda.empty_cache()
        print(f"table {vname} ({budget.elapsed():.0f}s)", flush=True)


def sweep_plans(path, m, shape):
    from sagequant.backends.cuda import layout
    base = layout.plan_for(path, m, shape.n, shape.k, bits=4, group=GROUP)
    plans = []
    if path == "gemv4":
        for bn, w in GEMV_TILES.get(shape.name, GEMV_TILES["small"]):
            plans.append(replace(base, block_n=bn, num_warps=w, num_stages=1))
    else:
        for bn in (32, 64, 128):
            for w in (4, 8):
                for st in (2, 4):
                    plans.append(replace(base, block_n=bn, num_warps=w, num_stages=st))
    out = []
    for p in plans:  # split-K re-derived for the tile, then x2 and /2 around it
        tiles = max(1, -(-m // p.block_m) if path == "mma4" else m) * -(-shape.n // p.block_n)
        split = layout.split_k_for(tiles, -(-shape.k // p.block_k), 132, 8)
        for s in sorted({split, max(1, split // 2), max(1, split // 4)}):
            out.append(replace(p, split_k=s))
    return out


def sweep(res, shapes, budget, l2, cases) -> None:
    from sagequant.backends.cuda import triton_weight_only as two
    for sname, m, path in cases:
        shape = shapes[sname]
        spec = shape.specs["int4"]
        qt = shape.q["int4"]
        args = [(qt.data, qt.scale)] + [(qt.data.clone(), qt.scale.clone()) for _ in range(
            lib.copies_for(lib.tensor_bytes(qt.data, qt.scale), l2, most=16) - 1)]
        x = torch.randn(m, shape.k, device="cuda").to(torch.bfloat16)
        ref = x.double() @ shape.ref64("int4").t()
        for plan in sweep_plans(path, m, shape):
            if budget.left() < 0:
                res["skipped"].append(f"sweep {sname} M={m} {plan.describe()}: budget")
                break
            rec = {"shape": sname, "m": m, "plan": plan.describe()}

            def call(x, a, s, plan=plan):
                return two.weight_only_linear(x, a[0], a[1], None, None, spec, [s.n, s.k], plan=plan)
            try:
                err = lib.rel_errors(call(x, args[0], shape), ref)
                rec.update(rel_fro=err["rel_fro"], ok=err["finite"] and err["rel_fro"] < 5e-3)
                rec.update(time_it(call, x, args, shape))
            except Exception as err:
                rec["error"] = lib.short_error(err)
            res["sweep"].append(rec)
        del args
        print(f"sweep {sname} M={m} {path} ({budget.elapsed():.0f}s)", flush=True)


FP8_GEMV_CONFIGS = [dict(BLOCK_N=bn, BLOCK_K=128, num_warps=w, num_stages=2)
                    for bn in (16, 32, 64, 128) for w in (4, 8)]


def fp8_sweep(res, shapes, budget, l2) -> None:
    """Tiles and split-K of the fused W8A8-FP8 decode kernel at M = 1, each checked first."""
    from sagequant.backends.cuda import layout, triton_fp8_gemv as fg
    for sname, shape in shapes.items():
        qt = shape.q["fp8"]
        args = [(qt.data, qt.scale)] + [(qt.data.clone(), qt.scale.clone()) for _ in range(
            lib.copies_for(lib.tensor_bytes(qt.data, qt.scale), l2, most=64) - 1)]
        x = torch.randn(1, shape.k, device="cuda").to(torch.bfloat16)
        ref = reference(shape, "fp8", x, None)
        for cfg in FP8_GEMV_CONFIGS:
            base = layout.fp8_gemv_config(shape.n, shape.k)["split_k"] * 64 // cfg["BLOCK_N"]
            for split in sorted({max(1, base), max(1, base // 2), max(1, base // 4)}):
                if budget.left() < 0:
                    break
                c = {**cfg, "split_k": split}
                rec = {"shape": sname, "m": 1, "plan": f"fp8gemv{c}"}

                def call(x, a, s, c=c):
                    return fg.fp8_gemv(x, None, a[0], a[1], None, x.dtype, config=dict(c))
                try:
                    err = lib.rel_errors(call(x, args[0], shape), ref)
                    rec.update(rel_fro=err["rel_fro"], ok=err["finite"] and err["rel_fro"] < 1e-2)
                    rec.update(time_it(call, x, args, shape))
                except Exception as e:
                    rec["error"] = lib.short_error(e)
                res["sweep"].append(rec)
        print(f"fp8 sweep {sname} ({budget.elapsed():.0f}s)", flush=True)


def report(res, out: Path) -> str:
    (out / "cuda_round2.json").write_text(json.dumps(res, indent=1))
    t = {(r["variant"], r["shape"], r["m"]): r for r in res["timing"]}
    names = list(dict.fromkeys(r["variant"] for r in res["timing"]))
    parts = ["## Environment\n", "\n".join(f"- {k}: {v}" for k, v in res["env"].items())]
    bw = res["env"].get("copy_GBps") or 3000
    for sname in SHAPES if res["timing"] else ():
        rows = []
        for m in MS:
            row = [m]
            for v in names:
                r = t.get((v, sname, m))
                row.append(None if r is None else (r.get("us") if r.get("pass") else
                                                   "FAIL" if "rel_fro" in r else "err"))
            rows.append(row)
        parts.append(f"\n### {sname} {SHAPES[sname]} — µs per call (CUDA graphs, rotated weights)\n")
        parts.append(lib.markdown_table(["M"] + names, rows))
        floor = [[v, t[(v, sname, 1)]["weight_bytes"] / 1e6,
                  t[(v, sname, 1)]["weight_bytes"] / bw / 1e3, t[(v, sname, 1)].get("us")]
                 for v in names if (v, sname, 1) in t and "us" in t[(v, sname, 1)]]
        parts.append("\nM=1 memory floor (weight bytes / copy bandwidth):\n")
        parts.append(lib.markdown_table(["variant", "MB", "floor µs", "µs"], floor))
    worst = {}
    for r in res["timing"]:
        if "rel_fro" in r:
            worst[r["variant"]] = max(worst.get(r["variant"], 0), r["rel_fro"])
    parts.append("\n### Correctness (worst rel_fro vs float64 reference, every shape and M)\n")
    parts.append(lib.markdown_table(["variant", "worst rel_fro", "all passed"], [
        [v, worst[v], all(r.get("pass") for r in res["timing"] if r["variant"] == v)] for v in worst]))
    if res["sweep"]:
        best, tried = {}, {}
        for r in res["sweep"]:
            key = (r["shape"], r["m"], "fp8" if r["plan"].startswith("fp8") else "w4")
            tried[key] = tried.get(key, 0) + 1
            if r.get("ok") and "us" in r and (key not in best or r["us"] < best[key]["us"]):
                best[key] = r
        parts.append("\n### Sweep: best plan per (shape, M, kernel family)\n")
        parts.append(lib.markdown_table(["shape", "M", "kernel", "best µs", "plan", "plans tried"], [
            [s, m, f, b["us"], b["plan"], tried[(s, m, f)]] for (s, m, f), b in sorted(best.items())]))
    parts.append(f"\nerrors: {res['errors'][:10]}\nskipped: {len(res['skipped'])}")
    text = "\n".join(parts)
    (out / "cuda_round2.md").write_text(text)
    return text


GEMV_TILES = {  # (BLOCK_N, warps) around round one's best (BN 128 / 4 warps on the big layers)
    "gate_up": [(bn, w) for bn in (128, 256, 512) for w in (1, 2, 4, 8)],
    "down": [(bn, w) for bn in (64, 128, 256) for w in (2, 4, 8)],
    "small": [(bn, w) for bn in (16, 32, 64, 128) for w in (2, 4, 8)]}
SWEEP_CASES = [("gate_up", 1, "gemv4"), ("down", 1, "gemv4"), ("q_o", 1, "gemv4"),
               ("k_v", 1, "gemv4"), ("q_o", 64, "mma4"), ("gate_up", 16, "mma4"),
               ("down", 16, "mma4"), ("gate_up", 8, "mma4"), ("down", 8, "mma4"),
               ("gate_up", 64, "mma4"), ("down", 64, "mma4"), ("q_o", 16, "mma4"),
               ("gate_up", 32, "mma4")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=540.0)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-s", type=float, default=220.0, help="seconds for the sweep")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--fp8-sweep", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = lib.Budget(args.budget_s)
    sq = lib.import_sagequant()  # noqa: F841
    ops = torch.ops.sagequant
    res = {"env": lib.environment(), "timing": [], "sweep": [], "errors": [], "skipped": [],
           "command": " ".join(sys.argv)}
    res["env"]["copy_GBps"] = lib.measure_bandwidth()
    for peer in ("gemlite", "bitsandbytes"):
        try:
            res["env"][peer] = __import__(peer).__version__
        except Exception as err:
            res["env"][peer] = lib.short_error(err)
    print(json.dumps(res["env"]), flush=True)
    l2 = res["env"]["l2_bytes"] or (50 << 20)
    names = args.shapes.split(",")
    shapes = {n: Shape(n, *SHAPES[n], seed=i) for i, n in enumerate(names)}
    if args.sweep:
        sweep(res, shapes, lib.Budget(args.sweep_s), l2, [c for c in SWEEP_CASES if c[0] in shapes])
    if args.fp8_sweep:
        fp8_sweep(res, shapes, lib.Budget(60), l2)
    if not args.no_table:
        table(res, shapes, budget, l2, ops, MS)
    res["env"]["elapsed_s"] = round(budget.elapsed(), 1)
    print(report(res, out))


if __name__ == "__main__":
    main()
