"""One family for every error a user can cause: `SageQuantError` and one subclass per area.

The CLI prints any SageQuantError as one line (`error: <message>`, exit status 2) and treats every
other exception as a bug in sagequant (traceback). Each area class also derives from the builtin
exception its errors used to be, so `except ValueError` written against older releases still
catches them. Modules define their specific classes (GPTQError, TraceError, ...) on these.
"""
from __future__ import annotations


class SageQuantError(Exception):
    """Base of every error sagequant raises on purpose; the message names the field, file, node
    or value at fault and what would be valid."""


class ConfigError(SageQuantError, ValueError):
    """A QuantConfig, a CLI flag or a plan derived from them is invalid; the message names the field."""


class CalibrationDataError(SageQuantError, ValueError):
    """Calibration or evaluation data is unusable: empty, not text, token ids outside the vocabulary."""


class QuantizationError(SageQuantError, ValueError):
    """A tensor cannot be quantized as asked (NaN/Inf input, scale out of range, bad shape)."""


class CompileError(SageQuantError, RuntimeError):
    """A pass could not do its job on this model (an algorithm's inputs, a graph rewrite)."""


class UnsupportedError(SageQuantError, ValueError):
    """The model, one of its ops, or the requested combination is not supported; says what is."""


class KernelError(SageQuantError, LookupError):
    """No kernel (or no working kernel) for a layer's scheme, backend and shape."""


class ArtifactError(SageQuantError, RuntimeError):
    """An artifact is missing, truncated, tampered with, unsigned where a signature is required,
    from an incompatible version, or its path cannot be written without losing files."""


class ExportError(SageQuantError, ValueError):
    """The compiled model cannot be written in the requested format; says which layer, scheme,
    format and constraint, and what would work instead."""


class ServingError(SageQuantError, RuntimeError):
    """The server cannot be started or a request cannot be served as asked."""


__all__ = ["SageQuantError", "ConfigError", "CalibrationDataError", "QuantizationError",
           "CompileError", "UnsupportedError", "KernelError", "ArtifactError", "ExportError",
           "ServingError"]
