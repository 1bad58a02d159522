"""The one thread that drives `GenerationEngine.step()` behind the HTTP server.

The engine is not thread-safe, so only this thread touches it. Request handlers (on the asyncio
event loop) hand requests and aborts over through a locked inbox and receive their tokens on an
asyncio.Queue per request, filled with `call_soon_threadsafe`. Each `step()` runs one decode token
for every running request and admits waiting ones, so requests arriving at any time share the
batch (continuous batching). The number of requests the server holds at once is bounded: past
`max_pending` a submission raises `ServerOverloaded` (HTTP 429) instead of queueing without end.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field

from ..errors import ServingError

RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many seconds of steps
_IDLE_WAIT_S = 0.05


class ServerOverloaded(ServingError):
    """More requests than the server's bound; the client should retry later."""


@dataclass
class Submission:
    """One request as the loop thread needs it; events arrive on `channel` of `event_loop`."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop_token_ids: tuple[int, ...]
    channel: asyncio.Queue
    event_loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.perf_counter)


# Messages put on a request's channel (the handler reads them in this order):
#   ("accepted",)                                   the engine took the request
#   ("rejected", message)                           add_request refused it (ValueError): a 4xx
#   ("token", token_id, finished, finish_reason)    one generated token
#   ("failed", message)                             the engine raised (admitting or stepping): a 5xx


class EngineLoop:
    def __init__(self, engine, max_pending: int):
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} must be >= 1")
        self.engine = engine
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._inbox: list[Submission] = []
        self._aborts: list[str] = []
        self._pending = 0                       # submitted and not yet finished, aborted or refused
        self._live: dict[str, Submission] = {}  # in the engine (loop thread only)
        self._rate = collections.deque()        # (time, tokens) of recent steps
        self._stats = dict(engine.stats())
        self._thread = threading.Thread(target=self._run, name="sagequant-engine-loop", daemon=True)
        self.steps = 0
        self.step_errors = 0

    # ---- called from request handlers ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, sub: Submission) -> None:
        with self._lock:
            if self._pending >= self.max_pending:
                raise ServerOverloaded(f"server is at its limit of {self.max_pending} requests in "
                                       "flight (running + queued); retry later")
            self._pending += 1
            self._inbox.append(sub)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request (client gone or stop string hit); its KV blocks are freed on the next loop."""
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def snapshot(self) -> dict:
        """Engine stats as of the last step, plus the server's own queue numbers."""
        with self._lock:
            now = time.perf_counter()
            recent = [(t, n) for t, n in self._rate if now - t <= RATE_WINDOW_S]
            span = now - recent[0][0] if recent else 0.0
            rate = sum(n for _, n in recent) / span if span > 0 else 0.0
            return {**self._stats, "pending": self._pending, "inbox": len(self._inbox),
                    "tokens_per_second": rate, "steps": self.steps, "step_errors": self.step_errors,
                    "alive": self._thread.is_alive()}

    # ---- the loop thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                inbox, self._inbox = self._inbox, []
                aborts, self._aborts = self._aborts, []
            for sub in inbox:
                self._admit(sub)
            for rid in aborts:
                self._abort(rid)
            if self.engine.has_work():
                self._step()
            else:
                self._refresh_stats(0)
                self._wake.wait(_IDLE_WAIT_S)
                self._wake.clear()
        for rid in list(self._live):
            self._finish(rid, ("failed", "server shutting down"))

    def _admit(self, sub: Submission) -> None:
        try:
            self.engine.add_request(sub.prompt_ids, sub.max_new_tokens, temperature=sub.temperature,
                                    top_p=sub.top_p, stop_token_ids=sub.stop_token_ids,
                                    request_id=sub.request_id)
        except ValueError as e:  # the engine's verdict on the request itself: a 4xx
            self._release()
            self._send(sub, ("rejected", str(e)))
            return
        except Exception as e:  # noqa: BLE001 - a server fault must not kill the loop: a 5xx
            self._release()
            self._send(sub, ("failed", f"the engine could not take the request: "
                                       f"{type(e).__name__}: {e}"))
            return
        self._live[sub.request_id] = sub
        self._send(sub, ("accepted",))

    def _abort(self, rid: str) -> None:
        if rid in self._live:
            self.engine.abort(rid)
            del self._live[rid]
            self._release()

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 - the server must outlive a failing step
            # The engine's state for these requests is unknown: fail and free them all.
            self.step_errors += 1
            for rid in list(self._live):
                self._safe_abort(rid)
                self._finish(rid, ("failed", f"generation failed: {type(e).__name__}: {e}"))
            return
        self.steps += 1
        for ev in events:
            sub = self._live.get(ev.request_id)
            if sub is None:
                continue
            self._send(sub, ("token", ev.token_id, ev.finished, ev.finish_reason))
            if ev.finished:
                del self._live[ev.request_id]
                self._release()
        self._refresh_stats(len(events))

    def _safe_abort(self, rid: str) -> None:
        try:
            self.engine.abort(rid)
        except Exception:  # noqa: BLE001 - already gone from a broken engine
            pass

    def _finish(self, rid: str, message: tuple) -> None:
        sub = self._live.pop(rid)
        self._release()
        self._send(sub, message)

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def _refresh_stats(self, new_tokens: int) -> None:
        stats = dict(self.engine.stats())
        with self._lock:
            self._stats = stats
            if new_tokens:
                now = time.perf_counter()
                self._rate.append((now, new_tokens))
                while self._rate and now - self._rate[0][0] > RATE_WINDOW_S:
                    self._rate.popleft()

    @staticmethod
    def _send(sub: Submission, message: tuple) -> None:
        try:
            sub.event_loop.call_soon_threadsafe(sub.channel.put_nowait, message)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
