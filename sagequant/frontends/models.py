"""Resolve what a user names as a model: the packaged real model or a local checkpoint dir."""
from __future__ import annotations

from pathlib import Path

# Aliases for models that ship inside pip packages (no hub access anywhere).
PACKAGED = ("smollm2",)


def resolve_model(spec):
    """-> (model, tokenizer). `spec` is "smollm2" or a local transformers checkpoint directory."""
    if str(spec).lower() in PACKAGED:
        from ..calibration.real_data import load_smollm2
        return load_smollm2()
    from ..ir.trace import load_hf_model
    path = Path(spec)
    model = load_hf_model(path)
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # a checkpoint without tokenizer files is usable with token ids only
        raise FileNotFoundError(f"no tokenizer in {str(path)!r} ({type(e).__name__}); text "
                                "calibration/evaluation needs one") from e
    return model, tok


def resolve_tokenizer(spec):
    """The tokenizer alone (no weights loaded) of "smollm2" or a local checkpoint directory."""
    from transformers import AutoTokenizer
    if str(spec).lower() in PACKAGED:
        from ..calibration.real_data import smollm2_gguf
        directory, filename = smollm2_gguf()
        return AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    try:
        return AutoTokenizer.from_pretrained(str(spec), local_files_only=True)
    except Exception as e:
        raise FileNotFoundError(f"no tokenizer in {str(spec)!r} ({type(e).__name__}); pass "
                                "--tokenizer with a checkpoint directory that has one") from e
