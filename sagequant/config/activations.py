"""How activations are quantized: dtype (16-bit, int8, fp8), dynamic per-token or static
per-tensor scales, and the range observer calibration uses."""
from __future__ import annotations

from dataclasses import dataclass

from .checks import choice, names, normalise

_A16 = ("fp16", "bf16", "float16", "bfloat16", "a16", "w8a16", "w4a16", "none")
# "w8a8" as an activation spelling means "8-bit activations of the weights' kind"; QuantConfig
# resolves it against the weight dtype.
ACTIVATION_DTYPES = {**{s: "a16" for s in _A16}, "int8": "int8", "fp8": "fp8", "w8a8": "w8a8"}
ACTIVATION_SCALES = names("dynamic_per_token", "static_per_tensor")
OBSERVERS = {**names("minmax", "moving_average", "percentile", "mse", "histogram"),
             "entropy": "histogram"}


@dataclass(frozen=True)
class ActivationConfig:
    activation_dtype: str = "w8a16"
    # Quantized activations: scales computed per token at run time, or one static scale per
    # tensor from calibration.
    activation_scale: str = "dynamic_per_token"
    # Activation range observer; None picks percentile for calibration='percentile', else minmax.
    observer: str | None = None

    def __post_init__(self) -> None:
        normalise(self, activation_dtype=choice("activation_dtype", self.activation_dtype,
                                                ACTIVATION_DTYPES),
                  activation_scale=choice("activation_scale", self.activation_scale, ACTIVATION_SCALES),
                  observer=None if self.observer is None else choice("observer", self.observer, OBSERVERS))
