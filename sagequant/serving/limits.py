"""Request-size limit in front of the FastAPI app (pure ASGI, so it acts before anything parses
the body): a declared Content-Length over the limit is refused with 413 without reading a byte,
and a body sent without one (chunked) is refused as soon as what arrived passes the limit. The
event loop never holds more than `max_bytes` of one request, and never parses or tokenizes an
oversized one, so /health stays fast while large requests are turned away."""
from __future__ import annotations

import json

from .protocol import error_body


class BodySizeLimit:
    def __init__(self, app, max_bytes: int, on_refused=None):
        if max_bytes < 1:
            raise ValueError(f"max_bytes={max_bytes} must be >= 1")
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, send, declared.decode("latin-1"))
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, f"more than {size}")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnect notices
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send, size: str) -> None:
        if self.on_refused is not None:
            self.on_refused(scope["path"])
        message = (f"request body is {size} bytes; this server accepts at most {self.max_bytes} "
                   "(engine start --max-body-bytes)")
        payload = json.dumps(error_body(413, message, "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
