"""Paired accuracy metrics between a float and a quantized model on the same tokens.

Per scored position t (float log-probs p, quantized q over the vocabulary, target y):
  nll_float[t] = -log p(y)     nll_quant[t] = -log q(y)
  kl[t]        = Σ_v p(v) (log p(v) - log q(v))          KL(float ‖ quant), nats
  flip[t]      = 1 if argmax p != argmax q else 0          top-1 flip
Summaries are means over positions with a paired standard error: both models see the same tokens,
so the error of a difference comes from the per-position differences, which cancel most of the
text's own variance. Positions of one window are correlated, so the standard error is the
cluster-robust one over windows (clusters):
  se(mean x) = sqrt(G/(G-1) · Σ_g (Σ_{t∈g} (x_t - mean x))²) / N
(with every position its own cluster this is the ordinary sqrt(Σ(x-m)²/(N(N-1))); a single
window falls back to that, treating its positions as independent).
Perplexity change: ratio r = exp(mean(nll_quant - nll_float)), Δ% = 100 (r - 1), se by the delta
method 100 · r · se(mean(nll_quant - nll_float)).
"""
from __future__ import annotations

import math

import torch

from ..errors import SageQuantError


class MetricsError(SageQuantError, ValueError):
    """The two models' outputs cannot be compared: mismatched shapes, NaN/Inf, nothing to average."""


def position_metrics(float_logits: torch.Tensor, quant_logits: torch.Tensor,
                     targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position nll_float, nll_quant, kl, flip (float64, shape [N]) for logits [N, V], targets [N]."""
    if float_logits.shape != quant_logits.shape or float_logits.dim() != 2:
        raise MetricsError(f"float logits {tuple(float_logits.shape)} and quantized logits "
                           f"{tuple(quant_logits.shape)} must both be [positions, vocab]")
    if targets.shape != float_logits.shape[:1]:
        raise MetricsError(f"targets shape {tuple(targets.shape)} must be [{float_logits.shape[0]}]")
    lp = torch.log_softmax(float_logits.double(), -1)
    lq = torch.log_softmax(quant_logits.to(lp.device).double(), -1)
    if not (torch.isfinite(lp).all() and torch.isfinite(lq).all()):
        raise MetricsError("logits contain NaN/Inf; the metrics need finite logits")
    y = targets.to(lp.device, torch.long)[:, None]
    return {"nll_float": -lp.gather(-1, y)[:, 0], "nll_quant": -lq.gather(-1, y)[:, 0],
            "kl": (lp.exp() * (lp - lq)).sum(-1),
            "flip": (lp.argmax(-1) != lq.argmax(-1)).double()}


def clustered_mean_se(x: torch.Tensor, clusters: torch.Tensor | None = None) -> tuple[float, float]:
    """(mean, cluster-robust standard error of the mean) of x [N]; clusters [N] integer ids."""
    x = x.double().flatten()
    n = x.numel()
    if n == 0:
        raise MetricsError("no positions to average")
    m = float(x.mean())
    dev = x - m
    sums = dev
    if clusters is not None:
        ids = torch.unique(clusters.flatten(), return_inverse=True)[1]
        if int(ids.max()) > 0:  # at least two clusters
            sums = torch.zeros(int(ids.max()) + 1, dtype=torch.float64).index_add_(0, ids, dev)
    g = sums.numel()
    if g < 2:
        return m, float("nan")
    return m, math.sqrt(g / (g - 1) * float((sums ** 2).sum())) / n


def paired_summary(per_position: dict[str, torch.Tensor], clusters: torch.Tensor | None = None) -> dict:
    """Perplexities, mean NLL difference (nats), Δ% ppl, mean KL and flip rate, each with its paired
    standard error."""
    nf, nq = per_position["nll_float"], per_position["nll_quant"]
    d, d_se = clustered_mean_se(nq - nf, clusters)
    kl, kl_se = clustered_mean_se(per_position["kl"], clusters)
    flip, flip_se = clustered_mean_se(per_position["flip"], clusters)
    r = math.exp(d)
    n_clusters = nf.numel() if clusters is None else torch.unique(clusters).numel()
    return {"positions": int(nf.numel()), "clusters": int(nf.numel() if n_clusters < 2 else n_clusters),
            "ppl_float": math.exp(float(nf.double().mean())), "ppl_quant": math.exp(float(nq.double().mean())),
            "nll_delta": d, "nll_delta_se": d_se,
            "ppl_delta_pct": 100 * (r - 1), "ppl_delta_pct_se": 100 * r * d_se,
            "kl": kl, "kl_se": kl_se, "flip_rate": flip, "flip_rate_se": flip_se}


class PairedAccumulator:
    """Collects position_metrics batch by batch; each add() call's rows are clusters of their own."""

    def __init__(self):
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._clusters: list[torch.Tensor] = []
        self._next_cluster = 0

    def add(self, float_logits: torch.Tensor, quant_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Logits [b, L, V] and targets [b, L]: row i of the batch is one cluster (window)."""
        b, length = targets.shape
        per = position_metrics(float_logits.reshape(b * length, -1), quant_logits.reshape(b * length, -1),
                               targets.reshape(-1))
        for k, v in per.items():
            self._parts.setdefault(k, []).append(v.cpu())
        self._clusters.append(torch.arange(self._next_cluster, self._next_cluster + b).repeat_interleave(length))
        self._next_cluster += b

    def per_position(self) -> dict[str, torch.Tensor]:
        if not self._parts:
            raise MetricsError("no positions were added")
        return {k: torch.cat(v) for k, v in self._parts.items()}

    @property
    def clusters(self) -> torch.Tensor:
        return torch.cat(self._clusters)

    def summary(self) -> dict:
        return paired_summary(self.per_position(), self.clusters)
