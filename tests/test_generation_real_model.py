"""Generation on the real SmolLM2-135M: engine greedy equals Hugging Face generate; speculative
decoding with an int8-KV draft equals the verify model's greedy output; fp8 KV stays close."""
import pytest
import torch

import sagequant as sq
from sagequant.api import CompiledModel
from sagequant.ir.kv_plan import build_kv_plan
from sagequant.runtime import GenerationEngine
from sagequant.runtime.speculative import SpeculativeDecoder

pytestmark = pytest.mark.real_model


def _with_kv(cm, kv):
    cfg = cm.config.replace(kv_cache_dtype=kv)
    return CompiledModel(cm.graph, cfg, build_kv_plan(cfg), cm.pass_history)


def test_generation_and_speculative_on_smollm2(smollm2):
    model, tok = smollm2
    cm = sq.compile(model, sq.QuantConfig(ignore=["*"]))   # float weights: generation under test
    prompt = tok.encode("The Prime Minister said on Tuesday that")
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                        pad_token_id=tok.eos_token_id, eos_token_id=None)[0, len(prompt):].tolist()
    ours = cm.generate([prompt], max_new_tokens=8)[0, len(prompt):].tolist()
    assert ours == hf
    out, stats = SpeculativeDecoder(cm, draft=_with_kv(cm, "int8"), k=3).generate(prompt, 8)
    assert out == hf and stats.accepted > 0
    # fp8 KV: prefill logits through the cache path stay close to float KV's.
    text = tok.encode("Australian scientists have discovered a new species of frog in the rain "
                      "forests of northern Queensland, the museum said on Monday.")
    logits = {}
    for kv in ("none", "fp8"):
        engine = GenerationEngine(_with_kv(cm, kv), max_batch=1, max_seq_len=256)
        engine.pool.open(0, len(text))
        logits[kv] = engine.forward([0], torch.tensor([text]))[0]
    agree = (logits["fp8"].argmax(-1) == logits["none"].argmax(-1)).float().mean()
    assert agree >= 0.9 and not torch.equal(logits["fp8"], logits["none"])
