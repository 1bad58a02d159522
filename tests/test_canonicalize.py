"""canonicalize: exact op counts before/after, and the rewritten graph computes the same logits."""
import pytest
import torch

import sagequant as sq
from sagequant.ir.trace import layer_name
from sagequant.passes import PassContext, PassManager

ATEN = torch.ops.aten
RMS = "sagequant.rms_norm.default"
RSQRT = "aten.rsqrt.default"
ASSERT = "aten._assert_tensor_metadata.default"


def _ids():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, s, generator=g) for s in ((1, 1), (2, 5), (3, 12))]


def _canonicalize(graph):
    """Run the pass alone; return (counts before, counts after, logits before, logits after, pm)."""
    ids = _ids()
    before, out_before = graph.op_counts(), [graph(i) for i in ids]
    pm = PassManager(["canonicalize"])
    graph = pm.run(graph, PassContext(sq.QuantConfig()))
    return before, graph.op_counts(), out_before, [graph(i) for i in ids], pm, graph


@pytest.mark.parametrize("layers", [1, 3])
def test_llama_rms_norms_collapse(traced, layers):
    _, graph = traced("llama", num_hidden_layers=layers)
    before, after, out_b, out_a, pm, _ = _canonicalize(graph)
    n_norms = 2 * layers + 1
    assert before.get(RSQRT) == n_norms and before.get(RMS, 0) == 0
    assert before.get(ASSERT, 0) > 0
    assert after.get(RMS) == n_norms
    assert after.get(RSQRT, 0) == 0
    # The whole decomposed pattern is gone, not just the rsqrt.
    assert after.get("aten.pow.Tensor_Scalar", 0) == 0
    assert after.get("aten.mean.dim", 0) == 0
    assert after.get(ASSERT, 0) == 0
    # Linears are untouched: 7 per layer plus lm_head.
    assert before["aten.linear.default"] == after["aten.linear.default"] == 7 * layers + 1
    stats = pm.history[0]["stats"]
    assert stats["rms_norm"] == n_norms and stats["asserts_dropped"] == before[ASSERT]
    assert pm.history[0]["modified"] is True
    for a, b in zip(out_a, out_b):
        assert torch.equal(a, b)


def test_llama_rms_norm_args(traced):
    model, graph = traced("llama")
    *_, graph = _canonicalize(graph)
    eps = model.config.rms_norm_eps
    norms = graph.nodes(torch.ops.sagequant.rms_norm.default)
    for n in norms:
        x, w, e, offset = n.args
        assert w.op == "get_attr" and w.target.endswith("norm.weight")
        assert e == pytest.approx(eps) and offset == 0.0
    targets = sorted(n.args[1].target for n in norms)
    assert targets == sorted(["model.model.norm.weight"] + [
        f"model.model.layers.{i}.{k}.weight" for i in range(2)
        for k in ("input_layernorm", "post_attention_layernorm")])


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_llama_family(traced, arch):
    _, graph = traced(arch)
    _, after, out_b, out_a, _, _ = _canonicalize(graph)
    assert after.get(RMS) == 5 and after.get(RSQRT, 0) == 0 and after.get(ASSERT, 0) == 0
    for a, b in zip(out_a, out_b):
        assert torch.equal(a, b)


def test_gemma3_q_k_norms_and_offset(traced):
    model, graph = traced("gemma3")
    layers = model.config.num_hidden_layers
    before, after, out_b, out_a, _, graph = _canonicalize(graph)
    # input, post_attention, pre_feedforward, post_feedforward, q_norm, k_norm per layer + final.
    n_norms = 6 * layers + 1
    assert before.get(RSQRT) == n_norms
    assert after.get(RMS) == n_norms
    assert after.get(RSQRT, 0) == 0 and after.get(ASSERT, 0) == 0
    norms = graph.nodes(torch.ops.sagequant.rms_norm.default)
    assert {n.args[3] for n in norms} == {1.0}  # Gemma's (1 + w) scale
    weights = {n.args[1].target.rsplit(".", 2)[-2] for n in norms}
    assert {"q_norm", "k_norm", "pre_feedforward_layernorm", "post_feedforward_layernorm"} <= weights
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with torch.no_grad():
        ref = model(_ids()[1]).logits
    torch.testing.assert_close(out_a[1], ref, rtol=0, atol=1e-6)


