"""Tables of benchmarks/cuda_kernels.py: writes cuda_kernels.json and cuda_kernels.md, and
returns the Markdown with the timing tables last (the end of the output is what a GPU run's
reply shows)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from cuda_bench_lib import markdown_table

SPEEDUP_COLS = ("w4a16", "w4a16-asym", "w8a16", "fp8-w8a16", "w8a8-fp8", "w8a8-int8",
                "tinygemm", "fp8-mm-only")
FLOOR_COLS = ("bf16", "w4a16", "tinygemm", "w8a16", "w8a8-fp8")


def _timings(res) -> dict:
    return {(r["variant"], r["shape"], r["m"]): r for r in res["timing"] if "us" in r}


def env_section(res) -> str:
    e = res["env"]
    lines = [f"- {k}: {v}" for k, v in e.items()]
    return "## Environment\n\n" + "\n".join(lines) + f"\n- command: `{res.get('command', '')}`\n"


def correctness_section(res) -> str:
    by = defaultdict(list)
    for r in res["correctness"]:
        by[r["variant"]].append(r)
    rows = []
    for name, recs in by.items():
        ok = [r for r in recs if "rel_fro" in r]
        worst = max(ok, key=lambda r: r["rel_fro"], default=None)
        rows.append([name, len(recs), sum(r["pass"] for r in recs),
                     worst["rel_fro"] if worst else None,
                     max((r["max_rel"] for r in ok), default=None),
                     f"{worst['shape']} M={worst['m']} {worst.get('dtype', '')}" if worst else ""])
    fails = [r for r in res["correctness"] if not r["pass"]]
    text = ("## Correctness vs float64 reference numerics\n\n"
            "rel_fro = ||out - ref|| / ||ref||; max_rel = max|out - ref| / max|ref|.\n\n"
            + markdown_table(["variant", "checks", "passed", "worst rel_fro", "worst max_rel",
                              "worst case"], rows))
    if fails:
        text += f"\n\nFailures ({len(fails)}, first 12):\n\n" + "\n".join(
            f"- {json.dumps(r)}" for r in fails[:12])
    extra = res.get("extra", {})
    if extra:
        text += "\n\nExtra checks:\n\n" + "\n".join(
            f"- {k}: {v:.3g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in extra.items())
    return text + "\n"


def timing_section(res, shapes, ms) -> str:
    t = _timings(res)
    variants = list(dict.fromkeys(r["variant"] for r in res["timing"]))
    parts = ["## Time per call (µs, CUDA graphs, rotated weights), bf16 activations\n"]
    for shape, (n, k) in shapes.items():
        rows = []
        for m in ms:
            row = [m]
            for v in variants:
                r = t.get((v, shape, m))
                row.append(r["us"] if r else None)
            path = t.get(("w4a16", shape, m), {}).get("path", "")
            rows.append(row + [path])
        parts.append(f"### {shape} (N={n}, K={k})\n\n"
                     + markdown_table(["M"] + variants + ["w4a16 path"], rows) + "\n")
    return "\n".join(parts)


def speedup_section(res, shapes, ms) -> str:
    t = _timings(res)
    parts = ["## Speed-up vs bf16 F.linear (bf16 µs / kernel µs; > 1 is faster)\n"]
    for shape in shapes:
        rows = []
        for m in ms:
            base = t.get(("bf16", shape, m))
            row = [m, base["us"] if base else None]
            for v in SPEEDUP_COLS:
                r = t.get((v, shape, m))
                row.append(base["us"] / r["us"] if base and r else None)
            rows.append(row)
        parts.append(f"### {shape}\n\n" + markdown_table(["M", "bf16 µs", *SPEEDUP_COLS], rows) + "\n")
    return "\n".join(parts)


def floor_section(res, shapes) -> str:
    """Bytes at M=1 (weights + scales + x + out) over the measured copy bandwidth."""
    t = _timings(res)
    bw = res["env"].get("copy_GBps") or 3000.0
    rows = []
    for shape, (n, k) in shapes.items():
        for v in FLOOR_COLS:
            r = t.get((v, shape, 1))
            if not r:
                continue
            nbytes = r["weight_bytes"] + 2 * k + 2 * n
            floor = nbytes / (bw * 1e3)
            rows.append([shape, v, nbytes / 1e6, floor, r["us"], r["us"] / floor])
    return (f"## Memory floor at M=1 (measured copy bandwidth {bw:.0f} GB/s)\n\n"
            + markdown_table(["shape", "variant", "MB moved", "floor µs", "measured µs",
                              "× floor"], rows) + "\n")


def best_path_section(res, shapes, ms, path_variants) -> str:
    t = _timings(res)
    rows = []
    for shape in shapes:
        for m in ms:
            cands = [(t[(v, shape, m)]["us"], v.split(":")[1]) for v in path_variants
                     if (v, shape, m) in t]
            if not cands:
                continue
            best = min(cands)
            auto = t.get(("w4a16", shape, m))
            rows.append([shape, m, best[1], best[0], auto["us"] if auto else None,
                         auto.get("path", "") if auto else "",
                         " ".join(f"{p}={u:.1f}" for u, p in sorted(cands, key=lambda c: c[1]))])
    return ("## W4A16: fastest forced path per M (retune layout.GEMV_MAX_M / SPLITK_MAX_M / "
            "DEQUANT_MM_MIN_M from this)\n\n"
            + markdown_table(["shape", "M", "best path", "best µs", "auto µs", "auto path",
                              "all paths µs"], rows) + "\n")


def sweep_section(res) -> str:
    groups = defaultdict(list)
    for r in res["sweep"]:
        groups[(r["shape"], r["m"], r["path"])].append(r)
    rows = []
    for (shape, m, path), recs in groups.items():
        ok = [r for r in recs if "us" in r]
        if not ok:
            rows.append([shape, m, path, None, None, "", f"{len(recs)} failed"])
            continue
        default, best = ok[0], min(ok, key=lambda r: r["us"])
        rows.append([shape, m, path, default["us"], best["us"], best["plan"],
                     f"{len(recs) - len(ok)} failed; worst rel_fro "
                     f"{max(r.get('rel_fro', 0) for r in ok):.2g}"])
    return ("## Sweep (W4A16 plans; first plan of each group is the default)\n\n"
            + markdown_table(["shape", "M", "path", "default µs", "best µs", "best plan", "notes"],
                             rows) + "\n")


def issues_section(res) -> str:
    text = f"## Errors ({len(res['errors'])}) and skipped work ({len(res['skipped'])})\n\n"
    text += "\n".join(f"- {e}" for e in res["errors"][:30])
    if res["skipped"]:
        text += "\n\nSkipped (first 10): " + "; ".join(res["skipped"][:10])
    return text + "\n"


def write(out: Path, res: dict, shapes: dict, ms, path_variants) -> str:
    (out / "cuda_kernels.json").write_text(json.dumps(res, indent=1, default=str))
    sections = {
        "env": env_section(res), "issues": issues_section(res),
        "correctness": correctness_section(res), "sweep": sweep_section(res),
        "paths": best_path_section(res, shapes, ms, path_variants),
        "timing": timing_section(res, shapes, ms), "floor": floor_section(res, shapes),
        "speedup": speedup_section(res, shapes, ms),
    }
    doc = "# CUDA kernel benchmark (benchmarks/cuda_kernels.py)\n\n" + "\n".join(
        sections[k] for k in ("env", "correctness", "timing", "speedup", "floor", "paths",
                              "sweep", "issues"))
    (out / "cuda_kernels.md").write_text(doc)
    printed = ("env", "issues", "correctness", "sweep", "paths", "timing", "floor", "speedup")
    return "\n".join(sections[k] for k in printed)
