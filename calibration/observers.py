"""Observers: modules inserted on tensors during calibration that record their range.

Selected by QuantConfig.calibration: minmax keeps the running min/max; percentile keeps the
running mean of per-batch |x| percentiles, which ignores rare outliers. clip_ratio then shrinks
the observed range for both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir.annotations import CalibrationRecord
from ..ir.formats import QuantizationError

# torch.quantile refuses inputs above 2**24 elements; larger batches are subsampled.
_QUANTILE_LIMIT = 1 << 24


class Observer(torch.nn.Module):
    kind = "observer"

    def __init__(self, what: str, keep_rows: int = 0):
        super().__init__()
        self.what = what  # "input of model.layers.0.mlp.up_proj" — names the tensor in errors
        self.min = math.inf
        self.max = -math.inf
        self.batches = 0
        self.values = 0
        # Per input channel statistics and a row sample, for the smoothing passes (SmoothQuant, AWQ).
        self.keep_rows = keep_rows
        self.channel_absmax: torch.Tensor | None = None
        self.channel_abs_sum: torch.Tensor | None = None
        self.rows: list[torch.Tensor] = []

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
        self._observe_channels(xd)
        return x

    def _observe_channels(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        absmax, abs_sum = rows.abs().amax(0), rows.abs().sum(0)
        if self.channel_absmax is None:
            self.channel_absmax, self.channel_abs_sum = absmax, abs_sum
        else:
            self.channel_absmax = torch.maximum(self.channel_absmax, absmax)
            self.channel_abs_sum += abs_sum
        if self.keep_rows:
            gen = torch.Generator().manual_seed(self.batches)
            take = min(rows.shape[0], self.keep_rows)
            self.rows.append(rows[torch.randperm(rows.shape[0], generator=gen)[:take]].clone())

    def stats(self) -> "ActivationStats":
        n_rows = self.values // self.channel_absmax.numel()
        sample = torch.cat(self.rows)[: self.keep_rows] if self.rows else None
        return ActivationStats(self.channel_absmax, self.channel_abs_sum / n_rows, sample)

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

    def __init__(self, what: str, percentile: float = 99.99, keep_rows: int = 0):
        super().__init__(what, keep_rows)
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
# Methods that search on activation samples keep this many input rows per linear.
ROWS_FOR = {"awq": 512, "smoothquant+awq": 512, "smoothquant": 512}


@dataclass
class ActivationStats:
    """Per-channel statistics of one linear's input, for the smoothing passes."""

    channel_absmax: torch.Tensor        # [in]
    channel_mean_abs: torch.Tensor      # [in]
    rows: torch.Tensor | None           # [n, in] random sample of input rows, or None


def observer_for(calibration: str, what: str) -> Observer:
    """Activation observer for a calibration method: the range observer the method names
    (minmax for the weight-rewriting methods), keeping input rows when the method searches."""
    kind = calibration if calibration in OBSERVERS else "minmax"
    return OBSERVERS[kind](what, keep_rows=ROWS_FOR.get(calibration, 0))
