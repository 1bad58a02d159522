"""The rotate pass (QuaRot / SpinQuant style orthogonal rotations, passes/rotate.py): which
residual-stream rotation, and whether the online down_proj and per-head v/o rotations go with it."""
from __future__ import annotations

from dataclasses import dataclass

from .checks import boolean, choice, integer, names, normalise

# off: no rotation; hadamard: randomised Hadamard (seeded signs); random: seeded random orthogonal.
ROTATIONS = {**names("off", "hadamard", "random"), "none": "off"}


@dataclass(frozen=True)
class RotationConfig:
    rotate: str = "off"
    rotate_online: bool = True   # online Hadamard in front of down_proj (a graph node)
    rotate_heads: bool = True    # per-head Hadamard fused into v_proj / o_proj
    rotate_seed: int = 0

    def __post_init__(self) -> None:
        boolean("rotate_online", self.rotate_online)
        boolean("rotate_heads", self.rotate_heads)
        normalise(self, rotate=choice("rotate", self.rotate, ROTATIONS),
                  rotate_seed=integer("rotate_seed", self.rotate_seed, 0))
