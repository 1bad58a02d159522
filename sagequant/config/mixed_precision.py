"""Mixed precision by budget (passes/mixed_precision.py), at most one target: the average bits per
weight over the quantized linears (fp16 for layers kept float), or the largest summed per-layer
delta loss (nats); and how per-layer sensitivity is measured."""
from __future__ import annotations

from dataclasses import dataclass, field

from .checks import ConfigError, choice, fail, finite, integer, names, normalise, str_list

# What mixed precision may raise a sensitive layer to.
PRECISION_UPGRADES = ("int8", "fp8", "float")
SENSITIVITY_METHODS = names("measured", "fisher")


@dataclass(frozen=True)
class MixedPrecisionConfig:
    target_bits_per_weight: float | None = None
    target_max_delta_loss: float | None = None
    precision_upgrades: list[str] = field(default_factory=lambda: ["int8", "float"])
    sensitivity_samples: int = 2  # calibration sequences the per-layer sensitivity is measured on
    # "measured": one forward per layer and option (exact, slow on large models); "fisher": one
    # backward pass, second-order estimate with the diagonal empirical Fisher.
    sensitivity_method: str = "measured"

    def __post_init__(self) -> None:
        samples = integer("sensitivity_samples", self.sensitivity_samples, 1)
        method = choice("sensitivity_method", self.sensitivity_method, SENSITIVITY_METHODS)
        for name in ("target_bits_per_weight", "target_max_delta_loss"):
            value = getattr(self, name)
            if value is not None and finite(name, value) <= 0:
                raise fail(name, value, "is not valid", "None or a positive number")
        if self.target_bits_per_weight is not None and self.target_max_delta_loss is not None:
            raise ConfigError("QuantConfig.target_bits_per_weight and target_max_delta_loss are both "
                              "set; mixed precision meets one target: set only one of them")
        ups = str_list("precision_upgrades", self.precision_upgrades)
        bad = [u for u in ups if u not in PRECISION_UPGRADES]
        if bad or len(set(ups)) != len(ups):
            raise fail("precision_upgrades", ups, "is not valid",
                       f"distinct entries of {', '.join(PRECISION_UPGRADES)}")
        normalise(self, sensitivity_samples=samples, sensitivity_method=method, precision_upgrades=ups)
