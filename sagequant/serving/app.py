"""The FastAPI application: OpenAI-compatible completions and chat completions (JSON or
server-sent events), /v1/models, /health and Prometheus /metrics, over one EngineLoop.

Every request is validated before it reaches the engine (body size before it is read, prompt
length against --max-prompt-tokens and the context, token ids against the vocabulary, sampling
ranges); tokenization runs in a worker thread, so /health and streams keep answering; a request
past --request-timeout is aborted (504). What still fails goes back as a 4xx/5xx JSON error, and
the server keeps serving. A client that goes away mid-generation has its request
aborted, which frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine_loop import EngineLoop, ServerOverloaded, Submission
from .limits import BodySizeLimit
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import APIError, ChatRequest, CompletionRequest, error_body

_DISCONNECT_POLL_S = 0.5


@dataclass
class ServedModel:
    name: str                  # what clients pass as "model"
    tokenizer: object          # a transformers tokenizer
    context_length: int        # prompt + generated tokens must fit
    vocab_size: int
    default_max_tokens: int = 256  # chat requests without max_tokens (capped by the context)
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are read or parsed
    max_prompt_tokens: int | None = None  # longer prompts get 413 (None: the context decides)
    request_timeout_s: float | None = 300.0  # a request still unfinished after this gets 504


def build_app(loop: EngineLoop, served: ServedModel) -> FastAPI:
    metrics = ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        yield
        loop.stop()

    app = FastAPI(title="sagequant engine", lifespan=lifespan)
    app.state.loop, app.state.served, app.state.metrics = loop, served, metrics
    app.add_middleware(BodySizeLimit, max_bytes=served.max_body_bytes,
                       on_refused=lambda path: metrics.requests.labels(path, "413").inc())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(error_body(exc.status, exc.message, exc.type), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message = _validation_message(exc)
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            try:
                (await request.body()).decode("utf-8")
            except UnicodeDecodeError as e:
                message = _not_utf8(e)
        return _error(request, 400, message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # FastAPI's own errors (404, 405, unparsable body) in the same shape as ours
        message = _not_utf8(exc.__cause__) if isinstance(exc.__cause__, UnicodeDecodeError) else str(exc.detail)
        return _error(request, exc.status_code, message, "invalid_request_error")

    def _error(request: Request, status: int, message: str, type_: str) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(status)).inc()
        return JSONResponse(error_body(status, message, type_), status)

    @app.get("/health")
    async def health():
        if not loop.snapshot()["alive"]:
            return JSONResponse({"status": "engine loop stopped"}, 503)
        return {"status": "ok", "model": served.name}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(loop.snapshot()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "sagequant",
                                            "max_model_len": served.context_length}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(served, body.model)
        if isinstance(body.prompt, str):
            # Tokenizing is CPU work: off the event loop, so /health and streams keep answering.
            ids = (await asyncio.to_thread(served.tokenizer, body.prompt))["input_ids"]
        else:
            ids = list(body.prompt)
            _check_prompt_tokens(served, len(ids))
            bad = [t for t in ids if not 0 <= t < served.vocab_size]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary "
                                    f"[0, {served.vocab_size})")
        _check_length(served, len(ids), body.max_tokens)
        gen = _Generation(loop, served, metrics, ids, body.max_tokens, body)
        await gen.start()
        if body.stream:
            return _sse(request.url.path, metrics, gen, lambda delta, reason, first: _completion_chunk(
                gen, served, delta, reason))
        text, reason = await gen.collect(request)
        metrics.requests.labels(request.url.path, "200").inc()
        return {"id": gen.id, "object": "text_completion", "created": gen.created,
                "model": served.name, "usage": gen.usage(),
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check_model(served, body.model)
        tok = served.tokenizer
        if not getattr(tok, "chat_template", None):
            raise APIError(400, f"model {served.name!r} has no chat template in its tokenizer; "
                                "use /v1/completions")
        ids = await asyncio.to_thread(_chat_ids, tok, [m.model_dump() for m in body.messages])
        max_tokens = body.requested_max_tokens()
        if max_tokens is None:
            max_tokens = max(1, min(served.default_max_tokens, served.context_length - len(ids)))
        _check_length(served, len(ids), max_tokens)
        gen = _Generation(loop, served, metrics, ids, max_tokens, body)
        gen.id = "chatcmpl-" + gen.id.split("-", 1)[1]
        await gen.start()
        if body.stream:
            return _sse(request.url.path, metrics, gen, lambda delta, reason, first: _chat_chunk(
                gen, served, delta, reason, first))
        content, reason = await gen.collect(request)
        metrics.requests.labels(request.url.path, "200").inc()
        return {"id": gen.id, "object": "chat.completion", "created": gen.created,
                "model": served.name, "usage": gen.usage(),
                "choices": [{"index": 0, "finish_reason": reason,
                             "message": {"role": "assistant", "content": content}}]}

    return app


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            where = err.get("loc", ("body", "?"))[-1]
            reason = err.get("ctx", {}).get("error", err.get("msg"))
            parts.append(f"request body is not valid JSON ({reason} at offset {where})")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def _not_utf8(e: UnicodeDecodeError) -> str:
    return f"request body is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"


def _check_model(served: ServedModel, name: str) -> None:
    if name != served.name:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served.name!r}",
                       "model_not_found")


def _chat_ids(tok, messages: list[dict]) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def _check_prompt_tokens(served: ServedModel, prompt_len: int) -> None:
    if served.max_prompt_tokens is not None and prompt_len > served.max_prompt_tokens:
        raise APIError(413, f"prompt is {prompt_len} tokens; this server accepts at most "
                            f"{served.max_prompt_tokens} (engine start --max-prompt-tokens)",
                       "request_too_large")


def _check_length(served: ServedModel, prompt_len: int, max_tokens: int) -> None:
    _check_prompt_tokens(served, prompt_len)
    if prompt_len >= served.context_length:
        raise APIError(400, f"prompt is {prompt_len} tokens; the context holds "
                            f"{served.context_length} (prompt + max_tokens)")
    if prompt_len + max_tokens > served.context_length:
        raise APIError(400, f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the "
                            f"context length {served.context_length}; ask for at most "
                            f"{served.context_length - prompt_len} tokens")


class _Generation:
    """One request's life: submit, wait for the engine to accept it, turn tokens into text
    deltas (holding back incomplete UTF-8 and stop strings), abort it if the client leaves."""

    def __init__(self, loop: EngineLoop, served: ServedModel, metrics: ServerMetrics,
                 prompt_ids: list[int], max_tokens: int, body):
        self.loop, self.served, self.metrics = loop, served, metrics
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.prompt_ids, self.max_tokens = prompt_ids, max_tokens
        self.stops = body.stop_strings()
        self.body = body
        self.tokens: list[int] = []
        self.text = ""      # complete characters decoded so far
        self.sent = 0       # characters of self.text already given to the client
        self._window = (0, 0)  # token offsets [prefix, read) of the incremental decode
        self.finished = False
        self.started = time.perf_counter()
        self.channel: asyncio.Queue = asyncio.Queue()
        timeout = served.request_timeout_s
        self.deadline = None if timeout is None else self.started + timeout

    async def _next(self):
        """The next message of the engine for this request, within the request's time limit."""
        if self.deadline is None:
            return await self.channel.get()
        try:
            return await asyncio.wait_for(self.channel.get(), max(0.0, self.deadline - time.perf_counter()))
        except TimeoutError:
            self.loop.abort(self.id)
            self.finished = True
            raise APIError(504, f"request did not finish within the server's limit of "
                                f"{self.served.request_timeout_s:g} s (engine start --request-timeout); "
                                f"{len(self.tokens)} tokens were generated", "timeout") from None

    async def start(self) -> None:
        eos = self.served.tokenizer.eos_token_id
        sub = Submission(self.id, self.prompt_ids, self.max_tokens, self.body.temperature,
                         self.body.top_p, () if eos is None else (int(eos),), self.channel,
                         asyncio.get_running_loop())
        try:
            self.loop.submit(sub)
        except ServerOverloaded as e:
            raise APIError(429, str(e), "server_overloaded", {"Retry-After": "1"}) from None
        try:
            first = await self._next()
        except asyncio.CancelledError:  # the client left before the engine took the request
            self.loop.abort(self.id)
            raise
        if first[0] == "rejected":
            raise APIError(400, f"request refused by the engine: {first[1]}")
        if first[0] == "failed":
            raise APIError(500, first[1], "engine_error")
        self.metrics.prompt_tokens.inc(len(self.prompt_ids))

    async def deltas(self):
        """Yields (text_delta, finish_reason or None) until the request finishes."""
        try:
            while not self.finished:
                msg = await self._next()
                if msg[0] == "disconnected":
                    raise APIError(499, "client disconnected")
                if msg[0] == "failed":
                    self.finished = True
                    raise APIError(500, msg[1], "engine_error")
                _, token, done, reason = msg
                self.tokens.append(token)
                self.metrics.generated_tokens.inc()
                self._decode(flush=done)
                stop_at = self._stop_position()
                if stop_at is not None:
                    if not done:
                        self.loop.abort(self.id)
                    self.text, done, reason = self.text[:stop_at], True, "stop"
                self.finished = done
                delta = self._ready_text(done)
                if delta or done:
                    yield delta, (_openai_reason(reason) if done else None)
            self.metrics.latency.observe(time.perf_counter() - self.started)
        finally:
            if not self.finished:  # the client went away (or the handler was cancelled)
                self.loop.abort(self.id)

    def _decode(self, flush: bool) -> None:
        """Append the text the new token completes. Only a short window of tokens is decoded
        (not the whole output each time), starting one step back so that a token's rendering that
        depends on its predecessor comes out right; text that ends in an incomplete UTF-8
        sequence waits for the next token unless the request is finishing."""
        prefix, read = self._window
        decode = self.served.tokenizer.decode
        before = decode(self.tokens[prefix:read], skip_special_tokens=True)
        after = decode(self.tokens[prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (flush or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._window = (read, len(self.tokens))

    def _stop_position(self) -> int | None:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _ready_text(self, done: bool) -> str:
        end = len(self.text)
        if not done:
            # Keep back a tail that could still grow into a stop string.
            hold = max((k for s in self.stops for k in range(1, len(s))
                        if self.text.endswith(s[:k])), default=0)
            end -= hold
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    async def collect(self, request: Request) -> tuple[str, str]:
        """The whole text (non-streaming); a client that disconnects meanwhile aborts it."""
        watcher = asyncio.ensure_future(self._watch_disconnect(request))
        parts, reason = [], "length"
        try:
            async for delta, finish in self.deltas():
                parts.append(delta)
                reason = finish or reason
        finally:
            watcher.cancel()
        return "".join(parts), reason

    async def _watch_disconnect(self, request: Request) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(_DISCONNECT_POLL_S)
        self.channel.put_nowait(("disconnected",))

    def usage(self) -> dict:
        return {"prompt_tokens": len(self.prompt_ids), "completion_tokens": len(self.tokens),
                "total_tokens": len(self.prompt_ids) + len(self.tokens)}


def _openai_reason(reason: str | None) -> str:
    return "length" if reason in (None, "length", "max_tokens") else "stop"


def _sse(path: str, metrics: ServerMetrics, gen: _Generation, chunk) -> StreamingResponse:
    async def events():
        try:
            first = True
            async for delta, reason in gen.deltas():
                yield f"data: {json.dumps(chunk(delta, reason, first))}\n\n"
                first = False
        except APIError as e:  # headers are gone: report the failure in the stream
            yield f"data: {json.dumps(error_body(e.status, e.message, e.type))}\n\n"
            metrics.requests.labels(path, str(e.status)).inc()
            return
        yield "data: [DONE]\n\n"
        metrics.requests.labels(path, "200").inc()
    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _completion_chunk(gen: _Generation, served: ServedModel, delta: str, reason) -> dict:
    return {"id": gen.id, "object": "text_completion", "created": gen.created, "model": served.name,
            "choices": [{"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}]}


def _chat_chunk(gen: _Generation, served: ServedModel, delta: str, reason, first: bool) -> dict:
    content = {"role": "assistant", "content": delta} if first else {"content": delta}
    return {"id": gen.id, "object": "chat.completion.chunk", "created": gen.created,
            "model": served.name, "choices": [{"index": 0, "delta": content, "finish_reason": reason}]}
