"""fuse_norm_qdq: exact op counts after the pass, bit-identical logits against the unfused
compile, the fuse_ln / fuse_qdq switches, the inverse rewrite, and an artifact round trip.

The tiny llama has 2 layers x 7 quantized linears reading 4 distinct activations per layer:
input norm -> q/k/v, attention -> o_proj, post-attention norm -> gate/up, gated MLP -> down_proj.
"""
import copy

import pytest
import torch

import sagequant as sq
from sagequant.lowering.unfuse import unfuse_norm_qdq

W8A8 = dict(weight_dtype="int8", activation_dtype="int8", group_size=None)


def _sq_ops(cm) -> dict:
    return {k.split(".")[1]: v for k, v in cm.graph.op_counts().items() if k.startswith("sagequant.")}


def _stats(cm) -> dict:
    return next(h for h in cm.pass_history if h["pass"] == "fuse_norm_qdq")["stats"]


@pytest.mark.parametrize("cfg", [W8A8, dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None,
                                            activation_scale="static_per_tensor")])
def test_fused_graph_and_bit_identical_logits(compiled, eval_ids, cfg):
    fused = compiled("llama", **cfg)
    plain = compiled("llama", fuse_qdq=False, **cfg)
    assert _sq_ops(fused) == {"rms_norm_quantize": 4, "quantize_activation": 4,
                              "w8a8_linear_prequantized_ref": 14, "rms_norm": 1}  # final norm -> float lm_head
    assert _sq_ops(plain) == {"rms_norm": 5, "w8a8_linear_ref": 14}
    assert _stats(fused) == {"quantizers": 8, "norms_fused": 4, "kernels": 14,
                             "requantizations_removed": 6, "unfused": {}}
    assert torch.equal(fused(eval_ids), plain(eval_ids))


def test_norm_read_through_another_op_is_not_fused(compiled, eval_ids):
    """A quantized lm_head reads the final norm through the logits slice: that slice is quantized
    by its own quantizer and the norm stays a float rms_norm."""
    cm = compiled("llama", ignore=[], **W8A8)
    assert _sq_ops(cm) == {"rms_norm_quantize": 4, "quantize_activation": 5,
                           "w8a8_linear_prequantized_ref": 15, "rms_norm": 1}
    assert torch.equal(cm(eval_ids), compiled("llama", ignore=[], fuse_qdq=False, **W8A8)(eval_ids))


def test_fuse_ln_off_shares_quantizers_only(compiled, eval_ids):
    cm = compiled("llama", fuse_ln=False, **W8A8)
    assert _sq_ops(cm) == {"rms_norm": 5, "quantize_activation": 8, "w8a8_linear_prequantized_ref": 14}
    assert _stats(cm)["norms_fused"] == 0
    assert torch.equal(cm(eval_ids), compiled("llama", fuse_qdq=False, **W8A8)(eval_ids))


def test_weight_only_schemes_are_untouched(compiled):
    cm = compiled("llama", weight_dtype="int4", activation_dtype="a16", group_size=32)
    assert _stats(cm)["quantizers"] == 0 and "quantize_activation" not in _sq_ops(cm)


def test_unfuse_restores_the_quantizing_kernels(compiled, eval_ids):
    cm = compiled("llama", **W8A8)
    graph = copy.deepcopy(cm.graph)
    assert unfuse_norm_qdq(graph.graph) == 14
    graph.recompile()
    assert {k: v for k, v in graph.op_counts().items() if k.startswith("sagequant.")} == \
        {"sagequant.rms_norm.default": 5, "sagequant.w8a8_linear_ref.default": 14}
    assert torch.equal(graph(eval_ids), cm(eval_ids))


def test_fused_artifact_round_trip(compiled, eval_ids, tmp_path):
    cm = compiled("llama", **W8A8)
    back = sq.load(cm.save(tmp_path / "art"))
    assert _sq_ops(back) == _sq_ops(cm)
    assert torch.equal(back(eval_ids), cm(eval_ids))


def test_error_report_of_a_fused_graph_equals_the_unfused_one(compiled, tiny, eval_ids):
    """The per-layer report feeds each float layer its float input, through the inverse rewrite."""
    fused, plain = compiled("llama", **W8A8), compiled("llama", fuse_qdq=False, **W8A8)
    ids = eval_ids[:1]
    assert fused.error_report(ids, reference=tiny("llama")) == plain.error_report(ids, reference=tiny("llama"))
