"""Real-scale layer-wise compile: wall time, peak GPU / CPU memory, plan vs measured, resume.

  python benchmarks/scale_compile.py --out DIR            # H100: the issue's shapes
  python benchmarks/scale_compile.py --out DIR --smoke    # tiny shapes, CPU or GPU, minutes

1. Writes a seeded random Llama-3-8B-shaped checkpoint (hidden 4096, MLP 14336, 32/8 heads,
   32 layers, vocab 128256, bf16) as one safetensors shard per decoder block plus an index,
   generating on the GPU with a seeded torch.Generator.
2. Compiles it layer-wise (device cuda, bf16 compute) with RTN W4A16 g128, SmoothQuant W8A8-INT8,
   FP8 W8A8 (dynamic), AWQ and GPTQ W4A16 g128 on 128 x 512 calibration tokens, each method in
   its own process (peak RSS per method), artifact written and removed.
3. Resume (--resume-method, RTN by default): killed (SIGKILL) after a random block, started
   again; time lost and the artifact's sha256 against the uninterrupted run of the same method
   (this call's, or --reference FILE's from an earlier call on the same machine kind).
4. 70B-width blocks (hidden 8192, ffn 28672, 64/8 heads) at 8 / 16 / 32 layers (--depths), RTN
   (--wide-methods), from a generated weight source (seeded per tensor name, made on the GPU one
   block at a time: 32 such layers are 55 GB, more than the disk next to the 8B checkpoint).
Steps run in the order --only names them; --budget-s bounds the whole call (a compile still
running then is killed and recorded as timed out); the checkpoint is written only when missing.
Results: DIR/scale_compile.json, one record per run, rewritten after each.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

LLAMA8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
               num_hidden_layers=32, vocab_size=128256)
WIDE70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
               vocab_size=128256)
SMOKE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
             num_hidden_layers=4, vocab_size=4096)
SMOKE_WIDE = dict(hidden_size=384, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
                  vocab_size=4096)
METHODS = {
    "rtn_w4a16": dict(weight_dtype="int4", calibration="minmax", group_size=128),
    "smoothquant_w8a8": dict(weight_dtype="int8", activation_dtype="int8", calibration="smoothquant",
                             group_size=None),
    "fp8_w8a8": dict(weight_dtype="fp8", activation_dtype="fp8", calibration="minmax", group_size=None),
    "awq_w4a16": dict(weight_dtype="int4", calibration="awq", group_size=128),
    "gptq_w4a16": dict(weight_dtype="int4", calibration="gptq", group_size=128),
}


def llama_config(shape: dict, layers: int | None = None):
    from transformers import LlamaConfig
    kw = dict(shape)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    return LlamaConfig(**kw, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                       torch_dtype="bfloat16")


def _names_and_shapes(config) -> dict[str, tuple[int, ...]]:
    from sagequant.calibration.onload import _parameters_on_meta
    from transformers import AutoModelForCausalLM
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


class GeneratedWeights:
    """Seeded random bf16 tensors by checkpoint name, generated on `device` when asked."""

    def __init__(self, config, device: str):
        self.shapes = _names_and_shapes(config)
        self.device = device

    def __contains__(self, name):
        return name in self.shapes

    def load(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if len(shape) == 1:  # norm weights
            return torch.ones(shape, dtype=torch.bfloat16, device=self.device)
        seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        g = torch.Generator(device=self.device).manual_seed(seed)
        # drawn in bf16 and scaled in place: no float32 transient inflates the measured peak
        return torch.randn(shape, generator=g, device=self.device, dtype=torch.bfloat16).mul_(0.02)


def write_checkpoint(directory: Path, config, device: str) -> dict:
    """One safetensors shard per decoder block (+ one for embeddings / norm / head) and an index."""
    from safetensors.torch import save_file
    start = time.perf_counter()
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    source = GeneratedWeights(config, device)
    shards: dict[str, dict] = {}
    for name in source.shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, {})[name] = None
    weight_map, total = {}, 0
    for i, (key, names) in enumerate(shards.items()):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: source.load(n).cpu() for n in names}
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: fname for n in names})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {"step": "write_checkpoint", "bytes": total, "seconds": round(time.perf_counter() - start, 1),
            "shards": len(shards)}


class PeakRss:
    """Peak anonymous resident memory (RssAnon: what the run holds, not mapped checkpoint pages)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)

    def _read(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(0.05)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._read())


def calibration_ids(samples: int, seq: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (samples, seq), generator=g)


