"""Every form calibration / evaluation data comes in, as `--dataset` names it:

  wikipedia | news          the packaged texts (calibration/real_data.py): Wikipedia articles as
                            plain prose, one ABC news article a line (the default evaluation text)
  FILE.jsonl / FILE.json    one JSON object per line; the text is in field `text_field`
  FILE (anything else)      plain text: a document per paragraph (or per line, without blank lines)
  DIR                       every .txt / .md / .jsonl / .json file below it, in path order
  FILE.npy / .safetensors   token ids: [n, L] rows used as given, or one stream [N] cut into
                            windows of seq_len tokens

Text comes back as a list of documents, token ids as a LongTensor [n, L]; both are what
`compile(calibration_data=...)` takes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CalibrationDataError
from .datasets import JSONL_SUFFIXES, load_texts, parse_texts, read_text_file

PACKAGED_TEXTS = {"wikipedia": "the packaged Wikipedia prose (gensim's enwiki test data, markup stripped)",
                  "news": "the packaged news text (gensim's Lee corpus of ABC news; the default "
                          "evaluation text, so calibrating on it flatters eval)"}
TEXT_SUFFIXES = (".txt", ".md", ".text") + JSONL_SUFFIXES
TOKEN_SUFFIXES = (".npy", ".safetensors")
FORMS = ("wikipedia | news (packaged texts), a .jsonl file (--text-field), a plain text file, a "
         "directory of text files, or token ids (.npy / .safetensors)")


def describe(spec) -> str:
    """What `spec` names, for the line a command prints about its data."""
    return PACKAGED_TEXTS.get(str(spec).lower(), str(spec))


def load_dataset(spec, text_field: str = "text", seq_len: int | None = None):
    """Documents (list[str]) or token ids (LongTensor [n, L]) of any form in the module docstring.
    `seq_len` cuts a 1-D token stream into windows; it is required for one."""
    name = str(spec).lower()
    if name in PACKAGED_TEXTS:
        from .real_data import evaluation_text, wikipedia_prose
        return wikipedia_prose() if name == "wikipedia" else [
            line for line in evaluation_text().splitlines() if line.strip()]
    path = Path(spec)
    if path.is_dir():
        return _directory_texts(path, text_field)
    if not path.exists():
        raise CalibrationDataError(f"dataset {str(spec)!r} not found; a dataset is {FORMS}")
    if path.suffix.lower() in TOKEN_SUFFIXES:
        return _token_windows(load_token_ids(path), seq_len, path)
    return load_texts(path, text_field)


def _directory_texts(directory: Path, text_field: str) -> list[str]:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    if not files:
        raise CalibrationDataError(f"directory {directory} holds no text files "
                                   f"({' / '.join(TEXT_SUFFIXES)}); a dataset is {FORMS}")
    texts: list[str] = []
    for f in files:  # an empty file among many is not an error; all of them empty is
        texts.extend(parse_texts(read_text_file(f, "calibration data"), f, text_field))
    if not texts:
        raise CalibrationDataError(f"directory {directory}: its {len(files)} text files are all empty")
    return texts


def load_token_ids(path: Path) -> torch.Tensor:
    """Integer token ids from .npy (no pickles) or .safetensors (its one tensor, or `input_ids`)."""
    if path.suffix.lower() == ".npy":
        import numpy as np
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise CalibrationDataError(f"{path}: not a plain .npy array ({e})") from None
        if not np.issubdtype(array.dtype, np.integer):
            raise CalibrationDataError(f"{path}: token ids must be integers, got dtype {array.dtype}")
        ids = torch.from_numpy(array.astype(np.int64))
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
        except SafetensorError as e:
            raise CalibrationDataError(f"{path}: not a safetensors file ({e})") from None
        if len(tensors) != 1 and "input_ids" not in tensors:
            raise CalibrationDataError(f"{path} holds tensors {sorted(tensors)}: name the token ids "
                                       "'input_ids' (or store only them)")
        ids = tensors.get("input_ids", next(iter(tensors.values())))
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise CalibrationDataError(f"{path}: token ids must be integers, got {ids.dtype}")
    if ids.dim() not in (1, 2) or ids.numel() == 0:
        raise CalibrationDataError(f"{path}: token ids must be a non-empty [N] stream or [n, L] rows, "
                                   f"got shape {tuple(ids.shape)}")
    if int(ids.min()) < 0:
        raise CalibrationDataError(f"{path}: negative token id {int(ids.min())}")
    return ids.long()


def _token_windows(ids: torch.Tensor, seq_len: int | None, path: Path) -> torch.Tensor:
    if ids.dim() == 2:
        return ids
    if seq_len is None:
        raise CalibrationDataError(f"{path} is one token stream of {ids.numel()} ids: a window length "
                                   "(calibration_seq_len / --seq-len) is needed to cut it")
    n = ids.numel() // seq_len
    if n == 0:
        raise CalibrationDataError(f"{path}: {ids.numel()} token ids, fewer than one window of "
                                   f"{seq_len}")
    return ids[: n * seq_len].view(n, seq_len)
