"""`sagequant engine start` on one GPU at full Llama-3-8B shape (issue 18): throughput at C
concurrent requests through the server, next to the same requests straight through the engine.

Builds the model with seeded random weights on the GPU (benchmarks/e2e_generation.py's builder),
compiles --scheme with RTN for backend cuda, saves the artifact, then runs
benchmarks/serving_load.py twice on it: through `engine start ARTIFACT --backend cuda` (HTTP,
C client threads, max batch C) and with --direct (GenerationEngine alone, all requests at once).
Random weights rarely emit EOS, so every request generates its max_tokens. The tokenizer (for
the text prompts only) is --tokenizer's, e.g. smollm2.

    python3 benchmarks/serving_gpu.py --tokenizer smollm2 --out $OUT/serving_gpu.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import e2e_generation as e2e  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scheme", default="W4A16", choices=list(e2e.SCHEMES))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--tokenizer", default="smollm2")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--cpu", action="store_true",
                    help="the same comparison on CPU: --shape (default tiny) compiled for backend "
                         "cpu, float32, the engine on --threads threads")
    ap.add_argument("--shape", default=None, choices=list(e2e.SHAPES))
    ap.add_argument("--threads", type=int, default=1, help="engine torch threads (--cpu)")
    ap.add_argument("--out", default="serving_gpu.json")
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --cpu)")
    sq = e2e.import_sagequant()
    if args.cpu:
        e2e.lib.DEVICE = "cpu"
    work = Path(tempfile.mkdtemp(prefix="sagequant-serve-"))
    t0 = time.perf_counter()
    device, dtype = ("cpu", torch.float32) if args.cpu else ("cuda", torch.bfloat16)
    shape = args.shape or ("tiny" if args.cpu else "llama3-8b")
    model = e2e.build_model(shape, args.layers, args.vocab, args.max_seq_len + 64, dtype, device)
    cm = e2e.compile_scheme(sq, model, args.scheme, device)
    artifact = str(work / "artifact")
    cm.save(artifact)
    del model, cm
    if not args.cpu:
        torch.cuda.empty_cache()
    result = {"scheme": args.scheme, "shape": shape, "device": device, "layers": args.layers, "vocab": args.vocab, "env": e2e.lib.environment(),
              "build_compile_save_s": round(time.perf_counter() - t0, 1)}
    common = [sys.executable, str(HERE / "serving_load.py"), "--model", artifact, "--tokenizer", args.tokenizer,
              "--requests", str(args.requests), "--concurrency", str(args.concurrency),
              "--max-batch", str(args.concurrency), "--max-queue", str(args.concurrency),
              "--max-seq-len", str(args.max_seq_len), "--max-tokens", str(args.max_tokens)]
    common += ["--threads", str(args.threads)] if args.cpu else []
    for name, extra in (("server", []), ("direct", ["--direct"])):
        out = work / f"{name}.json"
        run = subprocess.run(common + extra + ["--out", str(out)], capture_output=True, text=True)
        result[name] = json.loads(out.read_text()) if out.is_file() else {
            "error": f"exit {run.returncode}: {run.stderr[-2000:]}"}
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    server, direct = result["server"].get("load", {}), result["direct"].get("direct", {})
    if server and direct:
        result["server_vs_direct"] = server["tokens_per_second"] / direct["tokens_per_second"]
        print(f"{args.scheme}: server {server['tokens_per_second']:.1f} tok/s at {args.concurrency} concurrent "
              f"requests, direct engine {direct['tokens_per_second']:.1f} tok/s "
              f"({result['server_vs_direct']:.2f}x); codes {server['status_codes']}")
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    return 0 if server and direct else 1


if __name__ == "__main__":
    sys.exit(main())
