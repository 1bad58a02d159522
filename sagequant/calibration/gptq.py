"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): the tensor math only, no graph plumbing.

For a linear layer y = x Wᵀ with calibration inputs X, GPTQ quantizes W column by column and
spreads each column's rounding error over the columns not yet quantized so that the layer output
error ‖X Wᵀ - X Qᵀ‖² = tr((W-Q) H (W-Q)ᵀ) · n/2 stays small, where H = (2/n) Σ x xᵀ.

With U the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U), quantizing column i to q gives
  err = (w_i - q) / U[i, i]        W[:, j] -= err · U[i, j]   for j > i
(lazily: within a block of `block_size` columns, and once per block for the columns after it).

Scales come from `ir.quant_spec` so the rounding, scale-dtype rounding and saturation are exactly
the format's; the result is a QuantizedTensor in the normal layout (contiguous groups along the
input dimension, ragged last group allowed), re-quantized from the GPTQ values and checked to
reproduce its codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ir.quant_spec import (
    SCALE_DTYPES, QuantizedTensor, QuantSpec, block_lengths, dequantize, fake_quantize_block, quantize,
    weight_qparams)

from ..errors import CompileError

# Cholesky retries: damping x10 each time, after the first try.
DAMP_RETRIES = 3


class GPTQError(CompileError, ValueError):
    """GPTQ cannot run as asked: bad inputs, NaN/Inf activations, or a Hessian it cannot invert."""


