"""/health latency of `sagequant engine` while large requests arrive: idle, while a 10 MB request
is refused (413 by --max-body-bytes), and while a prompt just under the body limit is tokenized
(in a worker thread) and then refused by --max-prompt-tokens.

    PYTHONPATH=. python benchmarks/server_limits.py [--json benchmarks/results/server_limits.json]

A tiny random Llama with the real SmolLM2 tokenizer on CPU (the engine's speed does not matter
here: no request reaches it)."""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time

import httpx
import uvicorn

import sagequant as sq
from sagequant.frontends.models import resolve_tokenizer
from sagequant.serving.launch import ServeOptions, bind, make_app


def _tiny_llama(vocab: int):
    import torch
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg).eval()


def _poll_health(client: httpx.Client, busy: threading.Thread | None, n_idle: int = 50) -> list[float]:
    out = []
    while (busy is not None and busy.is_alive()) or (busy is None and len(out) < n_idle):
        t0 = time.perf_counter()
        client.get("/health").raise_for_status()
        out.append(time.perf_counter() - t0)
    return out


def _summary(latencies: list[float]) -> dict:
    ms = sorted(x * 1000 for x in latencies)
    return {"polls": len(ms), "median_ms": round(statistics.median(ms), 2),
            "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2), "max_ms": round(ms[-1], 2)}


def _huge_upload(port: int, size: int, result: dict) -> None:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     + f"content-length: {size}\r\n\r\n".encode())
        try:
            for _ in range(size // (1 << 16)):
                sock.sendall(b"z" * (1 << 16))
        except OSError:
            pass
        result["status"] = sock.recv(64).decode("latin-1").split("\r\n")[0]
    result["seconds"] = time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    tok = resolve_tokenizer("smollm2")
    cm = sq.compile(_tiny_llama(len(tok)), sq.QuantConfig(weight_dtype="int8", activation_dtype="a16", guard="off"))
    body_limit = 4 << 20
    app, _ = make_app(cm, tok, ServeOptions(model="tiny", max_seq_len=96, max_body_bytes=body_limit,
                                            max_prompt_tokens=64))
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    results = {}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        results["idle"] = _summary(_poll_health(client, None))
        upload: dict = {}
        sender = threading.Thread(target=_huge_upload, args=(port, 10 << 20, upload))
        sender.start()
        results["during_10MB_refused"] = {**_summary(_poll_health(client, sender)), **upload}
        prompt = "many words here " * 150000  # 2.4 MB of text, ~450k tokens
        answer: dict = {}

        def post():
            t0 = time.perf_counter()
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
            answer.update(status=r.status_code, seconds=time.perf_counter() - t0)
        sender = threading.Thread(target=post)
        sender.start()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as health:
            results["during_2.4MB_prompt_tokenized"] = {**_summary(_poll_health(health, sender)), **answer}
    server.should_exit = True
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
