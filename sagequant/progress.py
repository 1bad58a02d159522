"""Progress of long steps: one display per phase (count, rate, ETA), logs on stderr, a quiet switch.

Passes and numerics only report what they do — `for block in track(blocks, "gptq", unit="block")`
or `with phase("convert", total=n, unit="layer") as p: ... p.advance()` — and this module decides
what is shown: a tqdm bar on stderr (stdout stays machine-readable), nothing when quiet. Listeners
(`listen`) receive every event too, which is how tests and other front ends observe progress
without parsing a terminal.

Quiet is process-wide on purpose: it is the user's `--quiet` (or SAGEQUANT_QUIET=1), not a
property of any one pass. It also silences transformers' own weight-loading bars.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

_quiet = os.environ.get("SAGEQUANT_QUIET", "") not in ("", "0")
_listeners: list[Callable[["Event"], None]] = []


@dataclass(frozen=True)
class Event:
    """kind: "start" (done == 0), "advance" or "end"; total None when unknown."""

    kind: str
    desc: str
    done: int
    total: int | None
    unit: str
    seconds: float


def set_quiet(quiet: bool) -> None:
    """Turn progress displays and log lines off (True) or on; listeners hear events either way."""
    global _quiet
    _quiet = bool(quiet)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar() if _quiet else hf_logging.enable_progress_bar()


def is_quiet() -> bool:
    return _quiet


@contextmanager
def listen(callback: Callable[[Event], None]) -> Iterator[list[Event]]:
    """Call `callback` with every progress Event inside the block."""
    _listeners.append(callback)
    try:
        yield
    finally:
        _listeners.remove(callback)


@contextmanager
def recording() -> Iterator[list[Event]]:
    """The Events of the block, as a list (for tests and summaries)."""
    events: list[Event] = []
    with listen(events.append):
        yield events


class Phase:
    """One phase's counter; `advance()` after each unit of work, optional `note` for the bar."""

    def __init__(self, desc: str, total: int | None, unit: str):
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0
        self._start = time.perf_counter()
        self._bar = None
        if not _quiet:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                             dynamic_ncols=True)
        self._emit("start")

    def advance(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(n)
        self._emit("advance")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._emit("end")

    def _emit(self, kind: str) -> None:
        if _listeners:
            event = Event(kind, self.desc, self.done, self.total, self.unit,
                          time.perf_counter() - self._start)
            for callback in list(_listeners):
                callback(event)


@contextmanager
def phase(desc: str, total: int | None = None, unit: str = "it") -> Iterator[Phase]:
    p = Phase(desc, total, unit)
    try:
        yield p
    finally:
        p.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
          note: Callable[[T], str] | None = None) -> Iterator[T]:
    """Yield `items`, advancing one phase after each; `note(item)` labels the bar (e.g. a layer)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with phase(desc, total, unit) as p:
        for item in items:
            yield item
            p.advance(note=note(item) if note else None)


def log(message: str) -> None:
    """One line on stderr (between bars, not through them) unless quiet."""
    if _quiet:
        return
    from tqdm.auto import tqdm
    tqdm.write(message, file=sys.stderr)