class HessianAccumulator:
    """Running H = (2/n) Σ c_t x_t x_tᵀ over all activation rows seen so far, kept in float64.

    Each batch rescales the old average instead of summing raw outer products, so the values stay
    O(x²) however many rows arrive: H *= n_old/n_new; H += (2/n_new) XᵀCX.

    row_energy_cap: a row whose energy ‖x_t‖² exceeds cap × the batch's median row energy gets
    the weight c_t = cap · median / ‖x_t‖² (else c_t = 1), so it counts as a row of exactly that
    energy. Attention-sink tokens carry activations 100× the others (SmolLM2: 99.8% of Σx² of
    some down_proj inputs in the first position); unweighted, GPTQ spends the other rows'
    accuracy to make those few rows exact (BENCHMARKS §2d). None: every row weighs 1.

    sink_weight: each sequence's first position (dim -2 of a [..., seq, features] batch) gets
    c_t = sink_weight, every other row 1 (n still counts rows). In the Hessians of the linears
    that read the attention input (q/k/v) that position is the attention sink every later token
    attends to; unweighted it is 1 row in seq_len and GPTQ trades its key/value away (3.4-4.1x
    RTN's error there on SmolLM2, BENCHMARKS §2d). 1: plain GPTQ.
    """

    def __init__(self, in_features: int, what: str = "activation",
                 row_energy_cap: float | None = None, sink_weight: float = 1.0):
        if in_features < 1:
            raise GPTQError(f"HessianAccumulator.in_features={in_features} must be >= 1")
        if row_energy_cap is not None and not row_energy_cap >= 1:
            raise GPTQError(f"HessianAccumulator.row_energy_cap={row_energy_cap} must be >= 1 "
                            "(a multiple of the median row energy) or None")
        if not (math.isfinite(sink_weight) and sink_weight >= 1):
            raise GPTQError(f"HessianAccumulator.sink_weight={sink_weight} must be a finite number >= 1")
        self.in_features = in_features
        self.row_energy_cap = row_energy_cap
        self.sink_weight = float(sink_weight)
        self.what = what  # names the tensor in errors, e.g. "input of model.layers.0.mlp.up_proj"
        self.n = 0
        self._h: torch.Tensor | None = None

    def add(self, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> None:
        """Add one batch of activations [..., in_features] (all leading dims are rows); row_weights
        [...] (x's leading dims, finite, >= 0) multiply each row's c_t, e.g. the attention mass a
        key position receives (attention_mass)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise GPTQError(f"{self.what}: activation shape {tuple(x.shape)} has last dim "
                            f"{x.shape[-1] if x.dim() else None}, expected {self.in_features}")
        if row_weights is not None and (tuple(row_weights.shape) != tuple(x.shape[:-1]) or not bool(
                (torch.isfinite(row_weights) & (row_weights >= 0)).all())):
            raise GPTQError(f"{self.what}: row weights of shape {tuple(row_weights.shape)} must match the "
                            f"activation rows {tuple(x.shape[:-1])} and be finite and >= 0")
        if self.sink_weight != 1 and x.dim() < 3:
            raise GPTQError(f"{self.what}: sink_weight={self.sink_weight} needs activations shaped "
                            f"[batch, seq, features] to find each sequence's first position, got "
                            f"{tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(torch.float64)
        if not bool(torch.isfinite(rows).all()):
            n_nan, n_inf = int(torch.isnan(rows).sum()), int(torch.isinf(rows).sum())
            raise GPTQError(f"{self.what}: calibration batch {self.n} rows in contains {n_nan} NaN "
                            f"and {n_inf} Inf values; check the calibration data and float model")
        k = rows.shape[0]
        if k == 0:
            return
        if self._h is None:
            self._h = torch.zeros(self.in_features, self.in_features, dtype=torch.float64,
                                  device=rows.device)
        if self.row_energy_cap is not None:
            energy = (rows * rows).sum(-1)
            limit = self.row_energy_cap * energy.median()
            if limit > 0:
                rows = rows * torch.where(energy > limit, limit / energy, 1.0).sqrt().unsqueeze(1)
        if self.sink_weight != 1:
            root = torch.ones(x.shape[:-1], dtype=torch.float64, device=rows.device)
            root[..., 0] = math.sqrt(self.sink_weight)
            rows = rows * root.reshape(-1, 1)
        if row_weights is not None:
            rows = rows * row_weights.detach().reshape(-1, 1).to(device=rows.device, dtype=torch.float64).sqrt()
        n_new = self.n + k
        self._h *= self.n / n_new
        self._h += (2.0 / n_new) * (rows.T @ rows.to(self._h.device))
        self.n = n_new

    @property
    def hessian(self) -> torch.Tensor:
        """H [in, in] float64 (a copy)."""
        if self._h is None:
            raise GPTQError(f"{self.what}: Hessian requested before any activation rows were added")
        return self._h.clone()


def attention_mass(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The attention mass each key position receives, as scaled_dot_product_attention weighs it:
    P = softmax(q kᵀ · scale + mask) [batch, heads, queries, keys], summed over queries and
    averaged over heads -> [batch, keys]. Its mean over keys is queries / keys (1 for
    self-attention); an attention sink gets a large share. Key heads fewer than query heads
    (grouped-query attention) are repeated as enable_gqa does; float64 throughout."""
    q, k = query.to(torch.float64), key.to(torch.float64)
    if q.shape[-3] != k.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if is_causal:
        allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
        logits = logits.masked_fill(~allowed, float("-inf"))
    if attn_mask is not None:
        logits = (logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                  else logits + attn_mask.to(torch.float64))
    return torch.softmax(logits, dim=-1).sum(-2).mean(-2)


@dataclass
class GPTQResult:
    qtensor: QuantizedTensor
    dequantized: torch.Tensor  # [out, in] in the weight's dtype; == dequantize(qtensor, dtype)
    loss: float                # Σ_columns ½ Σ_rows err² / Hinv_chol[i,i]², the paper's objective
    damping: float             # damp fraction actually used (after escalation), × mean(diag H)
    act_order: bool


def reconstruction_error(weight: torch.Tensor, dequantized: torch.Tensor,
                         hessian: torch.Tensor) -> float:
    """tr((W-Q) H (W-Q)ᵀ): with H from HessianAccumulator, 2/n × the squared layer output error."""
    d = (weight.to(torch.float64) - dequantized.to(torch.float64))
    return float(((d @ hessian.to(torch.float64)) * d).sum())


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = False,
                  static_groups: bool = False, clip_ratio: float = 1.0, min_samples: int | None = None,
                  n_samples: int | None = None, observer: str = "minmax",
                  what: str = "weight") -> GPTQResult:
    """Quantize weight [out, in] with the GPTQ error compensation driven by hessian [in, in].

    per_group without act_order: a group's scale is taken from its current (error-updated)
    columns when its first column is reached, unless static_groups fixes every group's scale up
    front from the weight (AutoGPTQ's static_groups; llm-compressor's only way). With act_order,
    columns go in order of decreasing diag(H) and group scales are always static, so groups stay
    contiguous in the original column order. per_channel / per_tensor: scales up front. Input
    columns that never see activation (H[i,i] == 0) are zeroed and excluded from the scales.
    `observer` picks how scales come from columns: 'minmax' or 'mse' (ir.quant_spec.weight_qparams).
    """
    _check_inputs(weight, hessian, spec, block_size, damp, clip_ratio, min_samples, n_samples, what)
    n_cols = weight.shape[1]
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    lazy_groups = spec.granularity == "per_group" and not (act_order or static_groups)
    if lazy_groups:
        n_groups = len(block_lengths(n_cols, spec))
        S = torch.empty(W.shape[0], n_groups, dtype=SCALE_DTYPES[spec.scale_dtype], device=W.device)
        Z = None if spec.symmetric else torch.empty(W.shape[0], n_groups, dtype=torch.int32,
                                                    device=W.device)
    else:
        S, Z = weight_qparams(W, spec, clip_ratio, observer, what)

    perm = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order
            else torch.arange(n_cols))
    if act_order:   # (the identity permutation would copy W and H twice for nothing)
        W, H = W[:, perm.to(W.device)], H[perm][:, perm]
    Hinv, damp_used = _inverse_cholesky(H, damp, what)
    del H
    Hinv = Hinv.to(device=W.device, dtype=torch.float32)
    orig = perm.tolist()

    Q = torch.zeros_like(W)
    losses = torch.zeros(W.shape[0], dtype=torch.float32, device=W.device)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = orig[i1 + i]
            if lazy_groups and col % spec.group_size == 0:
                # Without act_order col == i1 + i: the group is this column and the next ones.
                g_end = min(col + spec.group_size, n_cols)
                cur = W1[:, i:g_end - i1]
                if g_end > i2:  # the group runs past this block: apply the block's errors so far
                    rest = W[:, i2:g_end] - Err1[:, :i] @ Hinv[i1:i1 + i, i2:g_end]
                    cur = torch.cat([cur, rest], dim=1)
                s, z = weight_qparams(cur, spec, clip_ratio, observer, what)
                S[:, col // spec.group_size] = s[:, 0]
                if Z is not None:
                    Z[:, col // spec.group_size] = z[:, 0]
            s_col, z_col = _column_params(S, Z, spec, col)
            w = W1[:, i]
            q = fake_quantize_block(w.unsqueeze(1), spec, s_col, z_col)[:, 0]
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        losses += (Err1 ** 2).sum(dim=1) / 2
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    Q = Q[:, torch.argsort(perm).to(Q.device)]
    qtensor = quantize(Q, spec, S, Z, what=what)
    if not torch.equal(dequantize(qtensor), Q):
        raise GPTQError(f"{what}: internal error: re-quantizing the GPTQ values with their own "
                        f"scales did not reproduce the codes ({spec.describe()})")
    return GPTQResult(qtensor=qtensor, dequantized=dequantize(qtensor, weight.dtype),
                      loss=float(losses.sum()), damping=damp_used, act_order=act_order)


def _check_inputs(weight, hessian, spec, block_size, damp, clip_ratio, min_samples, n_samples, what):
    if min_samples is not None and n_samples is not None and n_samples < min_samples:
        raise GPTQError(f"{what}: calibration set too small for a stable Hessian: {n_samples} rows, "
                        f"need ≥ {min_samples}; pass more calibration samples")
    if weight.dim() != 2:
        raise GPTQError(f"{what}: GPTQ needs a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    n = weight.shape[1]
    if tuple(hessian.shape) != (n, n):
        raise GPTQError(f"{what}: hessian shape {tuple(hessian.shape)} does not match weight "
                        f"{tuple(weight.shape)}; expected {(n, n)}")
    if spec.granularity == "per_token" or spec.dynamic:
        raise GPTQError(f"{what}: spec {spec.describe()} (granularity={spec.granularity}, "
                        f"dynamic={spec.dynamic}) is an activation spec; GPTQ quantizes weights")
    if block_size < 1:
        raise GPTQError(f"{what}: block_size={block_size} must be >= 1")
    if not damp > 0:
        raise GPTQError(f"{what}: damp={damp} must be > 0, e.g. 0.01")
    if not 0 < clip_ratio <= 1:
        raise GPTQError(f"{what}: clip_ratio={clip_ratio} must be in (0, 1]")
    for name, t in (("weight", weight), ("hessian", hessian)):
        if not bool(torch.isfinite(t).all()):
            raise GPTQError(f"{what}: {name} contains {int(torch.isnan(t).sum())} NaN and "
                            f"{int(torch.isinf(t).sum())} Inf values; GPTQ cannot use it")


def _inverse_cholesky(H: torch.Tensor, damp: float, what: str) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H), damp x10 on failure."""
    mean_diag = float(torch.diagonal(H).mean())
    tried = []
    for attempt in range(DAMP_RETRIES + 1):
        d = damp * 10 ** attempt
        tried.append(d)
        damped = H.clone()   # H + λI without an identity matrix and a product (each [in, in])
        damped.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            L = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(L, upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U, d
    raise GPTQError(f"{what}: Hessian is not positive definite even with damping "
                    f"{', '.join(f'{d:g}' for d in tried)} × mean(diag H) ({mean_diag:.4g}); "
                    "collect more calibration samples (more rows than input features)")


def _column_params(S, Z, spec: QuantSpec, col: int):
    """Scale / zero point that apply to original input column `col`, shaped for a [out, 1] slice."""
    if spec.granularity == "per_group":
        g = col // spec.group_size
        return S[:, g:g + 1], (None if Z is None else Z[:, g:g + 1])
    return S, Z
