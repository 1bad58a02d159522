"""The accuracy guard (passes/guard.py): the last `guard_samples` calibration sequences are held
back from calibration and float vs quantized is measured on them; "enforce" fails the compile past
a bound, "report" only records, "off" does neither."""
from __future__ import annotations

from dataclasses import dataclass, field

from .checks import choice, fail, finite, integer, names, normalise

GUARD_MODES = names("enforce", "report", "off")
# Bounds per scheme, loose enough for legitimate quantization of each scheme and tight enough to
# stop a collapse: KL(float || quantized) and delta loss in nats per token on the held-back
# sequences, top-1 agreement as a fraction, and every quantized layer's own output SQNR (its
# scheme's bound). guard_bounds overrides any of them.
# Measured on SmolLM2-135M, 2 x 256 held-back Wikipedia tokens, RTN g128 (BENCHMARKS.md, issue 10):
# W4A16 KL 0.55-0.76, delta loss 0.35-0.67, top-1 0.59-0.61, worst layer 11 dB; W8A16 KL 0.002,
# worst layer 35 dB. A collapse (ppl x1e12) is a delta loss of ~25 nats.
GUARD_BOUND_KEYS = ("max_kl", "max_delta_loss", "min_top1", "min_layer_sqnr_db")
GUARD_DEFAULTS = {
    "W8A16": {"max_kl": 0.05, "max_delta_loss": 0.05, "min_top1": 0.7, "min_layer_sqnr_db": 25.0},
    "FP8-W8A16": {"max_kl": 0.1, "max_delta_loss": 0.1, "min_top1": 0.6, "min_layer_sqnr_db": 18.0},
    "W8A8-INT8": {"max_kl": 0.3, "max_delta_loss": 0.3, "min_top1": 0.5, "min_layer_sqnr_db": 12.0},
    "W8A8-FP8": {"max_kl": 0.3, "max_delta_loss": 0.3, "min_top1": 0.5, "min_layer_sqnr_db": 12.0},
    "W4A16": {"max_kl": 1.5, "max_delta_loss": 1.5, "min_top1": 0.3, "min_layer_sqnr_db": 6.0},
    "NF4-A16": {"max_kl": 1.5, "max_delta_loss": 1.5, "min_top1": 0.3, "min_layer_sqnr_db": 6.0},
    # 4-bit weights dominate the error; the 8-bit activations add little (W8A8's bounds are 5x looser
    # than W8A16's for the same reason), so W4A16's bounds, unmeasured beyond that.
    "W4A8-INT8": {"max_kl": 1.5, "max_delta_loss": 1.5, "min_top1": 0.3, "min_layer_sqnr_db": 6.0},
    "W4A8-FP8": {"max_kl": 1.5, "max_delta_loss": 1.5, "min_top1": 0.3, "min_layer_sqnr_db": 6.0},
}


@dataclass(frozen=True)
class GuardConfig:
    guard: str = "enforce"
    guard_samples: int = 2
    guard_bounds: dict[str, float] = field(default_factory=dict)  # overrides GUARD_DEFAULTS

    def __post_init__(self) -> None:
        mode = choice("guard", self.guard, GUARD_MODES)
        samples = integer("guard_samples", self.guard_samples, 1)
        if not isinstance(self.guard_bounds, dict):
            raise fail("guard_bounds", self.guard_bounds, "must be a dict",
                       f"{{name: number}} with names {', '.join(GUARD_BOUND_KEYS)}")
        bounds = {}  # normalised; the caller's dict untouched
        for key, value in self.guard_bounds.items():
            if key not in GUARD_BOUND_KEYS:
                raise fail("guard_bounds", {key: value}, "has an unknown bound", ", ".join(GUARD_BOUND_KEYS))
            bounds[key] = finite(f"guard_bounds[{key!r}]", value)
        top1 = bounds.get("min_top1")
        if top1 is not None and not 0 <= top1 <= 1:
            raise fail("guard_bounds['min_top1']", top1, "is out of range", "a fraction in [0, 1]")
        normalise(self, guard=mode, guard_samples=samples, guard_bounds=bounds)

    def bound(self, name: str, scheme: str) -> float:
        """The bound `name` for layers / models of `scheme`: guard_bounds, else the default."""
        return self.guard_bounds.get(name, GUARD_DEFAULTS[scheme][name])
