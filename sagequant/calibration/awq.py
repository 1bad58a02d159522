"""AWQ (Lin et al. 2024): activation-aware per-channel weight scaling, then weight clipping.

Scale search. Input channels that carry large activations ("salient") matter most to the output;
scaling their weight columns up by s before quantizing gives them finer steps relative to their
size, and the producer of x divides by s, so y = (x / s) Q(W · s)ᵀ. For each ratio r in
{0, 1/grid, ..., (grid-1)/grid}:
    s = mean|x|^r  (clamped >= 1e-4), normalised s / sqrt(max(s) · min(s)), snapped to 2^(k/32)
    loss(r) = Σ_i ||x W_iᵀ - (x / s) Q(W_i · s)ᵀ||² / (n · Σ_i out_i)
r = 0 is s = 1, plain round-to-nearest, so the chosen loss is never worse than RTN. Worked
number: mean|x| = (4, 1), r = 0.5 -> s = (2, 1) / sqrt(2) = (1.414, 0.707) = (2^(16/32), 2^(-16/32)).
Duo scaling (as AutoAWQ / llm-compressor) adds the family s = mean|x|^r / mean|ŵ|^(1-r), where ŵ
is |W| normalised by its quantization group's max and averaged over output rows and consumers:
channels whose weights are already small relative to their group get scaled up more. With
duo=True both families are searched (2 · grid candidates) and the lower loss wins.

Clip search. Per (output row, group) shrink the clamp range ±absmax to ±absmax · shrink, for
shrink from 1 down to 1 - max_shrink, and keep the shrink with the least output error
Σ_tokens (x_g · (w_g - Q(clamp(w_g)))²; groups are quantized independently, so each (row, group)
is chosen on its own.

Sink rows. Both losses may count each calibration sequence's first position (the attention sink,
whose output every later token reads) apart from the sampled rows x, at a weight of its own:
sink rows are appended to x multiplied by sqrt(weight), so their squared errors count weight times.

The scales are folded exactly like SmoothQuant's (producer output / s, consumer columns · s):
use `fold_into_norm`, `fold_into_linear_rows`, `scale_consumer_columns` re-exported here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..ir.quant_spec import QuantSpec, block_lengths, fake_quantize
from .smoothquant import (
    check_consumers, check_finite_stat, fold_into_linear_rows, fold_into_norm, scale_consumer_columns)

from ..errors import CompileError

__all__ = ["AWQError", "AWQScales", "AWQClip", "OutputModule", "awq_search_scales", "awq_search_clip",
           "awq_candidate_scales", "fold_into_norm", "fold_into_linear_rows", "scale_consumer_columns"]

# Matmul outputs are evaluated in blocks of at most this many float32 elements (64 MiB).
_CHUNK_ELEMENTS = 1 << 24
_MIN_MEAN = 1e-4
# AWQ's scales lie on a grid of 2^(k / 32), steps of 2.2% (awq_candidate_scales says why).
SCALE_STEPS_PER_OCTAVE = 32


class AWQError(CompileError, ValueError):
    """AWQ inputs are unusable (shape mismatch, NaN/Inf, bad grid or spec)."""


@dataclass
class AWQScales:
    scales: torch.Tensor          # float32 [in]; divide the producer by it, multiply consumer columns
    ratio: float                  # chosen exponent r of s = mean|x|^r (/ mean|ŵ|^(1-r) when duo)
    loss: float                   # output MSE at the chosen ratio
    rtn_loss: float               # output MSE at ratio 0 (s = 1, plain RTN)
    losses: list[float] = field(default_factory=list)  # per ratio, in grid order (then duo's)
    duo: bool = False             # the chosen scales are of the duo family


@dataclass
class AWQClip:
    weight: torch.Tensor          # [out, in] clamped to ±absmax · shrink per (row, group)
    shrink: torch.Tensor          # float32 [out, n_groups]
    loss: float                   # Σ_groups Σ_tokens err² / (tokens · out) at the chosen shrinks
    rtn_loss: float               # the same with no clipping (shrink 1)


def _as_rows(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() < 2:
        raise AWQError(f"{what}: x has shape {tuple(x.shape)}; expected [n, in]")
    x = x.detach().reshape(-1, x.shape[-1]).float()
    if x.shape[0] == 0:
        raise AWQError(f"{what}: x has no rows")
    check_finite_stat(x, f"{what} input x", AWQError)
    return x


def awq_candidate_scales(x_mean_abs: torch.Tensor, ratio: float,
                         w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = max(mean|x|, 1e-4)^ratio [/ (w_mean^(1-ratio) + 1e-4)] / sqrt(max · min), snapped to
    the nearest power of 2^(1/SCALE_STEPS_PER_OCTAVE), float32 [in].

    Why snapped: Q(W · s) is discontinuous in s, so unsnapped scales carry float-level noise in the
    statistics (another device, thread count or torch version: ~1e-7 relative) into different
    roundings, different losses and different choices — 44% of the clip decisions and a third of
    the scale ratios differed between a GPU and a CPU run, and perplexity moved by ±1% (BENCHMARKS
    §12i). On the grid, that noise changes a scale only when it straddles a grid midpoint."""
    s = x_mean_abs.double().clamp(min=_MIN_MEAN).pow(ratio)
    if w_mean is not None:
        s = s / (w_mean.double().pow(1.0 - ratio) + _MIN_MEAN)
    s = s / (s.max() * s.min()).sqrt()
    return torch.exp2(torch.round(torch.log2(s) * SCALE_STEPS_PER_OCTAVE) / SCALE_STEPS_PER_OCTAVE).float()


