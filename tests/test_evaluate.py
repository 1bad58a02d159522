import math

import pytest
import torch

from sagequant.evaluation.perplexity import (PerplexityResult, delta_pct, perplexity,
                                      tokenize_eval_text)

V = 11


@pytest.fixture
def bigram():
    """A bigram model: logits of every position depend only on its own token."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(V, V, generator=g) * 3
    ids = torch.randint(0, V, (203,), generator=g)
    return table, ids


def reference_nll(table, ids, scored):
    """Sum of -log p(ids[t] | ids[t-1]) over the target positions `scored`, in float64."""
    logp = torch.log_softmax(table.double(), dim=-1)
    return -sum(float(logp[ids[t - 1], ids[t]]) for t in scored)


def test_stride_equals_window_matches_reference(bigram):
    table, ids = bigram
    res = perplexity(lambda x: table[x], ids, window=50, stride=50)
    # Windows [0,50) [50,100) [100,150) [150,200) [200,203): the first token of each is
    # context only.
    scored = [t for t in range(203) if t % 50 != 0]
    nll = reference_nll(table, ids, scored)
    assert res.n_windows == 5 and res.n_tokens_scored == len(scored) == 198
    assert res.nll_sum == pytest.approx(nll, rel=1e-12)
    assert res.ppl == pytest.approx(math.exp(nll / len(scored)), rel=1e-12)
    assert (res.window, res.stride, res.max_tokens) == (50, 50, 203)


def test_stride_below_window_scores_every_target_once(bigram):
    table, ids = bigram
    res = perplexity(lambda x: table[x], ids, window=64, stride=16)
    # The bigram model's prediction does not depend on context, so with overlapping
    # windows every token after the first is scored exactly once.
    nll = reference_nll(table, ids, range(1, 203))
    assert res.n_tokens_scored == 202
    # windows begin at 0,16,..,144; the one at 144 reaches the end (144 + 64 > 203)
    assert res.n_windows == 10
    assert res.nll_sum == pytest.approx(nll, rel=1e-12)


def test_stride_below_window_uses_context():
    # A model whose prediction for position j is correct only when it sees >= 4 tokens of
    # context: tokens scored with context are certain, those without are uniform.
    ids = torch.arange(40) % V

    def model_fn(x):
        logits = torch.zeros(*x.shape, V)
        nxt = (x[:, 4:] + 1) % V
        logits[:, 4:].scatter_(-1, nxt[..., None], 1e4)
        return logits

    # stride 8 < window 16: after the first window every target has >= 8 tokens of context.
    res = perplexity(model_fn, ids, window=16, stride=8)
    # only targets 1..4 of the first window lack context: nll = 4 * log(V)
    assert res.nll_sum == pytest.approx(4 * math.log(V), rel=1e-9)
    assert res.n_tokens_scored == 39
    # non-overlapping windows lose context at each window start: 3 windows x 4 targets
    assert perplexity(model_fn, ids, window=16, stride=16).nll_sum == pytest.approx(
        (4 + 4 + 4) * math.log(V), rel=1e-9)


def test_batching_and_max_tokens_do_not_change_result(bigram):
    table, ids = bigram
    base = perplexity(lambda x: table[x], ids, window=40, stride=30, max_tokens=150)
    batched = perplexity(lambda x: table[x], ids, window=40, stride=30, max_tokens=150,
                         batch_size=3)
    assert base.max_tokens == 150 and base.n_tokens_scored == 149
    assert batched.nll_sum == pytest.approx(base.nll_sum, rel=1e-12)
    assert batched.n_windows == base.n_windows


def test_uniform_logits_give_vocab_size():
    ids = torch.randint(0, 7, (100,), generator=torch.Generator().manual_seed(1))
    res = perplexity(lambda x: torch.zeros(*x.shape, 7), ids, window=32, stride=32)
    assert res.ppl == pytest.approx(7.0, rel=1e-12)


def test_last_window_with_single_token_is_skipped():
    ids = torch.arange(21) % V
    res = perplexity(lambda x: torch.zeros(*x.shape, V), ids, window=10, stride=10)
    assert res.n_windows == 2 and res.n_tokens_scored == 18


def test_result_to_dict(bigram):
    table, ids = bigram
    d = perplexity(lambda x: table[x], ids, window=50, stride=50).to_dict()
    assert set(d) == {"ppl", "nll_sum", "n_tokens_scored", "n_windows", "window", "stride",
                      "max_tokens", "seconds"}
    assert isinstance(perplexity(lambda x: table[x], ids[:5], window=4, stride=2),
                      PerplexityResult)


def test_nan_logits_name_the_window(bigram):
    table, ids = bigram
    calls = []

    def model_fn(x):
        calls.append(1)
        logits = table[x].clone()
        if len(calls) == 3:
            logits[0, 3, 2] = float("nan")
        return logits

    with pytest.raises(ValueError, match="NaN/Inf in window 2"):
        perplexity(model_fn, ids, window=50, stride=50)


def test_inf_logits_raise():
    with pytest.raises(ValueError, match="NaN/Inf in window 0"):
        perplexity(lambda x: torch.full((*x.shape, V), float("inf")), torch.arange(5),
                   window=4, stride=4)


@pytest.mark.parametrize("model_fn,match", [
    (lambda x: torch.zeros(x.shape[0], x.shape[1] - 1, V), "logits shape"),
    (lambda x: torch.zeros(*x.shape), "logits shape"),
    (lambda x: torch.zeros(*x.shape, 3), "vocab size 3"),
    (lambda x: {"logits": torch.zeros(*x.shape, V)}, "must return a logits tensor"),
])
def test_bad_logits(model_fn, match):
    with pytest.raises((ValueError, TypeError), match=match):
        perplexity(model_fn, torch.arange(10), window=5, stride=5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(token_ids=torch.tensor([3])), "at least 2 tokens"),
    (dict(token_ids=torch.arange(10), max_tokens=1), "max_tokens=1"),
    (dict(token_ids=torch.arange(10), window=1), "window=1"),
    (dict(token_ids=torch.arange(10), window=4, stride=0), "stride=0"),
    (dict(token_ids=torch.arange(10), window=4, stride=5), "stride=5"),
    (dict(token_ids=torch.arange(10), batch_size=0), "batch_size=0"),
    (dict(token_ids=torch.arange(10).view(2, 5)), "1-D"),
    (dict(token_ids=torch.rand(10)), "integer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(lambda x: torch.zeros(*x.shape, V), **kwargs)


def test_tokenize_eval_text():
    class Tok:
        def encode(self, text, add_special_tokens=True):
            return [len(w) for w in text.split()] + ([99] if add_special_tokens else [])

    ids = tokenize_eval_text(Tok(), "a bb ccc dddd", max_tokens=3)
    assert ids.dtype == torch.long and ids.tolist() == [1, 2, 3]
    assert tokenize_eval_text(Tok(), "a bb", max_tokens=None).tolist() == [1, 2]


def test_delta_pct():
    assert delta_pct(30.0, 33.0) == pytest.approx(10.0)
    assert delta_pct(48.59, 48.59) == 0.0


def test_compare_to_float_pairs_the_perplexity_targets(bigram):
    from sagequant.evaluation.perplexity import compare_to_float
    table, ids = bigram
    noisy = table + 0.5 * torch.randn(V, V, generator=torch.Generator().manual_seed(3))
    res = compare_to_float(lambda x: table[x], lambda x: noisy[x], ids, window=50, stride=25, batch_size=2)
    ref = {k: perplexity(lambda x, t=t: t[x], ids, window=50, stride=25) for k, t in (("f", table), ("q", noisy))}
    assert res["ppl_float"] == pytest.approx(ref["f"].ppl, rel=1e-12)
    assert res["ppl_quant"] == pytest.approx(ref["q"].ppl, rel=1e-12)
    assert res["positions"] == ref["f"].n_tokens_scored and res["clusters"] == ref["f"].n_windows
    # Bigram: the KL of a target position is the KL of the rows of its previous token.
    lp, lq = torch.log_softmax(table.double(), -1), torch.log_softmax(noisy.double(), -1)
    row_kl = (lp.exp() * (lp - lq)).sum(-1)
    row_flip = (lp.argmax(-1) != lq.argmax(-1)).double()
    scored = [t for t in range(1, 203)]  # stride < window: every token after the first, once
    assert res["kl"] == pytest.approx(float(row_kl[ids[[t - 1 for t in scored]]].mean()), rel=1e-12)
    assert res["flip_rate"] == pytest.approx(float(row_flip[ids[[t - 1 for t in scored]]].mean()), abs=1e-12)
    assert res["kl_se"] > 0 and res["ppl_delta_pct_se"] > 0
