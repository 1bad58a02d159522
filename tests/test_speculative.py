"""draft_mode and speculative decoding: greedy output equals the verify model's own greedy output."""
import pytest

import sagequant
from sagequant.config import ConfigError, QuantConfig
from sagequant.runtime.speculative import SpeculativeDecoder, draft_and_verify_configs


def test_draft_and_verify_configs():
    draft, verify = draft_and_verify_configs(QuantConfig(weight_dtype="int8", draft_mode=True))
    assert (verify.scheme, verify.kv_cache_dtype, verify.draft_mode) == ("W8A16", "none", False)
    assert (draft.scheme, draft.kv_cache_dtype, draft.group_size) == ("W4A16", "int8", 128)
    with pytest.raises(ConfigError, match="no lighter than the verify path"):
        draft_and_verify_configs(QuantConfig(weight_dtype="int4", draft_mode=True))


def test_speculative_equals_verify_greedy(tiny):
    cm = sagequant.compile(tiny("qwen2"), QuantConfig(weight_dtype="int8", draft_mode=True))
    assert cm.draft is not None and cm.draft.kv_plan.dtype == "int8"
    prompt = [3, 14, 15, 92, 65]
    reference = cm.generate([prompt], max_new_tokens=24)[0, len(prompt):].tolist()
    for k in (1, 4):
        out, stats = SpeculativeDecoder(cm, k=k).generate(prompt, 24)
        assert out == reference
        assert stats.new_tokens == 24 and stats.accepted <= stats.proposed
        # Each verify step after the prefill yields its accepted tokens + 1 (the last may be cut).
        assert stats.verify_forwards <= 1 + 24 - stats.accepted
    # With the verify model as its own draft every proposal is accepted.
    out, stats = SpeculativeDecoder(cm, draft=cm, k=4).generate(prompt, 24)
    assert out == reference and stats.acceptance_rate == 1.0 and stats.verify_forwards == 1 + 5
    stop = reference[5]
    out, _ = SpeculativeDecoder(cm, k=3).generate(prompt, 24, stop_token_ids=[stop])
    assert out == reference[:reference.index(stop) + 1]


def test_speculative_errors(compiled):
    cm = compiled("llama")
    with pytest.raises(ValueError, match="no draft model"):
        SpeculativeDecoder(cm)
    with pytest.raises(ValueError, match="k=0"):
        SpeculativeDecoder(cm, draft=cm, k=0)
