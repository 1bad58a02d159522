"""The HTTP server end to end on a tiny random Llama with the real SmolLM2 tokenizer (so chat
templates and multi-byte text are real): OpenAI routes, SSE, bad requests, overload, client
disconnects, engine failures, a small load test. Servers run in-process on 127.0.0.1, port 0."""
from __future__ import annotations

import json
import re
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import sagequant as sq
from bad_inputs.bad_input_tools import InProcessServer
from sagequant.serving.launch import bind
from sagequant.frontends.models import resolve_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return resolve_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tiny_compiled(helpers, tokenizer):
    model = helpers.build_tiny("llama", vocab_size=len(tokenizer))
    cfg = sq.QuantConfig(weight_dtype="int8", activation_dtype="a16", guard="off")
    return sq.compile(model, cfg)


class Server(InProcessServer):
    """The catalogue's in-process server, plus its Prometheus metrics as a dict."""

    def metrics(self) -> dict[str, float]:
        text = self.client.get("/metrics").text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(sagequant_\w+) ([-0-9.e+]+)$", text, re.M)}

    def assert_alive(self):
        r = self.client.get("/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.fixture(scope="module")
def server(tiny_compiled, tokenizer):
    with Server(tiny_compiled, tokenizer, max_batch=4, max_queue=32, max_seq_len=96) as s:
        yield s


def greedy_reference(cm, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy tokens by full recomputation of the compiled model (no KV cache)."""
    ids = list(prompt_ids)
    for _ in range(n):
        ids.append(int(cm(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_completion_matches_greedy_reference(server, tiny_compiled, tokenizer):
    prompt = "The quantized model says"
    r = server.client.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                                     "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    prompt_ids = tokenizer(prompt)["input_ids"]
    expected = greedy_reference(tiny_compiled, prompt_ids, 6)
    assert body["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
    assert body["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 6,
                             "total_tokens": len(prompt_ids) + 6}
    assert body["choices"][0]["finish_reason"] == "length"
    # token-id prompts are served the same way
    r2 = server.client.post("/v1/completions", json={"model": "tiny", "prompt": prompt_ids,
                                                      "max_tokens": 6, "temperature": 0})
    assert r2.json()["choices"][0]["text"] == body["choices"][0]["text"]


def _sse_events(response) -> list:
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_uses_template_and_streams_the_same_text(server, tiny_compiled, tokenizer):
    messages = [{"role": "user", "content": "Hello! Ünïcödé?"}]
    req = {"model": "tiny", "messages": messages, "max_tokens": 7, "temperature": 0}
    whole = server.client.post("/v1/chat/completions", json=req).json()
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(templated, add_special_tokens=False)["input_ids"]
    assert whole["usage"]["prompt_tokens"] == len(ids)
    expected = tokenizer.decode(greedy_reference(tiny_compiled, ids, 7), skip_special_tokens=True)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": expected}
    with server.client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = _sse_events(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_stop_string_ends_generation(server, tokenizer):
    full = server.client.post("/v1/completions", json={
        "model": "tiny", "prompt": "a b c", "max_tokens": 12, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    cut = server.client.post("/v1/completions", json={
        "model": "tiny", "prompt": "a b c", "max_tokens": 12, "temperature": 0, "stop": [stop]}).json()
    assert cut["choices"][0]["text"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"


def test_models_health_metrics(server):
    assert server.client.get("/v1/models").json()["data"][0] == {
        "id": "tiny", "object": "model", "created": 0, "owned_by": "sagequant", "max_model_len": 96}
    server.assert_alive()
    m = server.metrics()
    for name in ("sagequant_queue_depth", "sagequant_kv_blocks_used", "sagequant_kv_blocks_total",
                 "sagequant_generation_tokens_per_second", "sagequant_generated_tokens_total"):
        assert name in m, name
    assert m["sagequant_kv_blocks_total"] > 0


# The catalogue of bad inputs (also listed in BENCHMARKS.md): body, path, status, message words.
BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "tiny", "prompt": ', "completions", 400, "not valid JSON"),
    ("non-UTF-8 bytes", b'{"model": "tiny", "prompt": "\xff\xfe"}', "completions", 400, "not UTF-8"),
    ("JSON array body", b"[1, 2]", "completions", 400, "valid dictionary"),
    ("missing model", {"prompt": "x"}, "completions", 400, "model: Field required"),
    ("missing prompt", {"model": "tiny"}, "completions", 400, "prompt: Field required"),
    ("missing messages", {"model": "tiny"}, "chat/completions", 400, "messages: Field required"),
    ("empty messages", {"model": "tiny", "messages": []}, "chat/completions", 400, "at least 1"),
    ("bad role", {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]},
     "chat/completions", 400, "messages.0.role"),
    ("max_tokens 0", {"model": "tiny", "prompt": "x", "max_tokens": 0}, "completions", 400,
     "max_tokens: Input should be greater than or equal to 1"),
    ("max_tokens negative", {"model": "tiny", "prompt": "x", "max_tokens": -5}, "completions", 400,
     "max_tokens"),
    ("max_tokens huge", {"model": "tiny", "prompt": "x", "max_tokens": 10**12}, "completions", 400,
     "exceeds the context length 96"),
    ("max_tokens not an int", {"model": "tiny", "prompt": "x", "max_tokens": "lots"}, "completions",
     400, "max_tokens"),
    ("prompt longer than context", {"model": "tiny", "prompt": "word " * 200}, "completions", 400,
     "the context holds 96"),
    ("empty prompt", {"model": "tiny", "prompt": ""}, "completions", 400, "prompt is empty"),
    ("token id outside vocab", {"model": "tiny", "prompt": [1, 2, 10**7]}, "completions", 400,
     "outside the vocabulary"),
    ("unknown model", {"model": "gpt-5", "prompt": "x"}, "completions", 404, "does not exist"),
    ("temperature out of range", {"model": "tiny", "prompt": "x", "temperature": 9}, "completions",
     400, "temperature"),
    ("top_p 0", {"model": "tiny", "prompt": "x", "top_p": 0}, "completions", 400, "top_p"),
    ("n > 1", {"model": "tiny", "prompt": "x", "n": 2}, "completions", 400, "n=2 is not supported"),
    ("logprobs", {"model": "tiny", "prompt": "x", "logprobs": 3}, "completions", 400, "logprobs"),
]


@pytest.mark.parametrize("what,body,path,status,words", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_is_a_clear_4xx(server, what, body, path, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.client.post(f"/v1/{path}", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["code"] == status
    server.assert_alive()


def test_wrong_method_and_path(server):
    r = server.client.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed"
    assert server.client.post("/v1/nothing", json={}).json()["error"]["code"] == 404
    server.assert_alive()


def _stream_until_tokens(url: str, n_chunks: int, max_tokens: int) -> None:
    """Open a streaming completion, read n_chunks events, then drop the connection."""
    with httpx.Client(base_url=url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={
                "model": "tiny", "prompt": "abc", "max_tokens": max_tokens, "temperature": 0,
                "stream": True}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen >= n_chunks:
                    break


def _wait_for(pred, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_frees_kv_blocks(tiny_compiled, tokenizer):
    # A slow engine step keeps the request alive long after the client leaves.
    with Server(tiny_compiled, tokenizer, max_batch=2, max_queue=2, max_seq_len=96) as s:
        engine = s.app.state.loop.engine
        step = engine.step
        engine.step = lambda: (time.sleep(0.02), step())[1]
        assert s.metrics()["sagequant_kv_blocks_used"] == 0
        _stream_until_tokens(s.url, 2, max_tokens=80)
        # the request was generating when the client left: its blocks must come back
        assert _wait_for(lambda: s.metrics()["sagequant_kv_blocks_used"] == 0), s.metrics()
        m = s.metrics()
        assert m["sagequant_requests_running"] == 0 and m["sagequant_requests_in_flight"] == 0
        assert m["sagequant_generated_tokens_total"] < 80  # aborted, not run to completion
        s.assert_alive()


def test_non_streaming_disconnect_aborts(tiny_compiled, tokenizer):
    with Server(tiny_compiled, tokenizer, max_batch=2, max_queue=2, max_seq_len=96) as s:
        engine = s.app.state.loop.engine
        step = engine.step
        engine.step = lambda: (time.sleep(0.05), step())[1]
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", timeout=0.5, json={
                "model": "tiny", "prompt": "abc", "max_tokens": 80, "temperature": 0})
        assert _wait_for(lambda: s.metrics()["sagequant_requests_in_flight"] == 0), s.metrics()
        assert s.metrics()["sagequant_kv_blocks_used"] == 0
        assert s.metrics()["sagequant_generated_tokens_total"] < 80


def test_overload_gives_429_and_server_stays_up(tiny_compiled, tokenizer):
    with Server(tiny_compiled, tokenizer, max_batch=2, max_queue=2, max_seq_len=96) as s:
        engine = s.app.state.loop.engine
        step = engine.step
        engine.step = lambda: (time.sleep(0.01), step())[1]
        body = {"model": "tiny", "prompt": "x y", "max_tokens": 20, "temperature": 0}
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda _: s.client.post("/v1/completions", json=body), range(12)))
        statuses = sorted(r.status_code for r in codes)
        assert set(statuses) == {200, 429}, statuses
        assert statuses.count(200) >= 4  # the 2 running + 2 queued were served
        rejected = next(r for r in codes if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        assert "limit of 4 requests" in rejected.json()["error"]["message"]
        s.assert_alive()
        assert s.client.post("/v1/completions", json=body).status_code == 200
        m = s.metrics()
        assert m["sagequant_kv_blocks_used"] == 0 and m["sagequant_requests_in_flight"] == 0


def test_engine_failure_is_500_and_server_recovers(tiny_compiled, tokenizer):
    with Server(tiny_compiled, tokenizer, max_batch=2, max_queue=2, max_seq_len=96) as s:
        engine = s.app.state.loop.engine
        step = engine.step
        calls = {"n": 0}

        def failing_once():
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("simulated kernel failure")
            return step()
        engine.step = failing_once
        body = {"model": "tiny", "prompt": "x", "max_tokens": 5, "temperature": 0}
        r = s.client.post("/v1/completions", json=body)
        assert r.status_code == 500 and "simulated kernel failure" in r.json()["error"]["message"]
        assert s.client.post("/v1/completions", json=body).status_code == 200
        m = s.metrics()
        assert m["sagequant_engine_step_errors"] == 1 and m["sagequant_kv_blocks_used"] == 0


def test_small_load_test(server):
    """40 requests, 8 concurrent, mixed prompt and output lengths: no errors, batches formed."""
    prompts = ["hi", "The cat sat on the mat and looked around.", "1 2 3 4 5 6 7 8 9 10 11 12"]

    def one(i):
        t = time.perf_counter()
        r = server.client.post("/v1/completions", json={
            "model": "tiny", "prompt": prompts[i % 3], "max_tokens": 4 + 7 * (i % 4),
            "temperature": 0.7, "top_p": 0.9})
        return r, time.perf_counter() - t

    before = server.metrics()["sagequant_generated_tokens_total"]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(40)))
    assert [r.status_code for r, _ in results] == [200] * 40
    tokens = sum(r.json()["usage"]["completion_tokens"] for r, _ in results)
    assert tokens == server.metrics()["sagequant_generated_tokens_total"] - before
    lat = sorted(t for _, t in results)
    print(f"load: p50 {statistics.median(lat):.3f}s p99 {lat[int(0.99 * (len(lat) - 1))]:.3f}s")
    assert server.app.state.loop.steps < tokens  # requests shared decode steps
    server.assert_alive()


def test_binds_loopback_by_default():
    from sagequant.serving.launch import ServingError, check_host
    from sagequant.tools.cli import build_parser
    args = build_parser().parse_args(["engine", "start", "smollm2", "--quantization", "int8"])
    assert args.host == "127.0.0.1" and not args.allow_remote
    for host in ("127.0.0.1", "::1", "localhost"):
        check_host(host, allow_remote=False)
    with pytest.raises(ServingError, match="--allow-remote"):
        check_host("0.0.0.0", allow_remote=False)
    check_host("0.0.0.0", allow_remote=True)
    with pytest.raises(ServingError, match="not an IP address"):
        check_host("example.com", allow_remote=False)


def test_port_in_use_is_a_clear_error():
    from sagequant.serving.launch import ServingError
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        with pytest.raises(ServingError, match="cannot bind 127.0.0.1"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


def test_incremental_decode_never_splits_characters(tokenizer):
    """Multi-byte characters spread over several byte-level tokens come out whole, and the
    concatenated deltas equal decoding the whole output at once."""
    from sagequant.serving.app import ServedModel, _Generation
    from sagequant.serving.protocol import CompletionRequest
    text = "Größe: 日本語のテキスト 🎉🚀 naïve café — ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters span several tokens
    gen = _Generation(None, ServedModel("m", tokenizer, 512, len(tokenizer)), None, [1], 64,
                      CompletionRequest(model="m", prompt="x"))
    seen = []
    for i, token in enumerate(ids):
        gen.tokens.append(token)
        gen._decode(flush=i == len(ids) - 1)
        assert "\ufffd" not in gen.text
        seen.append(gen.text)
    assert gen.text == tokenizer.decode(ids) == text
    assert len(set(seen)) < len(seen)  # some steps had to wait for the rest of a character


def test_engine_admission_fault_is_500(tiny_compiled, tokenizer):
    with Server(tiny_compiled, tokenizer, max_batch=2, max_queue=2, max_seq_len=96) as s:
        engine = s.app.state.loop.engine

        def broken(*args, **kwargs):
            raise TypeError("unexpected engine fault")
        engine.add_request = broken
        r = s.client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 500 and "TypeError: unexpected engine fault" in r.json()["error"]["message"]
        s.assert_alive()
        assert s.metrics()["sagequant_requests_in_flight"] == 0


def test_int8_kv_cache_server(helpers, tokenizer, tiny_compiled, server):
    model = helpers.build_tiny("llama", vocab_size=len(tokenizer))
    cm = sq.compile(model, sq.QuantConfig(weight_dtype="int8", activation_dtype="a16",
                                          kv_cache_dtype="int8", guard="off"))
    with Server(cm, tokenizer, max_batch=2, max_queue=2, max_seq_len=96) as s:
        r = s.client.post("/v1/completions", json={"model": "tiny", "prompt": "hello there",
                                                    "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
        kv_int8 = s.metrics()["sagequant_kv_bytes_per_token"]
    assert 0 < kv_int8 < 0.6 * server.metrics()["sagequant_kv_bytes_per_token"]
