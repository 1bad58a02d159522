"""Observers: modules inserted on tensors during calibration that record their range.

Selected by QuantConfig.observer (default: percentile when calibration='percentile', else minmax):
- minmax: the running min/max.
- moving_average: an exponential moving average of per-batch min/max, so one odd batch moves the
  range only a little.
- percentile: the running mean of per-batch |x| percentiles, which ignores rare outliers.
- mse: a histogram of |x|, then the clip that minimises the expected squared error of
  quantize-dequantize in the activation format (rounding error inside vs clipping error outside).
- histogram: the same histogram, then TensorRT-style entropy calibration: the clip whose
  quantized distribution has the smallest KL divergence from the observed one (integer formats).
clip_ratio then shrinks the chosen range for all of them.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..ir.annotations import CalibrationRecord
from ..ir.formats import QuantFormat, QuantizationError

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


class MovingAverageMinMaxObserver(Observer):
    kind = "moving_average"
    # Calibration sees tens of batches, not the thousands of steps training observers average
    # over, so the constant is larger than torch.ao's 0.01.
    averaging_constant = 0.1

    def __init__(self, what: str):
        super().__init__(what)
        self.avg_min = 0.0
        self.avg_max = 0.0

    def _observe(self, x):
        lo, hi = float(x.min()), float(x.max())
        if self.batches == 1:
            self.avg_min, self.avg_max = lo, hi
            return
        c = self.averaging_constant
        self.avg_min += c * (lo - self.avg_min)
        self.avg_max += c * (hi - self.avg_max)

    def _range(self):
        return max(abs(self.avg_min), abs(self.avg_max))


class _AbsHistogram:
    """Histogram of |x| over [0, upper]; when a batch exceeds `upper`, old counts are re-binned
    into the wider range (each old bin's count moves to the new bin holding its centre)."""

    def __init__(self, bins: int):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.upper = 0.0

    def add(self, absx: torch.Tensor) -> None:
        top = float(absx.max())
        if top > self.upper:
            if self.upper > 0:
                centres = (np.arange(self.bins) + 0.5) * (self.upper / self.bins)
                idx = np.minimum((centres / top * self.bins).astype(np.int64), self.bins - 1)
                self.counts = np.bincount(idx, weights=self.counts, minlength=self.bins)
            self.upper = top
        if self.upper > 0:
            self.counts += torch.histc(absx.float(), self.bins, 0.0, self.upper).double().numpy()

    def centres(self) -> np.ndarray:
        return (np.arange(self.bins) + 0.5) * (self.upper / self.bins)


class _HistogramObserver(Observer):
    """Base of the observers that choose the clip from a histogram for a given format."""

    def __init__(self, what: str, fmt: QuantFormat, bins: int = 2048):
        super().__init__(what)
        self.fmt = fmt
        self.hist = _AbsHistogram(bins)
        self._clip: float | None = None

    def _observe(self, x):
        self.hist.add(x.abs())
        self._clip = None

    def _range(self):
        if self._clip is None:
            self._clip = self._choose_clip() if self.hist.upper > 0 else 0.0
        return self._clip

    def _choose_clip(self) -> float:
        raise NotImplementedError


class MSEObserver(_HistogramObserver):
    kind = "mse"
    candidates = 256

    def _choose_clip(self) -> float:
        centres = torch.from_numpy(self.hist.centres()).float()
        counts = torch.from_numpy(self.hist.counts)
        clips = torch.linspace(self.hist.upper / self.candidates, self.hist.upper, self.candidates)
        scales = self.fmt.symmetric_scale(clips)[:, None]
        # The format's own rounding/saturation, so fp8's relative steps are modelled exactly.
        deq = self.fmt.decode(self.fmt.encode(centres[None, :] / scales), torch.float32) * scales
        err = ((deq - centres[None, :]).double() ** 2 * counts[None, :]).sum(dim=1)
        return float(clips[int(torch.argmin(err))])


class EntropyHistogramObserver(_HistogramObserver):
    kind = "histogram"
    stride = 8  # candidate thresholds every 8 bins: 240 KL evaluations over 2048 bins

    def __init__(self, what: str, fmt: QuantFormat, bins: int = 2048):
        if fmt.kind != "int":
            raise QuantizationError(
                f"histogram (entropy) calibration is defined for integer activation formats, not "
                f"{fmt.name}; use observer='mse' or 'percentile' for fp8 activations")
        super().__init__(what, fmt, bins)

    def _choose_clip(self) -> float:
        counts, bins = self.hist.counts, self.hist.bins
        levels = int(self.fmt.qmax) + 1  # magnitudes 0..qmax of a symmetric integer format
        best, best_kl = bins, math.inf
        for edge in range(levels, bins + 1, self.stride):
            p = counts[:edge].copy()
            p[-1] += counts[edge:].sum()  # clipped outliers pile onto the threshold bin
            q = np.zeros(edge)
            for chunk in np.array_split(np.arange(edge), levels):
                occupied = counts[chunk] > 0
                if occupied.any():
                    q[chunk[occupied]] = counts[chunk].sum() / occupied.sum()
            kl = _kl_divergence(p, q)
            if kl < best_kl:
                best, best_kl = edge, kl
        return best * self.hist.upper / bins


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two unnormalised histograms; bins where q is empty but p is not cost a
    large fixed penalty instead of infinity (TensorRT's smoothing does the same job)."""
    p = p / p.sum()
    qs = q.sum()
    if qs == 0:
        return math.inf
    q = q / qs
    mask = p > 0
    q_masked = np.where(q[mask] > 0, q[mask], 1e-12)
    return float(np.sum(p[mask] * np.log(p[mask] / q_masked)))


OBSERVERS = {"minmax": MinMaxObserver, "moving_average": MovingAverageMinMaxObserver,
             "percentile": PercentileObserver, "mse": MSEObserver,
             "histogram": EntropyHistogramObserver}
# Observers that optimise the clip for the activation format, so they need quantized activations.
FORMAT_AWARE_OBSERVERS = ("mse", "histogram")


def observer_for(kind: str, what: str, fmt: QuantFormat | None = None) -> Observer:
    """The activation observer of `kind` (QuantConfig.observer_kind); `fmt` is the activation
    format, required by the format-aware observers."""
    if kind not in OBSERVERS:
        raise QuantizationError(f"unknown observer {kind!r}; valid: {', '.join(OBSERVERS)}")
    if kind in FORMAT_AWARE_OBSERVERS:
        if fmt is None:
            raise QuantizationError(
                f"observer {kind!r} chooses the clip for an activation format, but {what} is not "
                "quantized (16-bit activations); use minmax, moving_average or percentile")
        return OBSERVERS[kind](what, fmt)
    return OBSERVERS[kind](what)