def run_one(args) -> dict:
    """One compile in this process (the parent runs each in a fresh one)."""
    import sagequant as sq
    from sagequant.passes.layerwise import LayerwiseCompile
    from sagequant.artifact import file_sha256
    spec = json.loads(args.run)
    cfg = sq.QuantConfig(**METHODS[spec["method"]], guard="off", calibration_samples=spec["samples"],
                         calibration_seq_len=spec["seq_len"])
    config = json.loads((Path(spec["model"]) / "config.json").read_text())
    ids = calibration_ids(spec["samples"], spec["seq_len"], config["vocab_size"])
    weights = GeneratedWeights(llama_config({k: config[k] for k in WIDE70B}, config["num_hidden_layers"]),
                               spec["device"]) if spec.get("generated") else None
    if spec.get("kill_after") is not None:
        original = LayerwiseCompile._segment_done

        def die(self, seg):
            original(self, seg)
            if seg == spec["kill_after"]:
                os.kill(os.getpid(), signal.SIGKILL)
        LayerwiseCompile._segment_done = die
    if spec["device"] == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with PeakRss() as rss:
        cm = sq.compile(spec["model"], cfg, calibration_data=ids, device=spec["device"],
                        work_dir=spec["work_dir"], dtype=torch.bfloat16, weights=weights)
        compile_s = time.perf_counter() - start
        t = time.perf_counter()
        out = cm.save(spec["artifact"])
        save_s = time.perf_counter() - t
    stats = next(p for p in cm.pass_history if p["pass"] == "layerwise")["stats"]
    plan = stats["plan"]
    artifact_bytes = sum(f.stat().st_size for f in Path(out).iterdir())
    digests = {f: file_sha256(Path(out) / f) for f in ("weights.safetensors", "graph.json")}
    shutil.rmtree(out)
    return {**spec, "compile_s": round(compile_s, 2), "layerwise_s": stats["seconds"],
            "phase_s": stats.get("phase_seconds"),
            "phase_peak_gpu_gib": {k: round(v / 2**30, 3) for k, v in stats.get("phase_peak_device_bytes", {}).items()},
            "pass_s": {p["pass"]: p.get("seconds") for p in cm.pass_history},
            "save_s": round(save_s, 2), "restored": stats["restored"],
            "peak_gpu_gib": round(stats.get("peak_device_bytes", 0) / 2**30, 3),
            "peak_rss_anon_gib": round(rss.peak / 2**30, 3),
            "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "plan_gpu_gib": round(plan["peak_device_bytes"] / 2**30, 3),
            "plan_cpu_gib": round(plan["peak_cpu_bytes"] / 2**30, 3),
            "plan_disk_gib": round(plan["disk_bytes"] / 2**30, 3), "plan_s": round(plan["seconds"], 1),
            "artifact_gib": round(artifact_bytes / 2**30, 3), "sha256": digests}



