"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights, exactly.

For a linear layer y = x Wᵀ, any positive per-input-channel vector s gives
    y = (x / s) (W · s)ᵀ          (W · s: column j of W multiplied by s_j)
so dividing the producer of x by s and multiplying every consumer's columns by s changes no
float output. SmoothQuant picks
    s_j = max|X_j|^α / max_i max_k |W_i[k, j]|^(1-α)
which flattens the per-channel activation range (α = 1: every channel of x / s peaks at 1) at the
cost of the weights' (α = 0: every column of W · s peaks at 1). Worked number, α = 0.5: an
activation channel peaking at 16 whose weights peak at 4 gets s = 4 / 2 = 2, after which both
peak at 8.

Pure tensor math only; the graph passes find norm → consumer-linear groups, gather act_absmax
during calibration, and write the folded tensors back. AWQ folds its scales with the same three
functions (`fold_into_norm`, `fold_into_linear_rows`, `scale_consumer_columns`).
"""
from __future__ import annotations

import math

import torch

from ..ir.quant_spec import QuantSpec, fake_quantize
from ..errors import CompileError

DEFAULT_ALPHA_GRID = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.30, 0.35, ..., 0.80


class SmoothQuantError(CompileError, ValueError):
    """Smoothing statistics or tensors are unusable (bad alpha, NaN/Inf, shape mismatch)."""


# ----------------------------------------------------------------------------- validation
def check_finite_stat(t: torch.Tensor, what: str, error: type[ValueError] = SmoothQuantError) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        raise error(f"{what} contains {n_nan} NaN and {n_inf} Inf values")


def check_consumers(weights, in_features: int, error: type[ValueError] = SmoothQuantError) -> list[torch.Tensor]:
    """Consumer weights must be a non-empty list of finite [out_i, in_features] matrices."""
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    weights = list(weights)
    if not weights:
        raise error("empty list of consumer weights: a smoothing group needs at least one linear")
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != in_features:
            raise error(f"consumer weight {i} has shape {tuple(w.shape)}; expected "
                        f"[out, {in_features}] to match the {in_features} input channels")
        check_finite_stat(w, f"consumer weight {i}", error)
    return weights


def check_scales(scales: torch.Tensor, n: int, what: str, error: type[ValueError] = SmoothQuantError) -> None:
    if scales.dim() != 1 or scales.shape[0] != n:
        raise error(f"scales have shape {tuple(scales.shape)}; {what} needs [{n}]")
    check_finite_stat(scales, "scales", error)
    if bool((scales <= 0).any()):
        raise error(f"scales must be > 0 (min {float(scales.min()):.4g}): a zero or negative "
                    "scale is not an invertible rewrite")


def _work_dtype(*ts: torch.Tensor) -> torch.dtype:
    """float32 at least (bf16/fp16 weights are folded in fp32, then cast back); float64 stays."""
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ----------------------------------------------------------------------------- scales
def weight_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max_i max_k |W_i[k, j]| per input channel j, float32 [in]."""
    return torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5,
                     min_scale: float = 1e-5) -> torch.Tensor:
    """Per-input-channel s_j = act_absmax_j^α / weight_absmax_j^(1-α), float32 [in].

    Channels whose activation or weight max is 0 get s = 1 (nothing to balance); the result is
    clamped to >= min_scale. Computed in float64.
    """
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise SmoothQuantError(f"smoothing alpha={alpha!r} must be a number in [0, 1]")
    if not min_scale > 0:
        raise SmoothQuantError(f"min_scale={min_scale!r} must be > 0")
    if act_absmax.dim() != 1:
        raise SmoothQuantError(f"act_absmax has shape {tuple(act_absmax.shape)}; expected [in]")
    check_finite_stat(act_absmax, "act_absmax")
    if bool((act_absmax < 0).any()):
        raise SmoothQuantError(f"act_absmax must be >= 0 (min {float(act_absmax.min()):.4g})")
    weights = check_consumers(weights, act_absmax.shape[0])
    a = act_absmax.detach().double()
    w = weight_absmax(weights).double()
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(min=min_scale).float()


# ----------------------------------------------------------------------------- folding
def fold_into_norm(norm_weight: torch.Tensor, scales: torch.Tensor,
                   weight_offset: float = 0.0) -> torch.Tensor:
    """New norm weight whose output is the old one divided by s.

    Norms computing (offset + w) · x̂ (Gemma: offset 1.0) get (offset + w) / s - offset.
    A LayerNorm with bias divides both weight and bias: use `fold_into_linear_rows(w, b, s)`.
    """
    if norm_weight.dim() != 1:
        raise SmoothQuantError(f"norm weight has shape {tuple(norm_weight.shape)}; expected [hidden]")
    check_scales(scales, norm_weight.shape[0], f"norm weight {tuple(norm_weight.shape)}")
    dtype = _work_dtype(norm_weight, scales)
    folded = (weight_offset + norm_weight.detach().to(dtype)) / scales.to(dtype) - weight_offset
    return folded.to(norm_weight.dtype)


