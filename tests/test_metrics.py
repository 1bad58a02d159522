"""Paired accuracy metrics (evaluation/metrics.py) against float64 hand computations."""
import math

import pytest
import torch

from sagequant.evaluation.metrics import (MetricsError, PairedAccumulator, clustered_mean_se,
                                           paired_summary, position_metrics)


def _hand_position(pf, pq, y):
    """One position from plain Python floats: softmax, KL, NLL, argmax."""
    zf, zq = sum(math.exp(v) for v in pf), sum(math.exp(v) for v in pq)
    p = [math.exp(v) / zf for v in pf]
    q = [math.exp(v) / zq for v in pq]
    kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))
    flip = float(max(range(len(p)), key=p.__getitem__) != max(range(len(q)), key=q.__getitem__))
    return -math.log(p[y]), -math.log(q[y]), kl, flip


def test_position_metrics_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 5, generator=g)
    q = f + 0.7 * torch.randn(7, 5, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    per = position_metrics(f, q, y)
    for t in range(7):
        want = _hand_position(f[t].tolist(), q[t].tolist(), int(y[t]))
        got = [float(per[k][t]) for k in ("nll_float", "nll_quant", "kl", "flip")]
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert per["flip"].sum() > 0  # the perturbation is large enough to flip some argmaxes


def test_identical_logits_give_zero_divergence():
    f = torch.randn(4, 9)
    per = position_metrics(f, f.clone(), torch.zeros(4, dtype=torch.long))
    assert float(per["kl"].abs().max()) < 1e-12 and float(per["flip"].sum()) == 0


def test_clustered_se_hand_formula():
    x = torch.tensor([1.0, 2.0, 4.0, 8.0, 3.0, 5.0], dtype=torch.float64)
    cl = torch.tensor([0, 0, 1, 1, 2, 2])
    m = sum(x.tolist()) / 6
    sums = [(1 - m) + (2 - m), (4 - m) + (8 - m), (3 - m) + (5 - m)]
    want = math.sqrt(3 / 2 * sum(s * s for s in sums)) / 6
    assert clustered_mean_se(x, cl) == pytest.approx((m, want), rel=1e-12)
    # every position its own cluster: the textbook standard error of the mean
    iid = math.sqrt(sum((v - m) ** 2 for v in x.tolist()) / (6 * 5))
    assert clustered_mean_se(x)[1] == pytest.approx(iid, rel=1e-12)
    # one window: its positions are treated as independent rather than giving no error at all
    assert clustered_mean_se(x, torch.zeros(6, dtype=torch.long))[1] == pytest.approx(iid, rel=1e-12)


def test_paired_summary_ppl_delta_and_delta_method_se():
    nf = torch.tensor([2.0, 3.0, 1.0, 4.0], dtype=torch.float64)
    nq = nf + torch.tensor([0.1, 0.3, 0.2, 0.0], dtype=torch.float64)
    per = {"nll_float": nf, "nll_quant": nq, "kl": torch.ones(4) * 0.5, "flip": torch.tensor([0., 1., 0., 0.])}
    s = paired_summary(per)
    d = [0.1, 0.3, 0.2, 0.0]
    md = sum(d) / 4
    se_d = math.sqrt(sum((v - md) ** 2 for v in d) / 12)
    assert s["ppl_float"] == pytest.approx(math.exp(2.5))
    assert s["ppl_delta_pct"] == pytest.approx(100 * (math.exp(md) - 1))
    assert s["ppl_delta_pct_se"] == pytest.approx(100 * math.exp(md) * se_d)
    assert (s["kl"], s["kl_se"], s["flip_rate"]) == pytest.approx((0.5, 0.0, 0.25))


def test_accumulator_clusters_are_windows():
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, 4, 6, generator=g)
    q = f + 0.3 * torch.randn(3, 4, 6, generator=g)
    y = torch.randint(0, 6, (3, 4), generator=g)
    acc = PairedAccumulator()
    acc.add(f[:2], q[:2], y[:2])
    acc.add(f[2:], q[2:], y[2:])
    s = acc.summary()
    per = position_metrics(f.reshape(12, 6), q.reshape(12, 6), y.reshape(12))
    assert s == pytest.approx(paired_summary(per, torch.arange(3).repeat_interleave(4)))
    assert s["clusters"] == 3 and s["positions"] == 12


def test_errors_name_the_problem():
    with pytest.raises(MetricsError, match="must both be"):
        position_metrics(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(MetricsError, match="NaN"):
        position_metrics(torch.full((1, 3), float("nan")), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