def group_normalised_weight_mean(weights: list[torch.Tensor], weight_spec: QuantSpec) -> torch.Tensor:
    """Per input channel: mean over consumers' rows of |W| / max|W| of its quantization group."""
    parts = []
    for w in weights:
        a = w.detach().abs().float()
        lengths = block_lengths(a.shape[1], weight_spec) if weight_spec.granularity == "per_group" \
            else [a.shape[1]]
        parts.append(torch.cat([p / p.amax(dim=1, keepdim=True).clamp(min=1e-12)
                                for p in torch.split(a, lengths, dim=1)], dim=1))
    return torch.cat(parts, dim=0).mean(dim=0)


def _sq_error_sum(x: torch.Tensor, delta_w: torch.Tensor) -> float:
    """Σ ||x delta_wᵀ||², rows of x in chunks; float32 matmul, float64 sum."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, delta_w.shape[0]))
    total = 0.0
    for xc in torch.split(x, rows, dim=0):
        total += float((xc @ delta_w.T).double().pow(2).sum())
    return total


def _with_sink(x: torch.Tensor, sink_rows: torch.Tensor | None, sink_weight: float,
               what: str) -> tuple[torch.Tensor, float]:
    """x with the sink rows appended, each multiplied by sqrt(sink_weight) (a squared error over
    them then counts sink_weight times), and the number of rows that weighs as."""
    if sink_rows is None:
        return x, float(x.shape[0])
    if not (math.isfinite(sink_weight) and sink_weight > 0):
        raise AWQError(f"{what}: sink_weight={sink_weight!r} must be a finite number > 0")
    sink = _as_rows(sink_rows, f"{what} sink rows")
    if sink.shape[1] != x.shape[1]:
        raise AWQError(f"{what}: sink rows have {sink.shape[1]} channels, x has {x.shape[1]}")
    return torch.cat([x, sink * math.sqrt(sink_weight)]), x.shape[0] + sink_weight * sink.shape[0]


@dataclass
class OutputModule:
    """What follows a group's linears up to the output the scale search measures instead of
    theirs (AutoAWQ's module2inspect; SwiGLU: silu(gate) * up -> down_proj): fn maps the linears'
    outputs [rows, out_i], in consumer order, to [rows, d]; biases are the linears' own."""

    fn: Callable[[list[torch.Tensor]], torch.Tensor]
    biases: list[torch.Tensor | None]


class _ModuleError:
    """Σ ||fn(x Wq_iᵀ + b_i) - fn(x W_iᵀ + b_i)||² over rows of x, the float outputs computed once."""

    @torch.no_grad()
    def __init__(self, x: torch.Tensor, weights: list[torch.Tensor], module: OutputModule):
        if len(module.biases) != len(weights):
            raise AWQError(f"OutputModule has {len(module.biases)} biases for {len(weights)} linears")
        self.module = module
        self.chunks = torch.split(x, max(1, _CHUNK_ELEMENTS // sum(w.shape[0] for w in weights)), dim=0)
        self.ref = [self._outputs(xc, weights) for xc in self.chunks]
        self.width = self.ref[0].shape[-1]

    def _outputs(self, xc: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        fn = torch.nn.functional.linear
        return self.module.fn([fn(xc, w, None if b is None else b.float()) for w, b in zip(weights, self.module.biases)])

    @torch.no_grad()
    def __call__(self, quantized: list[torch.Tensor]) -> float:
        return sum(float((self._outputs(xc, quantized) - ref).double().pow(2).sum())
                   for xc, ref in zip(self.chunks, self.ref))


def awq_search_scales(x: torch.Tensor, weights: list[torch.Tensor], weight_spec: QuantSpec,
                      grid: int = 20, x_mean_abs: torch.Tensor | None = None,
                      duo: bool = False, sink_rows: torch.Tensor | None = None,
                      sink_weight: float = 1.0, module: OutputModule | None = None,
                      output_error: Callable[[list[torch.Tensor]], float] | None = None) -> AWQScales:
    """Grid-search the AWQ scale exponent for linears sharing the input x [n, in].

    The error x Wᵀ - (x / s) Q(W · s)ᵀ is evaluated as x (W - Q(W · s) / s)ᵀ (the same value,
    one matmul, no cancellation between two large outputs). x_mean_abs defaults to mean|x| over
    x's rows; pass the full calibration statistic when x is a subsample. sink_rows [m, in] (the
    attention sink's rows, kept apart from x's sample) each count as sink_weight rows of x.
    module: the loss is instead ||module(x Q(W · s)ᵀ / s) - module(x Wᵀ)||² / (n · its width).
    output_error: the loss is instead output_error([Q(W_i · s) / s]), measured by the caller (the
    attention's output over whole sequences, say); x then only gives mean|x|.
    """
    if module is not None and output_error is not None:
        raise AWQError("awq_search_scales: pass module or output_error, not both")
    if not (isinstance(grid, int) and grid >= 1):
        raise AWQError(f"awq grid={grid!r} must be an integer >= 1")
    x = _as_rows(x, "awq_search_scales")
    weights = [w.detach().float() for w in check_consumers(weights, x.shape[1], AWQError)]
    if x_mean_abs is None:
        x_mean_abs = x.abs().mean(dim=0)
    elif x_mean_abs.shape != (x.shape[1],):
        raise AWQError(f"x_mean_abs has shape {tuple(x_mean_abs.shape)}; x has {x.shape[1]} channels")
    check_finite_stat(x_mean_abs, "x_mean_abs", AWQError)
    if bool((x_mean_abs < 0).any()):
        raise AWQError(f"x_mean_abs must be >= 0 (min {float(x_mean_abs.min()):.4g})")
    if module is None and output_error is None:
        x, n_rows = _with_sink(x, sink_rows, sink_weight, "awq_search_scales")
        numel = n_rows * sum(w.shape[0] for w in weights)
    elif module is not None:   # not linear in its input rows: the sink's error is weighted, not its rows
        parts = [(_ModuleError(x, weights, module), 1.0)]
        n_rows = float(x.shape[0])
        if sink_rows is not None:
            _, n_rows = _with_sink(x, sink_rows, sink_weight, "awq_search_scales")   # checks them
            parts.append((_ModuleError(_as_rows(sink_rows, "sink rows"), weights, module), sink_weight))
        numel = n_rows * parts[0][0].width
    losses: list[float] = []
    best = (math.inf, 0.0, torch.ones(x.shape[1], device=x.device), False)
    families = [None, group_normalised_weight_mean(weights, weight_spec)] if duo else [None]
    for w_mean in families:
        for i in range(grid):
            ratio = i / grid
            s = awq_candidate_scales(x_mean_abs, ratio, w_mean)
            if output_error is not None:
                loss = float(output_error([fake_quantize(w * s, weight_spec) / s for w in weights]))
            elif module is None:
                delta = torch.cat([w - fake_quantize(w * s, weight_spec) / s for w in weights], dim=0)
                loss = _sq_error_sum(x, delta) / numel
            else:
                quantized = [fake_quantize(w * s, weight_spec) / s for w in weights]
                loss = sum(w * err(quantized) for err, w in parts) / numel
            losses.append(loss)
            if loss < best[0]:  # strict: ties keep the earlier candidate, RTN first
                best = (loss, ratio, s, w_mean is not None)
    if not math.isfinite(best[0]):
        raise AWQError(f"awq_search_scales: no ratio gave a finite loss ({losses})")
    return AWQScales(scales=best[2], ratio=best[1], loss=best[0], rtn_loss=losses[0], losses=losses,
                     duo=best[3])


def _sample_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """n rows evenly spread over x (all rows when x has no more than n)."""
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n, device=x.device).round().long()]


def _group_sq_error(x_groups: torch.Tensor, delta: torch.Tensor, n_groups: int, g: int) -> torch.Tensor:
    """Per (row, group) Σ_tokens (x_g · delta_g)², float64 [rows, n_groups].

    x_groups: [n_groups, tokens, g] (zero-padded tail); delta: [rows, in] (padded here).
    """
    pad = n_groups * g - delta.shape[1]
    d = torch.nn.functional.pad(delta, (0, pad)).reshape(delta.shape[0], n_groups, g).permute(1, 2, 0)
    return torch.bmm(x_groups, d).double().pow(2).sum(dim=1).T  # [G, T, rows] -> [rows, G]


def awq_search_clip(x: torch.Tensor, weight: torch.Tensor, weight_spec: QuantSpec, grid: int = 20,
                    max_shrink: float = 0.5, n_sample_tokens: int = 512,
                    sink_rows: torch.Tensor | None = None, sink_weight: float = 1.0) -> AWQClip:
    """Per (row, group) clip search; shrink candidates are linspace(1, 1 - max_shrink, grid).

    per_group specs choose one shrink per group (ragged last group included); per_channel one per
    output row. Rows are processed in chunks; the returned weight keeps weight's dtype.
    sink_rows [m, in] are all kept (x is sampled down to n_sample_tokens), each counting as
    sink_weight rows of the x given.
    """
    if weight_spec.granularity not in ("per_group", "per_channel"):
        raise AWQError(f"awq clip search needs a per_group or per_channel weight spec, got "
                       f"{weight_spec.describe()}")
    if not (isinstance(grid, int) and grid >= 1):
        raise AWQError(f"awq clip grid={grid!r} must be an integer >= 1")
    if not 0.0 <= max_shrink < 1.0:
        raise AWQError(f"awq max_shrink={max_shrink!r} must be in [0, 1)")
    if n_sample_tokens < 1:
        raise AWQError(f"awq n_sample_tokens={n_sample_tokens!r} must be >= 1")
    x = _as_rows(x, "awq_search_clip")
    n_given = x.shape[0]
    x = _sample_tokens(x, n_sample_tokens)
    x, n_rows = _with_sink(x, sink_rows, sink_weight * x.shape[0] / n_given, "awq_search_clip")
    (w,) = check_consumers([weight], x.shape[1], AWQError)
    w = w.detach().float()
    n_out, n_in = w.shape
    lengths = block_lengths(n_in, weight_spec)
    n_groups, g = len(lengths), lengths[0]
    x_pad = torch.nn.functional.pad(x, (0, n_groups * g - n_in))
    x_groups = x_pad.reshape(x.shape[0], n_groups, g).transpose(0, 1).contiguous()
    lens = torch.tensor(lengths, device=w.device)
    shrinks = torch.linspace(1.0, 1.0 - max_shrink, grid) if grid > 1 else torch.ones(1)

    best_shrink = torch.ones(n_out, n_groups, device=w.device)
    best_err = torch.empty(n_out, n_groups, dtype=torch.float64, device=w.device)
    rtn_err = torch.empty_like(best_err)
    rows = max(1, _CHUNK_ELEMENTS // max(n_in, n_groups * x.shape[0]))
    for r0 in range(0, n_out, rows):
        wc = w[r0:r0 + rows]
        absmax = torch.stack([p.abs().amax(dim=1) for p in torch.split(wc, lengths, dim=1)], dim=1)
        for k, shrink in enumerate(shrinks.tolist()):
            bound = (absmax * shrink).repeat_interleave(lens, dim=1)
            q = fake_quantize(torch.minimum(torch.maximum(wc, -bound), bound), weight_spec)
            err = _group_sq_error(x_groups, wc - q, n_groups, g)
            if k == 0:
                rtn_err[r0:r0 + rows] = err
                best_err[r0:r0 + rows] = err
                continue
            better = err < best_err[r0:r0 + rows]  # strict: ties keep the larger shrink
            best_err[r0:r0 + rows] = torch.where(better, err, best_err[r0:r0 + rows])
            best_shrink[r0:r0 + rows] = torch.where(better, shrink, best_shrink[r0:r0 + rows])
    absmax = torch.stack([p.abs().amax(dim=1) for p in torch.split(w, lengths, dim=1)], dim=1)
    bound = (absmax * best_shrink).repeat_interleave(lens, dim=1)
    clipped = torch.minimum(torch.maximum(w, -bound), bound).to(weight.dtype)
    denom = n_rows * n_out
    return AWQClip(weight=clipped, shrink=best_shrink, loss=float(best_err.sum()) / denom,
                   rtn_loss=float(rtn_err.sum()) / denom)
