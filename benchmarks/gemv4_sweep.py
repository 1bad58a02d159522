"""Issue 18's W4A16 decode sweep (one H100 run): the int32-word kernels as they launched before
(split-K partials summed by a second kernel) against the in-kernel sum (triton_splitk.
_last_split_sums) and tile / warp / stage / split-K alternatives, at M = 1, 2, 4, 8, 16 on
Llama-3-8B's four linear shapes, with bf16 cuBLAS in the same run.

    python3 benchmarks/gemv4_sweep.py --out "$OUT" [--budget 220] [--jobs 8]
    python3 benchmarks/gemv4_sweep.py --smoke      # CPU, Triton interpreter, tiny shapes
    python3 benchmarks/gemv4_sweep.py --out "$OUT" --h2 --ms 1,8,32 --jobs 8 --isolate  # the
        packed-fp16 GEMV (gemv4h) against the kernels choose() and measured dispatch pick, and bf16

--isolate runs each shape in its own process: a variant that faults (an illegal address leaves
the CUDA context unusable, so every later call fails) is recorded as failed ("fatal"), and a
fresh process goes on from the next variant, so one bad kernel cannot poison the rest.

int4 g128 symmetric weights with fp32 group scales (the engine's W4A16), random codes built on
the GPU, bf16 activations. Every variant is checked once per (shape, M) against a float64
reference (rel_fro <= 3e-3, the selfcheck tolerance) and against the old launch bit for bit
(equal whenever the split is the same: the summation order is), then timed with CUDA graphs over
rotated weight copies (each replay streams >= 4x the L2, as a 32-layer step does: "cold"). The
old launch, the fastest correct variant and bf16 are timed again on one copy ("hot": what the
engine build's measured dispatch sees). --jobs compiles the variants in parallel processes first
(Triton's disk cache), so the timed process finds them compiled.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_bench_lib as lib  # noqa: E402

SHAPES = {"gate_up": (28672, 4096), "qkv": (6144, 4096), "o": (4096, 4096), "down": (4096, 14336)}
SMOKE_SHAPES = {"gate_up": (96, 256), "o": (40, 512)}
MS = (1, 2, 4, 8, 16)
GROUP = 128
TOL = 3e-3
# The order work is done in (the budget may stop it): M=1 everywhere, then the shape bf16 beats.
ORDER = [(s, 1) for s in SHAPES] + [("o", m) for m in (16, 8, 4, 2)] + \
    [(s, m) for s in ("qkv", "gate_up", "down") for m in (2, 4, 8, 16)]


class Weight:
    """Random int4 codes [N, K/2] uint8 (element 2i in the low nibble), fp32 group scales, the
    float64 dequantized weight and its bf16 copy."""

    def __init__(self, n: int, k: int, seed: int):
        gen = torch.Generator(device=lib.DEVICE).manual_seed(seed)
        self.n, self.k = n, k
        self.data = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=lib.DEVICE,
                                  generator=gen)
        self.scales = torch.rand(n, k // GROUP, device=lib.DEVICE, generator=gen) * 0.02 + 1e-3
        lo = (self.data & 0xF).to(torch.int16)
        hi = (self.data >> 4).to(torch.int16)
        codes = (torch.stack((lo, hi), -1).reshape(n, k) ^ 8) - 8   # signed nibbles
        self.w64 = codes.double() * self.scales.double().repeat_interleave(GROUP, dim=1)
        self.w16 = self.w64.to(torch.bfloat16 if lib.DEVICE == "cuda" else torch.float16)

    def copies(self, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.data, self.scales)] + [(self.data.clone(), self.scales.clone())
                                             for _ in range(count - 1)]


H2 = False  # --h2: only choose()'s plan, its measured-dispatch variants and the gemv4h grid


def h2_variants(m: int, n: int, k: int, sms: int, smoke: bool) -> list[tuple[str, object, bool]]:
    """--h2: "sum" (choose()'s plan, the kernel the engine runs by the thresholds), its variants
    measured dispatch also times, gemv4h tiles / warps / prefetch / pair_runs / split-K (M <= 8;
    at larger M its default plan only), and at M > 1 the MMA's tiles and split-K."""
    from sagequant.backends.cuda import layout, measured_dispatch
    base = layout.choose(m, n, k, bits=4, group=GROUP, sm_count=sms, fmt="int4")
    out = [("sum", base, False)] + [(p.describe(), p, False)
                                    for p in measured_dispatch.word_variants(base, "int4")]
    h2 = layout.plan_for("gemv4h", m, n, k, bits=4, group=GROUP, sm_count=sms, fmt="int4")
    tiles = ((64, 2), (128, 4), (128, 2)) if m == 1 else ((64, 2), (128, 4))
    flags = [(pf, pr) for pf in (False, True) for pr in (False, True)] if m == 1 else \
        [(False, False), (True, True)]
    grid = [(bn, w, pf, pr) for bn, w in tiles for pf, pr in flags] \
        if m <= layout.H2_MAX_M and not smoke else [(h2.block_n, h2.num_warps, False, False)]
    blocks = math.ceil(k / 128)
    plans = [h2]
    for bn, w, pf, pr in grid:
        tiles = m * math.ceil(n / bn)
        for split in sorted({layout.split_k_for(tiles, blocks, sms, wv) for wv in (2, 4)}):
            plans.append(replace(h2, block_n=bn, num_warps=w, prefetch=pf, pair_runs=pr,
                                 split_k=split))
    if 1 < m <= layout.H2_MAX_M:  # several rows of x a program: tiles by the compile report
        rows = layout.plan_for("gemv4h", m, n, k, bits=4, group=GROUP, sm_count=sms, fmt="int4",
                               rows=layout.h2_rows(m))
        shapes = ((64, 128, 4), (64, 64, 4), (32, 128, 2), (64, 128, 2)) if not smoke else \
            ((64, 128, 4),)
        for bn, bk, w in shapes:
            for pr in (False, True):
                mt = math.ceil(m / rows.block_m) * math.ceil(n / bn)
                for split in sorted({layout.split_k_for(mt, math.ceil(k / bk), sms, wv)
                                     for wv in (2, 4)}):
                    plans.append(replace(rows, block_n=bn, block_k=bk, num_warps=w,
                                         pair_runs=pr, split_k=split))
    if base.path == "mma4" and not smoke:  # its tiles where o, q|k|v trail bf16 (BENCHMARKS §13f)
        for bn, w in ((32, 4), (64, 4), (128, 4), (64, 2)):
            mt = math.ceil(m / base.block_m) * math.ceil(n / bn)
            for split in sorted({layout.split_k_for(mt, blocks, sms, wv) for wv in (4, 8)}):
                plans.append(replace(base, block_n=bn, num_warps=w, split_k=split,
                                     in_place=base.block_m <= 16))
    seen = {p for _, p, _ in out}
    for p in plans:
        if p not in seen:
            seen.add(p)
            out.append((p.describe(), p, False))
    return out


def variants(m: int, n: int, k: int, sms: int, smoke: bool) -> list[tuple[str, object, bool]]:
    """(label, plan, run by main's module) per candidate: "main" (main's kernels and launch, with
    --main-words), "old" (the thresholds' plan, split-K summed by a second kernel), "sum" (the
    same plan summed in the GEMM), then the alternatives. The GEMV's num_stages stays 1: Triton
    does not pipeline its loads (the same SASS at 1 and 3)."""
    if H2:
        return h2_variants(m, n, k, sms, smoke)
    from sagequant.backends.cuda import layout
    base = layout.choose(m, n, k, bits=4, group=GROUP, sm_count=sms, fmt="int4")
    out = [("old", replace(base, launch_reduce=True), False), ("sum", base, False)]
    if MAIN_WORDS is not None:
        out.insert(0, ("main", base, True))
    blocks = math.ceil(k / 128)
    gemv = [(bn, w, 1, pf) for bn, w in ((32, 1), (64, 2), (64, 4), (128, 2), (128, 4), (128, 8),
                                         (256, 4), (256, 8)) for pf in (False, True)]
    mma = [(bn, 4, s, ip) for bn in (32, 64, 128) for s in (2, 4) for ip in (False, True)]
    grids = [("gemv4", gemv)] if m == 1 else \
        [("mma4", mma)] + ([("gemv4", [g for g in gemv if g[0] >= 128 and g[1] == 4])]
                           if m <= 2 else [])
    waves = (1, 2, 4, 8)
    if smoke:
        grids, waves = [(path, grid[:2] + grid[-1:]) for path, grid in grids], waves[:2]
    for path, grid in grids:
        for bn, w, s, flag in grid:
            tiles = (m if path == "gemv4" else 1) * math.ceil(n / bn)
            for split in sorted({layout.split_k_for(tiles, blocks, sms, wv) for wv in waves}):
                plan = layout.Plan(path, block_m=1 if path == "gemv4" else 16, block_n=bn,
                                   block_k=128, split_k=split, num_warps=w, num_stages=s,
                                   prefetch=flag and path == "gemv4",
                                   in_place=flag and path == "mma4")
                if plan != base:
                    out.append((plan.describe(), plan, False))
    return out


MAIN_WORDS = None  # --main-words: the kernels module as main has it, timed as "main"


def load_main_words(path: Path):
    """Load another copy of triton_words.py inside sagequant.backends.cuda (its relative imports
    resolve to this checkout's layout and split-K modules)."""
    global MAIN_WORDS
    import importlib.util
    spec = importlib.util.spec_from_file_location("sagequant.backends.cuda._main_words", path)
    MAIN_WORDS = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = MAIN_WORDS
    spec.loader.exec_module(MAIN_WORDS)


def run_variant(x, wt, data, scales, out, plan, main):
    from sagequant.backends.cuda import triton_words
    words = MAIN_WORDS if main else triton_words
    words.word_linear(x, data, scales, None, None, out, "int4", GROUP, plan)


def _warm(task) -> int:
    """Compile a list of variants (one launch each) into Triton's disk cache; errors are left
    for the timed process to record."""
    global H2
    (n, k), m, labels, smoke, main_words, H2 = task
    lib.import_sagequant()
    if main_words:
        load_main_words(main_words)
    torch.cuda.init()
    wt = Weight(n, k, 0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    done = 0
    for label, plan, main in variants(m, n, k, 132, smoke):
        if label in labels:
            try:
                run_variant(x, wt, wt.data, wt.scales, out, plan, main)
                done += 1
            except Exception:
                pass
    torch.cuda.synchronize()
    return done


def precompile(jobs: int, smoke: bool, main_words) -> None:
    tasks = []
    seen: set = set()
    for name, m in ORDER:
        n, k = SHAPES[name]
        for label, plan, main in variants(m, n, k, 132, smoke):
            key = (replace(plan, split_k=1), main, plan.split_k > 1)
            if key not in seen:
                seen.add(key)
                tasks.append(((n, k), m, label))
    by_job: list[list] = [[] for _ in range(jobs)]
    for i, t in enumerate(tasks):
        by_job[i % jobs].append(t)
    work = []
    for chunk in by_job:
        groups: dict = {}
        for shape, m, label in chunk:
            groups.setdefault((shape, m), set()).add(label)
        work += [(shape, m, labels, smoke, main_words, H2)
                 for (shape, m), labels in groups.items()]
    with mp.get_context("spawn").Pool(jobs) as pool:
        print(f"precompiled {sum(pool.map(_warm, work))} launches in {jobs} processes", flush=True)


def cuda_alive() -> bool:
    """False once the CUDA context is unusable (a kernel faulted: every later call fails)."""
    if lib.DEVICE != "cuda":
        return True
    try:
        torch.ones(1, device="cuda").add_(1).item()
        return True
    except Exception:
        return False


class Fatal(Exception):
    """A variant left the CUDA context unusable; its row is recorded, the process must end."""


def sweep(args, budget: lib.Budget, prior: list | None = None, sink=None) -> dict:
    """Every (shape, M) of the order (args.shape: that shape's only). `prior`: rows an earlier
    process of this shape recorded (their variants are not run again, and count for the best);
    `sink`: a file each row is written to as it is measured (one JSON line)."""
    l2 = lib.environment()["l2_bytes"] or (50 << 20)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    sms = torch.cuda.get_device_properties(0).multi_processor_count if not args.smoke else 4
    dtype = torch.float16 if args.smoke else torch.bfloat16
    order = [(s, m) for s, m in ORDER if s in shapes] if not args.smoke else \
        [(s, m) for s in shapes for m in (1, 2)]
    if args.shape:
        order = [(s, m) for s, m in order if s == args.shape]
    done = {(r["shape"], r["m"], r["variant"]): r for r in prior or []}
    rows, best, skipped = [], [], []
    weights: dict = {}
    for name, m in order:
        if budget.left() < 8:
            skipped.append(f"{name} M={m}")
            continue
        n, k = shapes[name]
        if name not in weights:
            weights.clear()
            weights[name] = Weight(n, k, list(shapes).index(name))
        wt = weights[name]
        gen = torch.Generator(device=lib.DEVICE).manual_seed(m)
        x = torch.randn(m, k, device=lib.DEVICE, generator=gen).to(dtype)
        ref = x.double() @ wt.w64.t()
        nbytes = lib.tensor_bytes(wt.data, wt.scales)
        copies = wt.copies(1 if args.smoke else lib.copies_for(nbytes, l2))
        bcopies = [wt.w16] + [wt.w16.clone() for _ in range(
            (1 if args.smoke else lib.copies_for(lib.tensor_bytes(wt.w16), l2)) - 1)]
        out = torch.empty(m, n, device=lib.DEVICE, dtype=dtype)
        bf16 = lib.time_graph([lambda w=w: torch.mm(x, w.t()) for w in bcopies])["us"]
        old_out, results = None, []
        for label, plan, main in variants(m, n, k, sms, args.smoke):
            if (name, m, label) in done:
                results.append((done[(name, m, label)], plan, main))
                continue
            if budget.left() < 5:
                skipped.append(f"{name} M={m} {label}")
                continue
            row = {"shape": name, "n": n, "k": k, "m": m, "variant": label,
                   "plan": plan.describe(), "main_module": main}
            try:
                lib.poison(m * n, dtype)
                run_variant(x, wt, wt.data, wt.scales, out, plan, main)
                lib.sync()
                got = out.clone()
                err = lib.rel_errors(got, ref)
                if label in ("main", "old") and old_out is None:
                    old_out = got  # the bits every variant is compared with
                row.update(err, ok=err["finite"] and err["rel_fro"] <= TOL,
                           same_bits_as_old=old_out is not None and torch.equal(got, old_out))
                t = lib.time_graph([lambda d=d, s=s: run_variant(x, wt, d, s, out, plan, main)
                                    for d, s in copies])
                row.update(us_cold=round(t["us"], 2), spread=round(t["spread"], 3),
                           copies=t["copies"])
            except Exception as e:  # recorded; the others still run
                row.update(ok=False, error=lib.short_error(e))
                if not cuda_alive():
                    row["fatal"] = True
            rows.append(row)
            results.append((row, plan, main))
            if sink is not None:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
            if row.get("fatal"):
                raise Fatal(f"{name} M={m} {label}: {row['error']}")
        good = [r for r in results if r[0].get("ok") and "us_cold" in r[0]]
        if not good:
            continue
        top, plan, main = min(good, key=lambda r: r[0]["us_cold"])
        old = next((r for r in results if r[0]["variant"] in ("main", "old", "sum")), None)
        hot = {"bf16": lib.time_graph([lambda: torch.mm(x, wt.w16.t())])["us"],
               "best": lib.time_graph([lambda: run_variant(x, wt, wt.data, wt.scales, out, plan,
                                                           main)])["us"]}
        if old is not None:
            hot[old[0]["variant"]] = lib.time_graph([lambda: run_variant(
                x, wt, wt.data, wt.scales, out, old[1], old[2])])["us"]
        entry = {"shape": name, "n": n, "k": k, "m": m, "best": top["variant"],
                 "best_plan": top["plan"], "best_us_cold": top["us_cold"],
                 "baseline": old[0]["variant"] if old else None,
                 "baseline_us_cold": old[0].get("us_cold") if old else None,
                 "bf16_us_cold": round(bf16, 2),
                 "hot_us": {key: round(v, 2) for key, v in hot.items()},
                 "floor_us_3TBs": round(lib.tensor_bytes(wt.data, wt.scales) / 3.0e6, 2)}
        best.append(entry)
        print(json.dumps(entry), flush=True)
        del copies, bcopies
    return {"rows": rows, "best": best, "skipped": skipped}


def run_isolated(args, budget: lib.Budget) -> dict:
    """Each shape in a child process (this script with --shape); a child that ends on a fatal
    variant (exit 3) is started again from the next variant, while it makes progress. Rows
    stream into OUT/gemv4_sweep_parts/SHAPE.jsonl, each child's best / skipped into SHAPE.json."""
    parts = args.out / "gemv4_sweep_parts"
    parts.mkdir(parents=True, exist_ok=True)
    names = [s for s in (SMOKE_SHAPES if args.smoke else SHAPES)
             if any(o == s for o, _ in ORDER) or args.smoke]
    rows, best, skipped, procs = [], [], [], []
    for i, name in enumerate(names):
        deadline = budget.elapsed() + budget.left() / (len(names) - i)
        part, res = parts / f"{name}.jsonl", parts / f"{name}.json"
        part.write_text("")
        res.unlink(missing_ok=True)
        seen, starts = -1, []
        while True:
            have = len(part.read_text().splitlines())
            if have == seen or len(starts) >= 8:  # no progress since the last start: give up
                break
            seen = have
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out),
                   "--shape", name, "--budget", f"{max(deadline - budget.elapsed(), 1):.0f}"]
            cmd += ["--h2"] * args.h2 + ["--smoke"] * args.smoke
            cmd += ["--ms", args.ms] if args.ms else []
            cmd += ["--main-words", str(args.main_words)] if args.main_words else []
            rc = subprocess.run(cmd).returncode
            starts.append({"rows_before": have, "rc": rc})
            if rc != 3:  # 0: done; else a crash outside a variant (not retried)
                break
        rows += [json.loads(line) for line in part.read_text().splitlines()]
        if res.exists():
            got = json.loads(res.read_text())
            best += got["best"]
            skipped += got["skipped"]
        else:
            skipped.append(f"{name}: no process finished ({starts})")
        procs.append({"shape": name, "starts": starts})
    return {"rows": rows, "best": best, "skipped": skipped, "processes": procs}


