"""Perplexity with sliding windows (the Hugging Face protocol), and small helpers around it.

Windows start every `stride` tokens and hold up to `window` tokens. The first window scores
all its targets (every token but its first); each later window scores only its last
`end - previous_end` targets, i.e. the tokens not scored before, each seeing up to
`window - stride` tokens of extra context. With stride == window every token except the
first of each window is scored. Example: 1,000 tokens, window 512, stride 256 -> windows
[0,512) [256,768) [512,1000), scoring 511 + 256 + 232 = 999 targets.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from ..errors import CalibrationDataError
from ..progress import phase
from .metrics import PairedAccumulator


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll_sum: float  # natural log, summed over scored targets
    n_tokens_scored: int
    n_windows: int
    window: int
    stride: int
    max_tokens: int  # tokens actually evaluated: the first N of token_ids
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_targets) of every window that scores at least one target."""
    spans, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        # Targets are positions 1..L-1 of a window; the first token has no prediction.
        n_targets = min(end - prev_end, end - begin - 1)
        if n_targets > 0:
            spans.append((begin, end, n_targets))
        prev_end = end
        if end == n_tokens:
            break
    return spans


def _batches(spans, batch_size: int):
    """Consecutive spans grouped into batches of equal window length."""
    batch = []
    for span in spans:
        if batch and (len(batch) == batch_size or span[1] - span[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(span)
    if batch:
        yield batch


def perplexity(model_fn, token_ids: torch.Tensor, window: int = 512, stride: int = 512,
               max_tokens: int | None = None, batch_size: int = 1,
               desc: str = "perplexity") -> PerplexityResult:
    """exp(mean NLL) of `token_ids` under `model_fn` ([b, L] int64 -> logits [b, L, V]); progress
    phase `desc`, one step per window."""
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1:
        what = (tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor)
                else type(token_ids).__name__)
        raise CalibrationDataError(f"token_ids must be a 1-D tensor, got {what}")
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise CalibrationDataError(f"token_ids must be integer token ids, got {token_ids.dtype}")
    if window < 2:
        raise CalibrationDataError(f"window={window} must be >= 2 (one context token and one target)")
    if not 1 <= stride <= window:
        raise CalibrationDataError(f"stride={stride} must be in [1, window={window}]")
    if batch_size < 1:
        raise CalibrationDataError(f"batch_size={batch_size} must be >= 1")
    if max_tokens is not None and max_tokens < 2:
        raise CalibrationDataError(f"max_tokens={max_tokens} must be >= 2")
    ids = token_ids[:max_tokens].to(torch.long)
    if ids.numel() < 2:
        raise CalibrationDataError(f"need at least 2 tokens to score one target, got {ids.numel()}")

    spans = _windows(ids.numel(), window, stride)
    nll_sum, n_scored = 0.0, 0
    start = time.perf_counter()
    with torch.inference_mode(), phase(desc, total=len(spans), unit="window") as bar:
        done = 0
        for batch in _batches(spans, batch_size):
            inputs = torch.stack([ids[b:e] for b, e, _ in batch])
            logits = model_fn(inputs)
            _check_logits(logits, inputs, done)
            for row, (begin, end, n_targets) in enumerate(batch):
                length = end - begin
                # logits at position j predict token j+1; score the last n_targets tokens.
                pred = logits[row, length - 1 - n_targets:length - 1].double()
                targets = inputs[row, length - n_targets:].to(pred.device)
                nll = -torch.log_softmax(pred, dim=-1).gather(-1, targets[:, None])
                nll_sum += float(nll.sum())
                n_scored += n_targets
            done += len(batch)
            bar.advance(len(batch))
    return PerplexityResult(
        ppl=math.exp(nll_sum / n_scored), nll_sum=nll_sum, n_tokens_scored=n_scored,
        n_windows=len(spans), window=window, stride=stride, max_tokens=int(ids.numel()),
        seconds=time.perf_counter() - start)


def compare_to_float(float_fn, quant_fn, token_ids: torch.Tensor, window: int = 512, stride: int = 512,
                     batch_size: int = 1, desc: str = "float vs quantized") -> dict:
    """Paired float-vs-quantized metrics on the targets `perplexity` scores (same windows): both
    perplexities, Δ% ppl, mean KL(float ‖ quant) and top-1 flip rate, each with its standard error
    clustered by window (evaluation/metrics.py)."""
    ids = token_ids.to(torch.long)
    spans = _windows(ids.numel(), window, stride)
    acc = PairedAccumulator()
    start = time.perf_counter()
    with torch.inference_mode(), phase(desc, total=len(spans), unit="window") as bar:
        done = 0
        for batch in _batches(spans, batch_size):
            inputs = torch.stack([ids[b:e] for b, e, _ in batch])
            logits = {k: fn(inputs) for k, fn in (("float", float_fn), ("quant", quant_fn))}
            for v in logits.values():
                _check_logits(v, inputs, done)
            for row, (begin, end, n_targets) in enumerate(batch):
                length = end - begin
                sel = slice(length - 1 - n_targets, length - 1)
                acc.add(logits["float"][row:row + 1, sel], logits["quant"][row:row + 1, sel],
                        inputs[row:row + 1, length - n_targets:])
            done += len(batch)
            bar.advance(len(batch))
    return {**acc.summary(), "windows": len(spans), "window": window, "stride": stride,
            "max_tokens": int(ids.numel()), "seconds": time.perf_counter() - start}


def _check_logits(logits, inputs: torch.Tensor, first_window: int) -> None:
    windows = f"windows {first_window}..{first_window + inputs.shape[0] - 1}"
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model_fn must return a logits tensor, got {type(logits).__name__} "
                        "(for a Hugging Face model pass `lambda ids: model(input_ids=ids).logits`)")
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(inputs.shape):
        raise CalibrationDataError(f"{windows}: logits shape {tuple(logits.shape)}, expected "
                         f"[{inputs.shape[0]}, {inputs.shape[1]}, vocab]")
    if int(inputs.max()) >= logits.shape[-1]:
        raise CalibrationDataError(f"{windows}: token id {int(inputs.max())} >= logits vocab size "
                         f"{logits.shape[-1]}")
    if not torch.isfinite(logits).all():
        bad = (~torch.isfinite(logits)).flatten(1).any(1).nonzero().flatten()
        raise CalibrationDataError(f"logits contain NaN/Inf in window {first_window + int(bad[0])} "
                         f"({int((~torch.isfinite(logits)).sum())} non-finite values in {windows})")


def tokenize_eval_text(tokenizer, text: str, max_tokens: int | None) -> torch.Tensor:
    """First `max_tokens` ids of `text` (no special tokens added), 1-D int64."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return torch.tensor(list(ids)[:max_tokens], dtype=torch.long)


def delta_pct(base: float, other: float) -> float:
    """Relative change in percent: delta_pct(30.0, 33.0) == 10.0."""
    return 100.0 * (other / base - 1.0)
