"""Load, overload and bad-input run against a `sagequant engine start` server (issue 9).

Starts the engine in the background (real model by default), then:
  load       N requests from C concurrent clients, mixed prompt lengths (news text, 6-125 words)
             and max_tokens (default 4-32), a quarter of them streaming chat; all must be 200
  overload   3x the server's bound at once: the excess must be 429, the server must stay healthy
  bad        the catalogue of bad inputs (tests/test_serving.py BAD_REQUESTS plus real-model ones)
and prints one JSON summary (latency p50/p99, time to first token, tokens/s, KV blocks, codes).
--direct instead runs the same request mix straight through GenerationEngine (no HTTP, no server
threads): the baseline that shows what the server itself costs.

    python benchmarks/serving_load.py --model smollm2 --quantization int8 --requests 200 --concurrency 16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

CHAT_TEMPERATURE = 0.7   # the streaming chat quarter of the load samples; the rest is greedy


def start_engine(args, state: str) -> dict:
    cmd = [sys.executable, "-m", "sagequant", "engine", "start", args.model, "--background",
           "--port", "0", "--state-dir", state, "--max-batch", str(args.max_batch),
           "--max-queue", str(args.max_queue), "--max-seq-len", str(args.max_seq_len)]
    from sagequant.serving.launch import is_artifact
    if args.quantization and not is_artifact(args.model):   # an artifact is served as compiled
        cmd += ["--quantization", args.quantization]
    if args.kv_quant:
        cmd += ["--kv-quant", args.kv_quant]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.tokenizer:
        cmd += ["--tokenizer", args.tokenizer]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    from sagequant.serving.state import list_engines
    (entry,), _ = list_engines(Path(state))
    entry["startup_seconds"] = time.perf_counter() - t
    return entry


def metrics(client) -> dict:
    out = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("sagequant_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def request_mix(i, text_words, max_tokens_cycle) -> tuple[str, int]:
    """(prompt, max_tokens) of request i: mixed prompt lengths and output lengths."""
    words = 6 + (i * 37) % 120
    start = (i * 101) % (len(text_words) - 200)
    return " ".join(text_words[start:start + words]), max_tokens_cycle[i % len(max_tokens_cycle)]


def direct_phase(args, text_words) -> dict:
    """The same requests straight through the engine, all submitted at once (batch max_batch)."""
    import torch

    import sagequant as sq
    from sagequant.runtime import GenerationEngine
    from sagequant.serving.launch import ServeOptions, is_artifact, quant_config
    from sagequant.frontends.models import resolve_model, resolve_tokenizer
    if args.threads:
        torch.set_num_threads(args.threads)
    if is_artifact(args.model):   # served as compiled, as `engine start ARTIFACT` does
        cm = sq.load(args.model)
        tok = resolve_tokenizer(args.tokenizer or cm.graph.model_info.get("source"))
    else:
        model, tok = resolve_model(args.model)
        cm = sq.compile(model, quant_config(ServeOptions(model=args.model, quantization=args.quantization,
                                                         kv_quant=args.kv_quant, backend=args.backend)))
        tok = resolve_tokenizer(args.tokenizer) if args.tokenizer else tok
    # the device rule of `engine start` (serving/launch.py make_app)
    engine = GenerationEngine(cm, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                              device="cuda" if cm.config.backend == "cuda" else "cpu")
    if engine.graphs is not None:   # as make_app does before serving
        engine.graphs.capture_all()
    for i in range(args.requests):
        prompt, max_tokens = request_mix(i, text_words, args.max_tokens)
        ids = tok(prompt)["input_ids"]
        temperature = 0.0
        if i % 4 == 3:  # the chat requests of the load phase, sampled as they are there
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            temperature = CHAT_TEMPERATURE
        engine.add_request(ids, max_tokens, temperature=temperature, stop_token_ids=(tok.eos_token_id,))
    t0, steps, tokens = time.perf_counter(), 0, 0
    while engine.has_work():
        tokens += len(engine.step())
        steps += 1
    wall = time.perf_counter() - t0
    return {"requests": args.requests, "max_batch": args.max_batch, "steps": steps,
            "generated_tokens": tokens, "wall_seconds": wall, "tokens_per_second": tokens / wall}


def load_phase(client, model, n, concurrency, text_words, max_tokens_cycle):
    def one(i):
        prompt, max_tokens = request_mix(i, text_words, max_tokens_cycle)
        t0 = time.perf_counter()
        if i % 4 == 3:  # streaming chat
            first = None
            with client.stream("POST", "/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "temperature": CHAT_TEMPERATURE, "stream": True}) as r:
                status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        first = first or time.perf_counter() - t0
            return status, time.perf_counter() - t0, first
        r = client.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                 "max_tokens": max_tokens, "temperature": 0})
        return r.status_code, time.perf_counter() - t0, None

    before = metrics(client)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    after = metrics(client)
    generated = after["sagequant_generated_tokens_total"] - before["sagequant_generated_tokens_total"]
    lat = [r[1] for r in results]
    ttft = [r[2] for r in results if r[2] is not None]
    codes = {}
    for r in results:
        codes[r[0]] = codes.get(r[0], 0) + 1
    return {"requests": n, "concurrency": concurrency, "status_codes": codes, "wall_seconds": wall,
            "generated_tokens": generated, "tokens_per_second": generated / wall,
            "requests_per_second": n / wall, "latency_p50_s": pct(lat, 50), "latency_p99_s": pct(lat, 99),
            "latency_mean_s": statistics.mean(lat), "stream_ttft_p50_s": pct(ttft, 50) if ttft else None,
            "stream_ttft_p99_s": pct(ttft, 99) if ttft else None,
            "kv_blocks_total": after["sagequant_kv_blocks_total"],
            "kv_blocks_used_after": after["sagequant_kv_blocks_used"],
            "kv_bytes_per_token": after["sagequant_kv_bytes_per_token"]}


def overload_phase(client, model, bound):
    n = 3 * bound
    body = {"model": model, "prompt": "The weather today", "max_tokens": 16, "temperature": 0}
    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(lambda _: client.post("/v1/completions", json=body).status_code, range(n)))
    health = client.get("/health").status_code
    after = client.post("/v1/completions", json=body).status_code
    return {"sent_at_once": n, "bound": bound, "200": codes.count(200), "429": codes.count(429),
            "other": len(codes) - codes.count(200) - codes.count(429), "health_after": health,
            "request_after": after}


def bad_phase(client, model, context):
    cases = [
        ("malformed JSON", "/v1/completions", b'{"model": "%s", "prompt": ' % model.encode()),
        ("non-UTF-8 bytes", "/v1/completions", b'{"model": "m", "prompt": "\xff\xfe\xfd"}'),
        ("JSON array body", "/v1/completions", b"[1, 2]"),
        ("missing model", "/v1/completions", {"prompt": "x"}),
        ("missing prompt", "/v1/completions", {"model": model}),
        ("missing messages", "/v1/chat/completions", {"model": model}),
        ("empty messages", "/v1/chat/completions", {"model": model, "messages": []}),
        ("unknown role", "/v1/chat/completions", {"model": model, "messages": [{"role": "robot", "content": "x"}]}),
        ("max_tokens 0", "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 0}),
        ("max_tokens -5", "/v1/completions", {"model": model, "prompt": "x", "max_tokens": -5}),
        ("max_tokens 10^12", "/v1/completions", {"model": model, "prompt": "x", "max_tokens": 10**12}),
        ("max_tokens 'lots'", "/v1/completions", {"model": model, "prompt": "x", "max_tokens": "lots"}),
        ("prompt longer than context", "/v1/completions", {"model": model, "prompt": "word " * (context + 10)}),
        ("chat longer than context", "/v1/chat/completions",
         {"model": model, "messages": [{"role": "user", "content": "word " * (context + 10)}]}),
        ("empty prompt", "/v1/completions", {"model": model, "prompt": ""}),
        ("token id outside vocab", "/v1/completions", {"model": model, "prompt": [1, 2, 10**7]}),
        ("negative token id", "/v1/completions", {"model": model, "prompt": [-1]}),
        ("unknown model", "/v1/completions", {"model": "gpt-5", "prompt": "x"}),
        ("temperature 9", "/v1/completions", {"model": model, "prompt": "x", "temperature": 9}),
        ("top_p 0", "/v1/completions", {"model": model, "prompt": "x", "top_p": 0}),
        ("n 2", "/v1/completions", {"model": model, "prompt": "x", "n": 2}),
        ("logprobs 3", "/v1/completions", {"model": model, "prompt": "x", "logprobs": 3}),
        ("5 stop strings", "/v1/completions", {"model": model, "prompt": "x", "stop": list("abcde")}),
        ("GET on a POST route", "/v1/completions", None),
        ("unknown path", "/v1/engines", {}),
    ]
    rows = []
    for what, path, body in cases:
        if body is None:
            r = client.get(path)
        else:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = client.post(path, content=content, headers={"content-type": "application/json"})
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError):
            message = r.text[:200]
        rows.append({"input": what, "status": r.status_code, "message": message[:160],
                     "healthy_after": client.get("/health").status_code == 200})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--quantization", default="int8", help="weights to compile MODEL to (not passed for an artifact dir: served as compiled)")
    p.add_argument("--backend", choices=["cpu", "cuda"], help="engine start --backend (a model, not an artifact)")
    p.add_argument("--tokenizer", help="engine start --tokenizer (e.g. smollm2 for an artifact of random weights)")
    p.add_argument("--kv-quant")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, help="engine torch threads")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[4, 8, 16, 32],
                   help="max_tokens cycled over the requests")
    p.add_argument("--direct", action="store_true", help="engine only, no server (baseline)")
    p.add_argument("--out", help="write the JSON summary here too")
    args = p.parse_args()
    from sagequant.calibration.real_data import evaluation_text
    words = evaluation_text().split()
    if args.direct:
        summary = {"args": vars(args), "direct": direct_phase(args, words)}
        print(json.dumps(summary, indent=1))
        if args.out:
            with open(args.out, "w") as f:
                f.write(json.dumps(summary, indent=1))
        return 0
    state = tempfile.mkdtemp(prefix="sagequant-load-")
    entry = start_engine(args, state)
    summary = {"engine": entry, "args": vars(args)}
    try:
        with httpx.Client(base_url=entry["url"], timeout=600) as client:
            name = client.get("/v1/models").json()["data"][0]["id"]
            summary["load"] = load_phase(client, name, args.requests, args.concurrency, words,
                                         args.max_tokens)
            print(json.dumps(summary["load"]), flush=True)
            summary["overload"] = overload_phase(client, name, args.max_batch + args.max_queue)
            print(json.dumps(summary["overload"]), flush=True)
            summary["bad_inputs"] = bad_phase(client, name, args.max_seq_len)
            summary["final_metrics"] = metrics(client)
    finally:
        subprocess.run([sys.executable, "-m", "sagequant", "engine", "stop", "--all", "--state-dir", state])
    text = json.dumps(summary, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0 if all(k == 200 for k in summary["load"]["status_codes"]) else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
