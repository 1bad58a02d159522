"""ir/replicate.py: a two-block trace grown to full depth is the full trace (op for op, attribute
for attribute, segment for segment, logits bit for bit), and anything short of interchangeable
blocks is traced in full."""
import pytest
import torch

from sagequant.api import _meta_copy
from sagequant.calibration.onload import checkpoint_name
from sagequant.calibration.sequential import SequentialRunner
from sagequant.ir.replicate import NotReplicable, expand_blocks, identical_blocks, trace_reusing_blocks
from sagequant.ir.trace import WRAPPER_PREFIX, trace_model


def _structure(graph):
    nodes = list(graph.graph.nodes)
    runner = SequentialRunner(graph)
    return {"ops": [n.target for n in nodes if n.op == "call_function"],
            "attrs": [n.target for n in nodes if n.op == "get_attr"],
            "stacks": [n.meta.get("nn_module_stack") for n in nodes if n.op == "call_function"],
            "segments": [[n.target for n in seg] for seg in runner.segments],
            "blocks": runner.block_names}


def _with_weights(graph, model):
    state = model.state_dict()
    for node in graph.graph.nodes:
        if node.op == "get_attr" and graph.attr(node).device.type == "meta":
            graph.set_attr(node.target, state[checkpoint_name(node.target)])
    return graph


@pytest.mark.parametrize("arch,depth", [("llama", dict(num_hidden_layers=4)), ("gpt2", dict(n_layer=4))])
def test_grown_graph_is_the_full_trace(helpers, arch, depth):
    model = helpers.build_tiny(arch, **depth)
    skeleton = _meta_copy(model)
    grown, full = trace_reusing_blocks(skeleton), trace_model(skeleton)
    assert grown.model_info["trace"] == "replicated" and full.model_info["trace"] == "full"
    layers = model.config.num_hidden_layers
    assert len(_structure(grown)["blocks"]) == layers and _structure(grown) == _structure(full)
    assert {k: v for k, v in grown.model_info.items() if k != "trace"} == \
        {k: v for k, v in full.model_info.items() if k != "trace"}
    # the skeleton got its blocks and config back
    assert skeleton.config.num_hidden_layers == layers and sum(1 for _ in skeleton.modules()) == \
        sum(1 for _ in model.modules())
    ids = torch.randint(0, helpers.VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = _with_weights(grown, model)(ids), _with_weights(full, model)(ids)
    assert torch.equal(got, want)


def test_mixed_layer_types_are_traced_in_full(helpers):
    model = helpers.build_tiny("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
                               max_window_layers=2)
    assert len(set(model.config.layer_types)) == 2
    graph = trace_reusing_blocks(_meta_copy(model))
    assert graph.model_info["trace"] == "full" and "layer_types" in graph.model_info["trace_fallback"]
    assert len(SequentialRunner(graph).block_names) == 4


def test_a_block_with_other_settings_is_not_interchangeable(helpers):
    skeleton = _meta_copy(helpers.build_tiny("llama", num_hidden_layers=3))
    identical_blocks(skeleton)
    skeleton.model.layers[2].self_attn.scaling = 0.5
    with pytest.raises(NotReplicable, match=r"model.layers.2 differs from model.layers.0: .*scaling"):
        identical_blocks(skeleton)


def test_expand_refuses_blocks_that_compute_differently_and_leaves_the_graph(helpers):
    skeleton = _meta_copy(helpers.build_tiny("llama", num_hidden_layers=2))
    skeleton.model.layers[1].self_attn.scaling = 0.5   # a constant of block 1's SDPA only
    graph = trace_model(skeleton)
    before = graph.gm.code
    with pytest.raises(NotReplicable, match="does not compute what"):
        expand_blocks(graph, WRAPPER_PREFIX + "model.layers", 4)
    assert graph.gm.code == before


def test_real_weights_are_not_replicated(helpers):
    with pytest.raises(NotReplicable, match="meta device"):
        identical_blocks(helpers.build_tiny("llama", num_hidden_layers=3))
