"""argparse types for the CLI's numbers: a nonsense value fails at parse time, naming the flag's
valid range, instead of deep inside a compile (or silently becoming a default)."""
from __future__ import annotations

import argparse
import math


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _at_least(convert, kind: str, low, note: str = ""):
    """A parser of `convert`(text) >= low; `note` follows the range in the error (what the bound means)."""
    def parse(text: str):
        value = convert(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be >= {low}{note}")
        return value
    parse.__name__ = f"{kind} >= {low}"
    return parse


def int_at_least(low: int):
    return _at_least(_int, "integer", low)


def float_at_least(low: float, note: str = ""):
    """A finite number >= low."""
    return _at_least(_float, "number", low, note)


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port: must be in [0, 65535] "
                                         "(0 picks a free one)")
    return value


def group_size(text: str) -> int:
    """A weight group size; 0 means per-channel (one scale per output row)."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not a group size: use a positive size "
                                         "(e.g. 128) or 0 for per-channel")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be > 0")
    return value


non_negative_float = float_at_least(0)


def unit_ratio(text: str) -> float:
    """A fraction in (0, 1], e.g. a clip ratio."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: must be in (0, 1]")
    return value


def sink_weight(text: str) -> float | str:
    """--gptq-sink-weight: a number >= 1, or 'attention' (rows weighted by their attention mass)."""
    if text.strip().lower() == "attention":
        return "attention"
    return _gptq_sink_number(text)


_gptq_sink_number = float_at_least(1, " (1: plain GPTQ) or 'attention'")
awq_sink_weight = float_at_least(1, " (1: the sink sampled like any position)")   # --awq-sink-weight
