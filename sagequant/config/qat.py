"""Quantization-aware training switches (the training itself: calibration/qat.QATOptions)."""
from __future__ import annotations

from dataclasses import dataclass

from .checks import boolean


@dataclass(frozen=True)
class QATConfig:
    enable_qat: bool = False
    qat_learn_scales: bool = True  # LSQ-learned scales (False: observers track them)

    def __post_init__(self) -> None:
        boolean("enable_qat", self.enable_qat)
        boolean("qat_learn_scales", self.qat_learn_scales)