def run_shape(args, budget: lib.Budget) -> int:
    """--shape: this shape's (shape, M) cases, after the rows an earlier process recorded in its
    part file; exit 3 on a fatal variant (recorded) so that the parent starts a fresh process."""
    parts = args.out / "gemv4_sweep_parts"
    parts.mkdir(parents=True, exist_ok=True)
    part = parts / f"{args.shape}.jsonl"
    prior = [json.loads(line) for line in part.read_text().splitlines()] if part.exists() else []
    with part.open("a") as sink:
        try:
            res = sweep(args, budget, prior, sink)
        except Fatal as err:
            print(f"fatal variant, a fresh process goes on: {err}", flush=True)
            return 3
    (parts / f"{args.shape}.json").write_text(json.dumps({k: res[k] for k in ("best", "skipped")}))
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--budget", type=float, default=220.0, help="seconds for the whole run")
    ap.add_argument("--jobs", type=int, default=0, help="processes that precompile first")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--main-words", type=Path, help="main's triton_words.py, timed as 'main'")
    ap.add_argument("--h2", action="store_true", help="the packed-fp16 GEMV against the current "
                    "kernels (h2_variants)")
    ap.add_argument("--ms", help="comma-separated M values, in this order after M=1 (default: "
                    "the §13f order over M = 1, 2, 4, 8, 16)")
    ap.add_argument("--isolate", action="store_true", help="each shape in its own process, "
                    "restarted past a variant that faults")
    ap.add_argument("--shape", choices=sorted({*SHAPES, *SMOKE_SHAPES}),
                    help="(what --isolate starts) this shape only, rows appended to its part file")
    args = ap.parse_args()
    global H2, ORDER
    H2 = args.h2
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
        ORDER = [(s, m) for m in ms for s in SHAPES]
    budget = lib.Budget(args.budget)
    if args.smoke:
        from sagequant.backends.cuda.interpret import enable_triton_interpreter
        enable_triton_interpreter()
        lib.DEVICE = "cpu"
    lib.import_sagequant()
    if args.main_words:
        load_main_words(args.main_words)
    if args.shape:
        sys.exit(run_shape(args, budget))
    if args.jobs and not args.smoke:
        try:
            precompile(args.jobs, args.smoke, args.main_words)
        except Exception as err:  # the timed process compiles what is missing
            print(f"precompile failed: {lib.short_error(err)}", flush=True)
        print(f"precompile done at {budget.elapsed():.0f} s", flush=True)
    res = {"env": lib.environment(), "bandwidth_GBps": lib.measure_bandwidth(1 << 28)}
    if lib.DEVICE == "cuda":
        torch.cuda.empty_cache()  # the children's memory
    res.update(run_isolated(args, budget) if args.isolate else sweep(args, budget))
    res["seconds"] = round(budget.elapsed(), 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemv4_sweep.json").write_text(json.dumps(res, indent=1))
    bad = [r for r in res["rows"] if not r.get("ok")]
    fatal = [f"{r['shape']} M={r['m']} {r['variant']}" for r in res["rows"] if r.get("fatal")]
    print(f"{len(res['rows'])} variants, {len(bad)} failed or wrong, {len(res['skipped'])} "
          f"skipped, {res['seconds']} s" + (f"; fatal: {fatal}" if fatal else ""))


if __name__ == "__main__":
    main()