def fold_into_linear_rows(weight: torch.Tensor, bias: torch.Tensor | None,
                          scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Divide a producer's output channels by s: weight rows (dim 0) and bias entries.

    `weight` is [out, ...] with out == len(s): a linear whose outputs feed the consumers, e.g.
    v_proj → o_proj, or up_proj → mul(silu(gate), up) → down_proj (the mul is linear in up).
    """
    if weight.dim() < 1:
        raise SmoothQuantError("producer weight must have at least one dimension")
    check_scales(scales, weight.shape[0], f"producer weight {tuple(weight.shape)} (its rows)")
    dtype = _work_dtype(weight, scales)
    s = scales.to(dtype).reshape(-1, *([1] * (weight.dim() - 1)))
    new_w = (weight.detach().to(dtype) / s).to(weight.dtype)
    if bias is None:
        return new_w, None
    if bias.shape != (weight.shape[0],):
        raise SmoothQuantError(f"producer bias has shape {tuple(bias.shape)}; expected "
                               f"[{weight.shape[0]}] for weight {tuple(weight.shape)}")
    b_dtype = _work_dtype(bias, scales)
    return new_w, (bias.detach().to(b_dtype) / scales.to(b_dtype)).to(bias.dtype)


def scale_consumer_columns(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W · s: column j of a consumer [out, in] weight multiplied by s_j."""
    if weight.dim() != 2:
        raise SmoothQuantError(f"consumer weight has shape {tuple(weight.shape)}; expected [out, in]")
    check_scales(scales, weight.shape[1], f"consumer weight {tuple(weight.shape)} (its columns)")
    dtype = _work_dtype(weight, scales)
    return (weight.detach().to(dtype) * scales.to(dtype)).to(weight.dtype)


def apply_smoothing(norm_weight: torch.Tensor | None, prev_weight: torch.Tensor | None,
                    weights: list[torch.Tensor], scales: torch.Tensor, *,
                    prev_bias: torch.Tensor | None = None, weight_offset: float = 0.0):
    """The float-equivalent rewrite of one smoothing group; inputs are not mutated.

    Exactly one producer: `norm_weight` (returns its folded weight, a Tensor) or `prev_weight`
    with optional `prev_bias` (returns the pair from `fold_into_linear_rows`). Returns
    (new_producer, [W_i · s for each consumer]).
    """
    if (norm_weight is None) == (prev_weight is None):
        raise SmoothQuantError("apply_smoothing needs exactly one producer: norm_weight or prev_weight")
    if norm_weight is not None and prev_bias is not None:
        raise SmoothQuantError("prev_bias given with a norm producer; a LayerNorm bias folds as "
                               "prev_weight=norm.weight, prev_bias=norm.bias")
    if prev_weight is not None and weight_offset:
        raise SmoothQuantError(f"weight_offset={weight_offset} applies to norm producers only")
    if scales.dim() != 1:
        raise SmoothQuantError(f"scales have shape {tuple(scales.shape)}; expected [in]")
    weights = check_consumers(weights, scales.shape[0])
    if norm_weight is not None:
        producer = fold_into_norm(norm_weight, scales, weight_offset)
    else:
        producer = fold_into_linear_rows(prev_weight, prev_bias, scales)
    return producer, [scale_consumer_columns(w, scales) for w in weights]


# ----------------------------------------------------------------------------- alpha search
def quantized_output_error(x: torch.Tensor, weights: list[torch.Tensor], scales: torch.Tensor,
                           act_spec: QuantSpec, weight_spec: QuantSpec) -> float:
    """Σ_i ||x W_iᵀ - Q(x / s) Q(W_i · s)ᵀ||², float32 matmuls, float64 sum."""
    x = x.float()
    xq = fake_quantize(x / scales, act_spec)
    total = 0.0
    for w in weights:
        w = w.float()
        wq = fake_quantize(w * scales, weight_spec)
        diff = x @ w.T - xq @ wq.T
        total += float(diff.double().pow(2).sum())
    return total


def search_alpha(x: torch.Tensor, weights: list[torch.Tensor], act_spec: QuantSpec,
                 weight_spec: QuantSpec, grid=DEFAULT_ALPHA_GRID,
                 act_absmax: torch.Tensor | None = None) -> tuple[float, dict[float, float]]:
    """Grid-search α on a sample of inputs x [n, in] by W8A8-style fake-quantized output error.

    act_absmax defaults to x's own per-channel max |x| (pass the full calibration statistic
    when x is a subsample). Returns (best α, {α: loss}); ties keep the earlier grid point.
    """
    grid = tuple(float(a) for a in grid)
    if not grid:
        raise SmoothQuantError("search_alpha: empty alpha grid")
    if x.dim() < 2:
        raise SmoothQuantError(f"search_alpha: x has shape {tuple(x.shape)}; expected [n, in]")
    x = x.detach().reshape(-1, x.shape[-1])
    check_finite_stat(x, "search_alpha input x")
    if act_absmax is None:
        act_absmax = x.abs().amax(dim=0)
    elif act_absmax.shape != (x.shape[1],):
        raise SmoothQuantError(f"act_absmax has shape {tuple(act_absmax.shape)}; x has "
                               f"{x.shape[1]} channels")
    weights = check_consumers(weights, x.shape[1])
    losses: dict[float, float] = {}
    for alpha in grid:
        s = smoothing_scales(act_absmax, weights, alpha)
        losses[alpha] = quantized_output_error(x, weights, s, act_spec, weight_spec)
    best = min(grid, key=losses.__getitem__)  # first minimum wins ties
    if not math.isfinite(losses[best]):
        raise SmoothQuantError(f"search_alpha: every grid point gave a non-finite loss {losses}")
    return best, losses