def spawn(spec: dict, deadline: float) -> tuple[dict | None, float]:
    """Run one compile in a fresh process, killed when the call's deadline comes."""
    start = time.perf_counter()
    timeout = deadline - start
    if timeout < 20:
        return {"skipped": "no time left in this call"}, 0.0
    try:
        proc = subprocess.run([sys.executable, __file__, "--run", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        sys.stderr.write((e.stderr or b"")[-2000:].decode(errors="replace") if isinstance(e.stderr, bytes)
                         else (e.stderr or "")[-2000:])
        return {"timed_out_s": round(timeout, 1)}, time.perf_counter() - start
    wall = time.perf_counter() - start
    sys.stderr.write(proc.stderr[-1500:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return None, wall
    return json.loads(lines[-1][len("RESULT "):]), wall


def ensure_checkpoint(directory: Path, config, device: str) -> dict | None:
    """Write the checkpoint unless this machine still has it from an earlier call."""
    index = directory / "model.safetensors.index.json"
    if index.is_file() and json.loads((directory / "config.json").read_text())["num_hidden_layers"] \
            == config.num_hidden_layers:
        return None
    shutil.rmtree(directory, ignore_errors=True)
    return write_checkpoint(directory, config, device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/sq-scale"))
    ap.add_argument("--only", nargs="*", default=["methods", "resume", "wide"],
                    choices=["methods", "resume", "wide"], help="steps, in this order")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--layers", type=int, help="decoder blocks of the 8B-shaped checkpoint (default 32)")
    ap.add_argument("--resume-method", default="rtn_w4a16", choices=list(METHODS))
    ap.add_argument("--wide-methods", nargs="*", default=["rtn_w4a16"], choices=list(METHODS))
    ap.add_argument("--depths", nargs="*", type=int, help="70B-width depths (default 8 16 32)")
    ap.add_argument("--wide-samples", type=int, help="calibration samples of the 70B-width runs")
    ap.add_argument("--budget-s", type=float, default=570.0,
                    help="wall seconds for the whole call; a compile still running then is killed")
    ap.add_argument("--table", type=Path, nargs="*", help="print the markdown table of these results")
    ap.add_argument("--reference", type=Path, help="an earlier scale_compile.json whose uninterrupted "
                    "run of --resume-method the resumed artifact is compared with (made by this generator: "
                    "results from before the weights were drawn in bf16, 2026-12-07, hold other weights)")
    args = ap.parse_args()
    if args.run:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    if args.table:
        return print_table(args.table)
    deadline = time.perf_counter() + args.budget_s
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape, wide = (SMOKE, SMOKE_WIDE) if args.smoke else (LLAMA8B, WIDE70B)
    if args.layers:
        shape = {**shape, "num_hidden_layers": args.layers}
    samples, seq = (8, 64) if args.smoke else (128, 512)
    depths = args.depths or ((2, 4, 8) if args.smoke else (8, 16, 32))
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke,
               "samples": samples, "seq_len": seq, "runs": []}

    def record(r):
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        (args.out / "scale_compile.json").write_text(json.dumps(results, indent=1))

    ckpt = args.scratch / "llama8b"
    base = dict(model=str(ckpt), device=device, samples=samples, seq_len=seq,
                layers=shape["num_hidden_layers"])
    if {"methods", "resume"} & set(args.only):
        written = ensure_checkpoint(ckpt, llama_config(shape), device)
        if written:
            record(written)
    for step in args.only:
        if step == "methods":
            for method in args.methods:
                shutil.rmtree(args.scratch / f"w-{method}", ignore_errors=True)
                r, wall = spawn({**base, "method": method, "work_dir": str(args.scratch / f"w-{method}"),
                                 "artifact": str(args.scratch / f"a-{method}")}, deadline)
                record({"method": method, "wall_s": round(wall, 1), **(r or {"failed": True})})
                shutil.rmtree(args.scratch / f"w-{method}", ignore_errors=True)
        elif step == "resume":
            record(resume(args, base, shape["num_hidden_layers"], results, deadline))
        elif step == "wide":
            shutil.rmtree(ckpt, ignore_errors=True)   # disk: the wide runs generate their weights
            for method in args.wide_methods:
                for layers in depths:
                    d = args.scratch / f"wide{layers}"
                    d.mkdir(parents=True, exist_ok=True)
                    llama_config(wide, layers).save_pretrained(d)
                    r, wall = spawn({**base, "model": str(d), "method": method, "generated": True,
                                     "layers": layers, "samples": args.wide_samples or samples,
                                     "work_dir": str(args.scratch / "w-wide"),
                                     "artifact": str(args.scratch / "a-wide")}, deadline)
                    record({"method": method, "layers": layers, "wall_s": round(wall, 1),
                            **(r or {"failed": True})})
                    shutil.rmtree(args.scratch / "w-wide", ignore_errors=True)
    print(json.dumps(results, indent=1))


def print_table(paths: list[Path]) -> None:
    """Measured next to the plan's prediction, one row per compile of the results files."""
    print("| run | layers | block loop s (plan s) | compile s | save s | peak GPU GiB (plan) | "
          "RssAnon GiB (plan) | ru_maxrss GiB | artifact GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        for r in json.loads(Path(path).read_text())["runs"]:
            if "method" not in r:
                continue
            what = r["method"] + (" resumed" if r.get("step") == "resume" else "")
            if "layerwise_s" not in r:
                print(f"| {what} | {r['layers']} | not finished: {r} |||||||")
                continue
            print(f"| {what} | {r['layers']} | {r['layerwise_s']:.1f} ({r['plan_s']:.0f}) | "
                  f"{r['compile_s']:.1f} | {r['save_s']:.1f} | {r['peak_gpu_gib']:.2f} ({r['plan_gpu_gib']:.2f}) | "
                  f"{r['peak_rss_anon_gib']:.2f} ({r['plan_cpu_gib']:.2f}) | {r['ru_maxrss_gib']:.1f} | "
                  f"{r['artifact_gib']:.2f} |")


def resume(args, base: dict, blocks: int, results: dict, deadline: float) -> dict:
    """SIGKILL after a random block, the same command again: time lost and the artifact's digests
    against an uninterrupted run of the same method (this call's or --reference's)."""
    method = args.resume_method
    kill_after = random.Random(0).randrange(2, blocks + 1)   # a segment index: the prologue is 0
    spec = {**base, "method": method, "work_dir": str(args.scratch / "w-resume"),
            "artifact": str(args.scratch / "a-resume")}
    shutil.rmtree(spec["work_dir"], ignore_errors=True)
    _, killed_wall = spawn({**spec, "kill_after": kill_after}, deadline)
    r, resumed_wall = spawn(spec, deadline)
    shutil.rmtree(spec["work_dir"], ignore_errors=True)
    earlier = [x for x in results["runs"] if x.get("method") == method and "sha256" in x and "step" not in x]
    if not earlier and args.reference is not None:
        earlier = [x for x in json.loads(args.reference.read_text())["runs"]
                   if x.get("method") == method and "sha256" in x and "step" not in x]
    reference = earlier[0] if earlier else None
    out = {"step": "resume", "method": method, "killed_after_segment": kill_after,
           "killed_run_wall_s": round(killed_wall, 1), "resumed_run_wall_s": round(resumed_wall, 1),
           **(r or {"failed": True})}
    if reference is not None and r and "sha256" in r:
        out["uninterrupted_wall_s"] = reference.get("wall_s")
        out["byte_identical_to_uninterrupted"] = r["sha256"] == reference["sha256"]
        if reference.get("wall_s") is not None:
            out["time_lost_s"] = round(killed_wall + resumed_wall - reference["wall_s"], 1)
    return out


if __name__ == "__main__":
    main()
