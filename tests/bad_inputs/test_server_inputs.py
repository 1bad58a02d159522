"""Catalogue, server: oversized bodies and prompts (413 before anything is parsed or tokenized),
bodies that are not JSON or not UTF-8, token ids outside the vocabulary, requests past their time
limit (504), and /health staying fast (< 100 ms) while a 10 MB request is being refused."""
from __future__ import annotations

import json
import socket
import statistics
import threading
import time

import pytest

import sagequant as sq
from bad_input_tools import InProcessServer
from sagequant.frontends.models import resolve_tokenizer

BODY_LIMIT = 64 << 10


@pytest.fixture(scope="module")
def tokenizer():
    return resolve_tokenizer("smollm2")


@pytest.fixture(scope="module")
def served_model(helpers, tokenizer):
    model = helpers.build_tiny("llama", vocab_size=len(tokenizer))
    return sq.compile(model, sq.QuantConfig(weight_dtype="int8", activation_dtype="a16", guard="off"))


@pytest.fixture(scope="module")
def server(served_model, tokenizer):
    with InProcessServer(served_model, tokenizer, max_batch=2, max_queue=8, max_seq_len=96,
                         max_body_bytes=BODY_LIMIT, max_prompt_tokens=40) as s:
        yield s


def _completion(**kw):
    return {"model": "tiny", "max_tokens": 2, **kw}


def _error(r, status: int, *words: str) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    for w in words:
        assert w in message, message
    return message


def test_body_over_the_limit_is_413_before_it_is_read(server):
    r = server.client.post("/v1/completions", content=json.dumps(_completion(prompt="x " * BODY_LIMIT)),
                           headers={"content-type": "application/json"})
    _error(r, 413, "--max-body-bytes", str(BODY_LIMIT))


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(BODY_LIMIT // 1024 + 8):
            yield b"y" * 1024
        yield b'"}'
    r = server.client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    _error(r, 413, "--max-body-bytes")


def test_prompt_over_the_token_limit_is_413(server):
    _error(server.client.post("/v1/completions", json=_completion(prompt="word " * 60)), 413,
           "--max-prompt-tokens", "at most 40")


def test_token_list_over_the_token_limit_is_413(server):
    _error(server.client.post("/v1/completions", json=_completion(prompt=[1] * 41)), 413, "41 tokens")


def test_chat_over_the_token_limit_is_413(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "word " * 60}], "max_tokens": 2}
    _error(server.client.post("/v1/chat/completions", json=body), 413, "--max-prompt-tokens")


def test_token_id_outside_the_vocabulary_is_400(server, tokenizer):
    _error(server.client.post("/v1/completions", json=_completion(prompt=[5, len(tokenizer) + 7])), 400,
           str(len(tokenizer) + 7), f"[0, {len(tokenizer)})")


@pytest.mark.parametrize("raw, words", [(b'{"model": "tiny", "prompt": ', "not valid JSON"),
                                         (b'{"model": "tiny", "prompt": "\xff\xfe"}', "not UTF-8")])
def test_body_not_json_or_not_utf8_is_400(server, raw, words):
    r = server.client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    _error(r, 400, words)


def test_request_past_its_time_limit_is_504_and_frees_the_engine(served_model, tokenizer):
    with InProcessServer(served_model, tokenizer, max_seq_len=96, request_timeout=0.01) as s:
        _error(s.client.post("/v1/completions", json=_completion(prompt="hello", max_tokens=80)), 504,
               "--request-timeout", "0.01 s")
        stream = s.client.post("/v1/completions", json=_completion(prompt="hello", max_tokens=80, stream=True))
        if stream.status_code == 504:  # the limit passed before the engine took it: a plain error
            _error(stream, 504, "--request-timeout")
        else:  # mid-stream: the headers are gone, the error is the last event
            events = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
            assert stream.status_code == 200 and events[-1]["error"]["code"] == 504
        deadline = time.monotonic() + 10
        while s.app.state.loop.snapshot()["pending"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.app.state.loop.snapshot()["pending"] == 0  # aborted, KV blocks back


def _send_huge_request(port: int, size: int, result: dict) -> None:
    """POST `size` bytes with a declared Content-Length, then read the answer (raw socket: the
    server may answer and close before the upload ends)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     + f"content-length: {size}\r\n\r\n".encode())
        chunk = b"z" * (1 << 16)
        try:
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)
        except OSError:  # refused and closed mid-upload: expected
            pass
        result["response"] = sock.recv(1 << 16).decode("latin-1")


def test_health_stays_fast_while_a_10mb_request_is_refused(server):
    result: dict = {}
    sender = threading.Thread(target=_send_huge_request, args=(server.port, 10 << 20, result))
    sender.start()
    latencies = []
    while sender.is_alive() or len(latencies) < 10:
        t0 = time.perf_counter()
        assert server.client.get("/health").status_code == 200
        latencies.append(time.perf_counter() - t0)
        if len(latencies) > 200:
            break
    sender.join(30)
    assert result["response"].startswith("HTTP/1.1 413"), result["response"][:200]
    assert max(latencies) < 0.1, f"/health took up to {max(latencies) * 1000:.0f} ms"


def test_health_stays_fast_while_a_large_prompt_is_tokenized(served_model, tokenizer):
    """A prompt under the body limit is tokenized in a worker thread, not on the event loop."""
    with InProcessServer(served_model, tokenizer, max_seq_len=96, max_body_bytes=4 << 20,
                         max_prompt_tokens=64) as s:
        result: dict = {}

        def post():
            result["r"] = s.client.post("/v1/completions", json=_completion(prompt="many words here " * 150000))
        sender = threading.Thread(target=post)
        start = time.perf_counter()
        sender.start()
        latencies = []
        while sender.is_alive():
            t0 = time.perf_counter()
            assert s.client.get("/health").status_code == 200
            latencies.append(time.perf_counter() - t0)
        sender.join()
        took = time.perf_counter() - start
        _error(result["r"], 413, "--max-prompt-tokens")
        # On the event loop, /health would wait out the whole request (one slow answer). Threads
        # still share the GIL with the tokenizer and the JSON parse, so single answers can be slow
        # on a loaded machine; the typical one is not.
        assert len(latencies) >= 5 and statistics.median(latencies) < 0.1, latencies
        assert max(latencies) < took / 2, (max(latencies), took)
