"""ONNX Runtime CPU latency and perplexity of SmolLM2-135M exports: float vs W8A8-INT8 (dynamic
per-token, MatMulInteger) vs W4A16 (RTN g128, ragged last group; QDQ and MatMulNBits forms),
plus W4A16 compiled from the float ONNX file (the ONNX-input frontend). Every model runs in the
same process, on the same onnxruntime CPU settings, one after another.

    nice -n 5 python benchmarks/onnx_runtime_latency.py --max-tokens 20000 --json out.json

Latency: batch 1, median of --repeats runs after one warm-up; "prefill" = one forward of
--prefill tokens, "1-token forward" = one forward of a single token. The exported graphs take
input_ids only (no KV cache), so the 1-token forward is the per-token GEMM cost of decode, not a
cached decode step. Perplexity: the news text (gensim lee_background), 512-token windows.
On a shared machine, re-time the written files with --interleaved (round-robin).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sagequant as sq
from sagequant.calibration.real_data import evaluation_text, load_smollm2
from sagequant.evaluation.perplexity import perplexity, tokenize_eval_text
from sagequant.backends.export import export, onnxruntime_session, run_logits

SCHEMES = {
    "W8A8-INT8 dynamic": dict(weight_dtype="int8", activation_dtype="int8", group_size=None),
    "W4A16 RTN g128": dict(weight_dtype="int4", activation_dtype="a16", group_size=128),
}


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


def export_float(model, path: Path) -> Path:
    from torch.export import Dim
    with torch.no_grad():
        program = torch.onnx.export(_Logits(model).eval(), (torch.randint(0, 1000, (1, 8)),), dynamo=True,
                                    input_names=["input_ids"], output_names=["logits"], optimize=True,
                                    dynamic_shapes=({0: Dim("batch"), 1: Dim("seq")},), verbose=False)
    program.save(str(path))
    return path


def latency(session, n_tokens: int, repeats: int) -> float:
    ids = torch.randint(0, 49152, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    run_logits(session, ids)  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run_logits(session, ids)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def interleaved_latency(paths: list[Path], args) -> list[dict]:
    """Latency of already exported models measured round-robin (every repeat times each model once
    in turn), so a machine whose load drifts during the run biases no model: the fair comparison
    on a shared box. Median over --repeats rounds."""
    sessions = [onnxruntime_session(p, threads=args.threads) for p in paths]
    gen = torch.Generator().manual_seed(0)
    prefill, one = torch.randint(0, 49152, (1, args.prefill), generator=gen), torch.randint(0, 49152, (1, 1), generator=gen)
    for s in sessions:  # warm-up
        run_logits(s, prefill), run_logits(s, one)
    times = {p: {"prefill": [], "token": []} for p in paths}
    for _ in range(args.repeats):
        for p, s in zip(paths, sessions):
            for key, ids, n in (("prefill", prefill, 1), ("token", one, 4)):
                for _ in range(n):
                    t = time.perf_counter()
                    run_logits(s, ids)
                    times[p][key].append(time.perf_counter() - t)
    return [{"file": p.name, "prefill_ms": statistics.median(times[p]["prefill"]) * 1000,
             "token_ms": statistics.median(times[p]["token"]) * 1000} for p in paths]


def measure(name, path, tokens, args) -> dict:
    session = onnxruntime_session(path, threads=args.threads)
    row = {"name": name, "file_mb": round(sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*")) / 2**20, 1),
           "prefill_ms": latency(session, args.prefill, args.repeats),
           "token_ms": latency(session, 1, args.repeats * 4)}
    res = perplexity(lambda ids: run_logits(session, ids), tokens, window=512, stride=512)
    row.update(ppl=res.ppl, ppl_seconds=res.seconds, scored=res.n_tokens_scored)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--interleaved", nargs="+", type=Path, metavar="ONNX",
                   help="only measure the latency of these exported files, round-robin")
    args = p.parse_args()
    if args.interleaved:
        for row in interleaved_latency(args.interleaved, args):
            print(json.dumps(row), flush=True)
        return
    model, tok = load_smollm2()
    tokens = tokenize_eval_text(tok, evaluation_text(), args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="sq_ort_bench_"))
    rows = []
    float_path = export_float(model, work / "float.onnx")
    rows.append(measure("float (fp32)", float_path, tokens, args))
    for name, kw in SCHEMES.items():
        t = time.perf_counter()
        cm = sq.compile(model, sq.QuantConfig(guard="off", **kw))
        compile_s = time.perf_counter() - t
        forms = ("qdq", "matmulnbits") if kw["activation_dtype"] == "a16" else ("qdq",)
        for form in forms:
            path = export(cm, work / f"{name.split()[0]}_{form}.onnx", weight_format=form)
            rows.append({**measure(f"{name} ({form})", path, tokens, args), "compile_s": compile_s})
    t = time.perf_counter()
    from_onnx = sq.compile(float_path, sq.QuantConfig(**SCHEMES["W4A16 RTN g128"]))
    path = from_onnx.export(work / "w4_from_onnx.onnx")
    rows.append({**measure("W4A16 RTN g128 (ONNX input, qdq)", path, tokens, args),
                 "compile_s": time.perf_counter() - t})
    base = rows[0]
    print("\n| model | file MB | prefill 512 ms | 1-token forward ms | ppl | Δ ppl vs float |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['file_mb']} | {r['prefill_ms']:.0f} ({base['prefill_ms'] / r['prefill_ms']:.2f}×) | "
              f"{r['token_ms']:.1f} ({base['token_ms'] / r['token_ms']:.2f}×) | {r['ppl']:.3f} | "
              f"{100 * (r['ppl'] / base['ppl'] - 1):+.2f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
