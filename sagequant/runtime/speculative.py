"""draft_mode: one QuantConfig gives a verify model (its own scheme) and a lighter draft model
(W4A16 group-128 round-to-nearest weights, int8 KV cache); SpeculativeDecoder runs greedy
speculative decoding with them: the draft proposes k tokens one at a time, the verify model
scores all of them in one forward over k + 1 tokens, and the longest prefix on which the
verify model's own argmax agrees is kept, plus the verify model's next token. The output is
therefore the verify model's greedy output, token for token; rejected tokens are cut from both
KV caches.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..config import ConfigError, QuantConfig
from .engine import GenerationEngine, _token_list

DRAFT_SCHEME = "W4A16"
_LIGHT_SCHEMES = ("W4A16", "NF4-A16")


def draft_and_verify_configs(cfg: QuantConfig) -> tuple[QuantConfig, QuantConfig]:
    """(draft, verify) configs of a draft_mode config."""
    verify = cfg.replace(draft_mode=False)
    if verify.scheme in _LIGHT_SCHEMES:
        raise ConfigError(f"draft_mode=True with scheme {verify.scheme}: the draft path is "
                          f"{DRAFT_SCHEME} + int8 KV, no lighter than the verify path; use a "
                          "verify scheme of W8A16, FP8-W8A16, W8A8-INT8 or W8A8-FP8")
    changes = dict(draft_mode=False, weight_dtype="int4", activation_dtype="a16", group_size=128,
                   calibration="minmax", kv_cache_dtype="int8", overrides={})
    if "guard" in cfg.to_dict():
        # A draft's accuracy only changes how many tokens are accepted, never the output.
        changes["guard"] = "report"
    return cfg.replace(**changes), verify


@dataclass
class SpeculativeStats:
    new_tokens: int
    proposed: int            # draft tokens offered to the verify model
    accepted: int            # of them, kept
    verify_forwards: int
    draft_forwards: int
    seconds: float

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(1, self.proposed)


class SpeculativeDecoder:
    def __init__(self, verify, draft=None, k: int = 4, max_seq_len: int | None = None):
        draft = draft if draft is not None else getattr(verify, "draft", None)
        if draft is None:
            raise ValueError("no draft model: compile with QuantConfig(draft_mode=True) or pass draft=")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an int >= 1 (draft tokens per verify step)")
        if verify.graph.model_info.get("vocab_size") != draft.graph.model_info.get("vocab_size"):
            raise ValueError("draft and verify models have different vocabularies")
        self.k = k
        # Both caches hold up to k tokens past what is kept, before rejected ones are cut.
        self.verify = GenerationEngine(verify, 1, max_seq_len, extra_tokens_per_request=k + 1)
        self.draft = GenerationEngine(draft, 1, max_seq_len, extra_tokens_per_request=k + 1)

    def generate(self, prompt_ids, max_new_tokens: int, stop_token_ids=()) -> tuple[list[int], SpeculativeStats]:
        """Greedy tokens after the prompt (stopping after a stop token), and acceptance stats."""
        prompt = _token_list(prompt_ids, self.verify.vocab_size, "prompt_ids")
        stop = set(_token_list(stop_token_ids, self.verify.vocab_size, "stop_token_ids"))
        if not prompt or isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError("need a non-empty prompt and max_new_tokens >= 1")
        if len(prompt) + max_new_tokens > self.verify.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens exceeds max_seq_len={self.verify.max_seq_len}")
        start = time.perf_counter()
        stats = SpeculativeStats(0, 0, 0, 0, 0, 0.0)
        capacity = len(prompt) + max_new_tokens + self.k + 1
        for engine in (self.verify, self.draft):
            engine.pool.open(0, capacity)
        try:
            out = self._run(prompt, max_new_tokens, stop, stats)
        finally:
            for engine in (self.verify, self.draft):
                engine.pool.free(0)
        stats.new_tokens, stats.seconds = len(out), time.perf_counter() - start
        return out, stats

    def _run(self, prompt, max_new, stop, stats) -> list[int]:
        tensor = lambda ids: torch.tensor([ids], device=self.verify.device)  # noqa: E731
        logits = self.verify.forward([0], tensor(prompt))
        stats.verify_forwards += 1
        out = [int(logits[0, -1].argmax())]
        pending = list(prompt)  # tokens the draft cache lacks (its last logits predict the next token)
        while len(out) < max_new and out[-1] not in stop:
            k = min(self.k, max_new - len(out))
            pending.append(out[-1])
            proposal = []
            for _ in range(k):
                d_logits = self.draft.forward([0], tensor(pending))
                stats.draft_forwards += 1
                proposal.append(int(d_logits[0, -1].argmax()))
                pending = [proposal[-1]]
            base = self.verify.pool.lengths[0]
            v_logits = self.verify.forward([0], tensor([out[-1]] + proposal))[0]
            stats.verify_forwards += 1
            choices = v_logits.argmax(-1).tolist()
            n = 0
            while n < k and proposal[n] == choices[n]:
                n += 1
            stats.proposed += k
            stats.accepted += n
            new = proposal[:n] + [choices[n]]
            # Keep the verify cache up to the last accepted token; the draft has cached
            # out[-1] and proposal[:k-1], so it lacks proposal[k-1] when all were accepted.
            self.verify.pool.truncate(0, base + 1 + n)
            draft_len = self.draft.pool.lengths[0]
            self.draft.pool.truncate(0, min(draft_len, base + 1 + n))
            pending = proposal[-1:] if n == k else []
            for token in new:
                out.append(token)
                if token in stop or len(out) >= max_new:
                    break
        return out