def test_gemma3_offset_matters(traced):
    """Guard against a vacuous numeric check: the norm weights are non-trivial, so dropping the
    (1 + w) offset would change the logits."""
    _, graph = traced("gemma3")
    *_, out_a, _, graph = _canonicalize(graph)
    for n in graph.nodes(torch.ops.sagequant.rms_norm.default):
        n.args = (*n.args[:3], 0.0)
    graph.gm.recompile()
    assert not torch.allclose(graph(_ids()[1]), out_a[1], atol=1e-3)


def test_gpt2_addmm_becomes_linear(traced):
    model, graph = traced("gpt2")
    layers = model.config.n_layer
    before, after, out_b, out_a, pm, graph = _canonicalize(graph)
    assert before.get("aten.addmm.default") == 4 * layers
    assert before.get("aten.linear.default") == 1  # lm_head
    assert after.get("aten.addmm.default", 0) == 0
    assert after.get("aten.linear.default") == 4 * layers + 1
    assert after.get("aten.layer_norm.default") == before.get("aten.layer_norm.default") == 2 * layers + 1
    assert after.get(RMS, 0) == 0 and after.get(ASSERT, 0) == 0
    assert pm.history[0]["stats"]["addmm_to_linear"] == 4 * layers
    modules = dict(model.named_modules())
    seen = set()
    for node in graph.nodes(ATEN.linear.default):
        name = layer_name(node)
        seen.add(name)
        weight = graph.attr(node.args[1])
        mod = modules[name]
        if name == "lm_head":
            expected = mod.weight
        else:  # transformers Conv1D stores [in, out]; the graph must hold [out, in]
            expected = mod.weight.t()
            assert weight.shape == (mod.nf, mod.weight.shape[0])
            assert node.args[2].op == "get_attr"
            assert torch.equal(graph.attr(node.args[2]), mod.bias)
        assert weight.is_contiguous()
        assert torch.equal(weight, expected), name
    assert len(seen) == 4 * layers + 1
    for a, b in zip(out_a, out_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        ref = model(_ids()[2]).logits
    torch.testing.assert_close(out_a[2], ref, rtol=1e-5, atol=1e-5)


def test_canonicalize_is_idempotent(traced):
    _, graph = traced("llama")
    *_, graph = _canonicalize(graph)
    counts = graph.op_counts()
    pm = PassManager(["canonicalize"])
    pm.run(graph, PassContext(sq.QuantConfig()))
    assert graph.op_counts() == counts
    assert pm.history[0]["modified"] is False
    assert pm.history[0]["stats"]["rms_norm"] == 0


def test_nodes_keep_module_stack(traced):
    _, graph = traced("llama")
    *_, graph = _canonicalize(graph)
    for n in graph.nodes(torch.ops.sagequant.rms_norm.default):
        assert layer_name(n).endswith("norm")


def test_rms_norm_keeps_a_bf16_model_in_bf16(fresh_tiny):
    """HF upcasts inside RMSNorm and returns the input dtype; the collapsed op must too, or every
    later linear sees float32 activations against bf16 weights."""
    import sagequant as sq
    model = fresh_tiny("llama").to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    cm = sq.compile(model, sq.QuantConfig(weight_dtype="int8", group_size=None, guard="off"))
    norms = [n for n in cm.graph.graph.nodes if n.target == torch.ops.sagequant.rms_norm.default]
    assert norms and all(n.args[0].meta["val"].dtype == torch.bfloat16 for n in norms)
    got, ref = cm(ids), model(ids).logits
    assert got.dtype == torch.bfloat16
    assert float((got.float() - ref.float()).norm() / ref.float().norm()) < 0.05
