"""kv_cache / kv_cache_quant passes: graph structure after the rewrite, and their errors."""
import copy

import pytest
import torch

from sagequant.config import ConfigError, QuantConfig
from sagequant.ir.kv_plan import build_kv_plan
from sagequant.passes import PassContext, PassManager
from sagequant.passes.kv_cache import KVCacheRewriteError
from sagequant.ir.paged_attention import paged_attention

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _rewrite(graph, **cfg):
    config = QuantConfig(**cfg)
    graph.kv_plan = build_kv_plan(config)  # what runtime/step_graph.py carries from the compile
    return PassManager(["kv_cache", "kv_cache_quant"]).run(graph, PassContext(config))


@pytest.mark.parametrize("arch, heads, kv_heads", [("llama", 4, 2), ("qwen2", 4, 2), ("gpt2", 4, 4)])
def test_attention_becomes_paged_attention_before_repeat_kv(traced, arch, heads, kv_heads):
    _, graph = traced(arch)
    pos_node = graph.model_info["position_ids_node"]
    assert len(graph.nodes(SDPA)) == 2 and pos_node
    graph = _rewrite(graph)
    attns = graph.nodes(paged_attention)
    assert len(graph.nodes(SDPA)) == 0 and [n.args[3] for n in attns] == [0, 1]
    for n in attns:
        q, k, v = (n.args[i].meta["val"] for i in range(3))
        assert q.shape[1] == heads and k.shape[1] == kv_heads and v.shape[1] == kv_heads
        # k, v come straight from the projections' rotary / transpose, not from an expand.
        assert n.args[1].target != torch.ops.aten.reshape.default
        assert n.args[6] == "none"
    assert [p.name for p in graph.graph.nodes if p.op == "placeholder"] == ["input_ids", "position_ids"]
    assert pos_node not in {n.name for n in graph.graph.nodes}


def test_kv_cache_quant_sets_layer_dtypes(traced):
    _, graph = traced("llama")
    graph = _rewrite(graph, kv_cache_dtype="fp8", kv_high_precision_layers=[1])
    assert [n.args[6] for n in graph.nodes(paged_attention)] == ["fp8", "none"]
    _, graph = traced("llama")
    graph = _rewrite(graph, kv_cache_dtype="int8")
    assert [n.args[6] for n in graph.nodes(paged_attention)] == ["int8", "int8"]


def test_plan_errors_name_the_problem(traced):
    _, graph = traced("llama")
    with pytest.raises(Exception, match=r"names layers \[5\] that do not exist; valid: 0..1"):
        _rewrite(graph, kv_cache_dtype="int8", kv_high_precision_layers=[5])
    _, graph = traced("llama")   # head_dim 16
    with pytest.raises(Exception, match="group_size=32 does not divide the model's head_dim=16"):
        _rewrite(graph, kv_cache_dtype="int8", kv_group_size=32)


def test_missing_attention_or_positions_is_an_error(traced):
    _, graph = traced("llama")
    for n in graph.nodes(SDPA):  # replace attention by its value input: no attention left
        n.replace_all_uses_with(n.args[2])
        graph.graph.erase_node(n)
    with pytest.raises(Exception, match="no aten.scaled_dot_product_attention"):
        _rewrite(graph)
    _, graph = traced("llama")
    graph.model_info["position_ids_node"] = None
    with pytest.raises(Exception, match="no default position ids"):
        _rewrite(graph)


def test_compile_validates_exempt_layers(tiny):
    import sagequant
    with pytest.raises(ConfigError, match=r"layers \[7\] that do not exist"):
        sagequant.compile(tiny("llama"), QuantConfig(kv_cache_dtype="fp8", kv_high_precision_layers=[7]))


def test_rewritten_graph_runs_only_in_an_engine_step(traced):
    _, graph = traced("llama")
    graph = _rewrite(graph)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(RuntimeError, match="outside an engine step"):
        graph.gm(ids, torch.arange(3)[None])
    assert isinstance(copy.deepcopy(graph), type(graph))


def test_attention_a_cache_cannot_serve_is_refused(traced):
    _, graph = traced("llama")
    node = graph.nodes(SDPA)[0]
    node.args = tuple(node.args[:4]) + (0.1,)
    with pytest.raises(KVCacheRewriteError, match=r"dropout_p=0.1"):
        _rewrite(graph)
    _, graph = traced("llama")
    graph.model_info["hf_config"] = {"layer_types": ["full_attention", "chunked_attention"]}
    with pytest.raises(KVCacheRewriteError, match=r"\['chunked_attention'\] are not supported"):
        _rewrite(graph)
