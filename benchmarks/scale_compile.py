"""Real-scale layer-wise compile: wall time, peak GPU / CPU memory, plan vs measured, resume.

  python benchmarks/scale_compile.py --out DIR            # H100: the issue's shapes
  python benchmarks/scale_compile.py --out DIR --smoke    # tiny shapes, CPU or GPU, minutes

1. Writes a seeded random Llama-3-8B-shaped checkpoint (hidden 4096, MLP 14336, 32/8 heads,
   32 layers, vocab 128256, bf16) as one safetensors shard per decoder block plus an index,
   generating on the GPU with a seeded torch.Generator.
2. Compiles it layer-wise (device cuda, bf16 compute) with RTN W4A16 g128, SmoothQuant W8A8-INT8,
   FP8 W8A8 (dynamic), AWQ and GPTQ W4A16 g128 on 128 x 512 calibration tokens, each method in
   its own process (peak RSS per method), artifact written and removed.
3. 70B-width blocks (hidden 8192, ffn 28672, 64/8 heads) at 8 / 16 / 32 layers, GPTQ and RTN,
   from a generated weight source (seeded per tensor name, in GPU memory for one block at a
   time: 32 such layers are 55 GB, more than this machine's disk next to the 8B checkpoint).
4. Resume: GPTQ on the 8B checkpoint killed (SIGKILL) after a random block, started again.
Results: DIR/scale_compile.json, one record per run.
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
        return (torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) * 0.02).to(torch.bfloat16)


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
    entry = next(p for p in cm.pass_history if p["pass"] == "layerwise")
    stats, plan = entry["stats"], entry["plan"]
    artifact_bytes = sum(f.stat().st_size for f in Path(out).iterdir())
    shutil.rmtree(out)
    return {**spec, "compile_s": round(compile_s, 2), "layerwise_s": stats["seconds"],
            "save_s": round(save_s, 2), "restored": stats["restored"],
            "peak_gpu_gib": round(stats.get("peak_device_bytes", 0) / 2**30, 3),
            "peak_rss_anon_gib": round(rss.peak / 2**30, 3),
            "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "plan_gpu_gib": round(plan["peak_device_bytes"] / 2**30, 3),
            "plan_cpu_gib": round(plan["peak_cpu_bytes"] / 2**30, 3),
            "plan_disk_gib": round(plan["disk_bytes"] / 2**30, 3), "plan_s": round(plan["seconds"], 1),
            "artifact_gib": round(artifact_bytes / 2**30, 3)}


def spawn(spec: dict, timeout: float | None = None) -> tuple[dict | None, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--run", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout)
    wall = time.perf_counter() - start
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        return None, wall
    return json.loads(lines[-1][len("RESULT "):]), wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/sq-scale"))
    ap.add_argument("--only", nargs="*", help="steps: methods wide resume")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--layers", type=int, help="decoder blocks of the 8B-shaped checkpoint (default 32)")
    args = ap.parse_args()
    if args.run:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape, wide = (SMOKE, SMOKE_WIDE) if args.smoke else (LLAMA8B, WIDE70B)
    if args.layers:
        shape = {**shape, "num_hidden_layers": args.layers}
    samples, seq = (8, 64) if args.smoke else (128, 512)
    depths = (2, 4, 8) if args.smoke else (8, 16, 32)
    steps = set(args.only or ["methods", "wide", "resume"])
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "smoke": args.smoke,
               "samples": samples, "seq_len": seq, "runs": []}

    def record(r):
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        (args.out / "scale_compile.json").write_text(json.dumps(results, indent=1))

    shutil.rmtree(args.scratch, ignore_errors=True)
    ckpt = args.scratch / "llama8b"
    base = dict(model=str(ckpt), device=device, samples=samples, seq_len=seq)
    if steps & {"methods", "resume"}:
        record(write_checkpoint(ckpt, llama_config(shape), device))
    if "methods" in steps:
        for method in args.methods:
            r, _ = spawn({**base, "method": method, "work_dir": str(args.scratch / f"w-{method}"),
                          "artifact": str(args.scratch / f"a-{method}")})
            record(r or {"method": method, "failed": True})
            shutil.rmtree(args.scratch / f"w-{method}", ignore_errors=True)
    if "resume" in steps:
        blocks = shape["num_hidden_layers"]
        kill_after = random.Random(0).randrange(2, blocks)   # a segment index: prologue is 0
        spec = {**base, "method": "gptq_w4a16", "work_dir": str(args.scratch / "w-resume"),
                "artifact": str(args.scratch / "a-resume")}
        _, killed_wall = spawn({**spec, "kill_after": kill_after})
        r, resumed_wall = spawn(spec)
        record({"step": "resume", "killed_after_segment": kill_after, "killed_run_wall_s": round(killed_wall, 1),
                "resumed_run_wall_s": round(resumed_wall, 1), **(r or {"failed": True})})
        shutil.rmtree(args.scratch / "w-resume", ignore_errors=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    if "wide" in steps:
        for method in ("rtn_w4a16", "gptq_w4a16"):
            for layers in depths:
                d = args.scratch / f"wide{layers}"
                d.mkdir(parents=True, exist_ok=True)
                llama_config(wide, layers).save_pretrained(d)
                r, _ = spawn({**base, "model": str(d), "method": method, "generated": True, "layers": layers,
                              "work_dir": str(args.scratch / "w-wide"), "artifact": str(args.scratch / "a-wide")})
                record(r or {"method": method, "layers": layers, "failed": True})
                shutil.rmtree(args.scratch / "w-wide", ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
