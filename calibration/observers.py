"""Observers: modules inserted on tensors during calibration that record their range.

Selected by QuantConfig.calibration: minmax keeps the running min/max; percentile keeps the
running mean of per-batch |x| percentiles, which ignores rare outliers. clip_ratio then shrinks
the observed range for both.
"""
from __future__ import annotations

import math

import torch

from ..ir.annotations import CalibrationRecord
from ..ir.formats import QuantizationError

# torch.quantile refuses inputs above 2**24 elements; larger batches are subsampled.
_QUANTILE_LIMIT = 1 << 24


class Observer(torch.nn.Module):
    kind = "observer"

    def __init__(self, what: str):
        super().__init__()
        self.what = what  # "input of model.layers.0.mlp.up_proj" — names the tensor in errors
        self.min = math.inf
        self.max = -math.inf
        self.batches = 0
        self.values = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xd = x.detach()
        if not bool(torch.isfinite(xd).all()):
            raise QuantizationError(
                f"calibration activation {self.what} contains NaN/Inf (batch {self.batches}); "
                "check the calibration data and the float model on it")
        self.min = min(self.min, float(xd.min()))
        self.max = max(self.max, float(xd.max()))
        self.batches += 1
        self.values += xd.numel()
        self._observe(xd)
        return x

    def _observe(self, x: torch.Tensor) -> None:
        pass

    def _range(self) -> float:
        return max(abs(self.min), abs(self.max))

    def record(self, tensor: str, clip_ratio: float) -> CalibrationRecord:
        if self.batches == 0:
            raise QuantizationError(f"observer for {self.what} saw no data: the calibration batches "
                                    "never reached this node")
        return CalibrationRecord(tensor=tensor, observer=self.kind, min=self.min, max=self.max,
                                 absmax=max(abs(self.min), abs(self.max)),
                                 clip=self._range() * clip_ratio, percentile=self._percentile(),
                                 num_samples=self.batches, num_values=self.values)

    def _percentile(self) -> float | None:
        return None


class MinMaxObserver(Observer):
    kind = "minmax"


class PercentileObserver(Observer):
    kind = "percentile"

    def __init__(self, what: str, percentile: float = 99.99):
        super().__init__(what)
        if not 0 < percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile
        self.mean_value = 0.0

    def _observe(self, x):
        flat = x.abs().flatten().float()
        if flat.numel() > _QUANTILE_LIMIT:
            gen = torch.Generator().manual_seed(self.batches)
            flat = flat[torch.randint(flat.numel(), (_QUANTILE_LIMIT,), generator=gen)]
        q = float(torch.quantile(flat, self.percentile / 100.0))
        self.mean_value += (q - self.mean_value) / self.batches

    def _range(self):
        return self.mean_value

    def _percentile(self):
        return self.percentile


OBSERVERS = {"minmax": MinMaxObserver, "percentile": PercentileObserver}


def observer_for(calibration: str, what: str) -> Observer:
    """Activation observer for a calibration method; the weight-rewriting methods observe ranges
    with minmax and add their own statistics in their passes."""
    kind = calibration if calibration in OBSERVERS else "minmax"
    return OBSERVERS[kind](what)
