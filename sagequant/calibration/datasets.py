"""Calibration data: load text files, cut token windows, normalise what users pass as data.

Supported inputs of `as_token_batches`:
  list[str]                 tokenized and cut into `num_samples` windows of `seq_len` tokens
  str / Path                a dataset file read by `load_texts`, then as above
  LongTensor [n, L]         one [1, L] batch per row
  list of 1-D / 2-D tensors 1-D -> [1, L]; 2-D [b, L] kept as one batch
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CalibrationDataError

JSONL_SUFFIXES = (".jsonl", ".json")


def load_texts(path, text_field: str = "text") -> list[str]:
    """Documents of a dataset file.

    `.jsonl` / `.json`: one JSON object per line with a string field `text_field` (blank lines
    skipped). Anything else is plain text: one document per paragraph (blank-line separated),
    or one per non-empty line when the file has no blank lines.
    """
    path = Path(path)
    texts = parse_texts(read_text_file(path, "calibration data"), path, text_field)
    if not texts:
        raise CalibrationDataError(f"{path}: no usable text (file is empty or whitespace only)")
    return texts


def parse_texts(raw: str, path: Path, text_field: str = "text") -> list[str]:
    """The documents in `raw`, the content of `path` (its suffix picks JSONL or plain text)."""
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _parse_jsonl(raw, path, text_field)
    return _parse_plain(raw)


def read_text_file(path, what: str) -> str:
    """The UTF-8 text of a data file; a missing, binary or non-UTF-8 file is a CalibrationDataError
    naming the file and the first offending byte."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"{what} file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationDataError(f"{what} file {path} is not UTF-8 text (byte {data[e.start]:#04x} "
                                   f"at offset {e.start}); is it a binary file?") from None
    if "\x00" in text:
        raise CalibrationDataError(f"{what} file {path} holds NUL bytes (first at offset "
                                   f"{text.index(chr(0))}): a binary file, not text")
    return text


def check_token_range(batches: list[torch.Tensor], vocab_size: int | None) -> None:
    """Refuse token ids the model's embedding has no row for (they would fail deep in a pass)."""
    if not vocab_size:
        return
    for i, b in enumerate(batches):
        top = int(b.max())
        if top >= vocab_size:
            raise CalibrationDataError(f"calibration batch {i}: token id {top} is outside the model's "
                                       f"vocabulary (vocab_size {vocab_size}, ids 0..{vocab_size - 1})")


def _parse_jsonl(raw: str, path: Path, field: str) -> list[str]:
    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibrationDataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise CalibrationDataError(
                f"{path}:{lineno}: record has no string {field!r} field (got {type(text).__name__}; "
                f"the record has: {fields}); choose the field with --text-field")
        if text.strip():
            texts.append(text)
    return texts


def _parse_plain(raw: str) -> list[str]:
    lines = raw.splitlines()
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    if not nonblank:
        return []
    inner = lines[nonblank[0]:nonblank[-1] + 1]
    if all(line.strip() for line in inner):  # no paragraph breaks: a document per line
        return list(inner)
    paragraphs, current = [], []
    for line in inner + [""]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    return paragraphs


def _encode(tokenizer, text: str) -> list[int]:
    # No BOS/EOS per text: documents are joined with an explicit eos below.
    return list(tokenizer.encode(text, add_special_tokens=False))


def tokenize_calibration(texts, tokenizer, num_samples: int, seq_len: int,
                         seed: int = 0) -> torch.Tensor:
    """[n, seq_len] int64 windows cut from the concatenated token stream, n <= num_samples.

    Texts are joined with the tokenizer's eos (when it has one) and cut into non-overlapping
    consecutive windows from the start, so the result is deterministic: `seed` is accepted for
    API stability and does not change it. Fewer than `num_samples` windows are returned when
    the text is too short; none at all is an error.
    """
    if num_samples < 1 or seq_len < 1:
        raise CalibrationDataError(f"num_samples={num_samples} and seq_len={seq_len} must be >= 1")
    if not texts:
        raise CalibrationDataError("no calibration texts given (empty list)")
    needed = num_samples * seq_len
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for i, text in enumerate(texts):
        if i and eos is not None:
            stream.append(int(eos))
        stream.extend(_encode(tokenizer, text))
        if len(stream) >= needed:  # stop early: the full corpus may be megabytes
            break
    n = min(num_samples, len(stream) // seq_len)
    if n == 0:
        raise CalibrationDataError(
            f"calibration text has {len(stream)} tokens; one window needs seq_len={seq_len}")
    return torch.tensor(stream[:n * seq_len], dtype=torch.long).view(n, seq_len)


def as_token_batches(data, tokenizer=None, num_samples: int = 128,
                     seq_len: int = 512) -> list[torch.Tensor]:
    """Normalise calibration data to a list of [b, L] int64 batches (see module docstring).

    `num_samples` / `seq_len` apply to text inputs only; tensors are used as given.
    """
    if isinstance(data, (str, Path)):
        return _text_batches(load_texts(data), tokenizer, num_samples, seq_len, f"file {data}")
    if isinstance(data, torch.Tensor):
        if data.dim() not in (1, 2):
            raise CalibrationDataError(f"calibration tensor must be 1-D or 2-D, got shape "
                                       f"{tuple(data.shape)}")
        rows = [data] if data.dim() == 1 else list(data)
        return [_check_ids(r.unsqueeze(0), f"row {i}") for i, r in enumerate(rows)]
    if not isinstance(data, (list, tuple)) or len(data) == 0:
        raise CalibrationDataError(f"calibration data is empty or of unsupported type "
                                   f"{type(data).__name__}")
    if all(isinstance(d, str) for d in data):
        return _text_batches(list(data), tokenizer, num_samples, seq_len, "list of strings")
    batches = []
    for i, item in enumerate(data):
        if not isinstance(item, torch.Tensor) or item.dim() not in (1, 2):
            what = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise CalibrationDataError(f"calibration item {i}: expected a 1-D or 2-D token "
                                       f"tensor (or a list of only strings), got {what}")
        batches.append(_check_ids(item.unsqueeze(0) if item.dim() == 1 else item, f"item {i}"))
    return batches


def _text_batches(texts, tokenizer, num_samples, seq_len, what) -> list[torch.Tensor]:
    if tokenizer is None:
        raise CalibrationDataError(f"calibration data is a {what}: a tokenizer is required")
    return list(tokenize_calibration(texts, tokenizer, num_samples, seq_len).split(1))


def _check_ids(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise CalibrationDataError(f"calibration {what}: token ids must be integers, got {t.dtype}")
    if t.numel() == 0:
        raise CalibrationDataError(f"calibration {what}: empty tensor {tuple(t.shape)}")
    if int(t.min()) < 0:
        raise CalibrationDataError(f"calibration {what}: negative token id {int(t.min())}")
    return t.to(torch.long)
