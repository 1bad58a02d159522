"""Frontend: HF causal LMs -> QuantGraph with dynamic batch/seq; failures are TraceErrors that
name the module at fault."""
import numpy as np
import pytest
import torch

import sagequant as sq
from sagequant.ir.graph import QuantGraph
from sagequant.ir.trace import layer_name, trace_model

ARCHS = ["llama", "qwen2", "mistral", "gemma3", "gpt2"]
# seq 1 and batch 1 are the 0/1-specialisation traps of dynamic export (example was [2, 8]).
SHAPES = [(1, 1), (2, 1), (1, 7), (3, 5), (2, 8), (1, 33)]


@pytest.mark.parametrize("arch", ARCHS)
def test_traced_logits_equal_eager(traced, arch):
    model, graph = traced(arch)
    assert isinstance(graph, QuantGraph)
    assert graph.model_info["architecture"] == type(model).__name__
    assert graph.model_info["vocab_size"] == 128
    assert graph.model_info["num_hidden_layers"] == 2
    gen = torch.Generator().manual_seed(7)
    for shape in SHAPES:
        ids = torch.randint(0, 128, shape, generator=gen)
        with torch.no_grad():
            ref = model(input_ids=ids, use_cache=False).logits
        out = graph(ids)
        assert out.shape == (*shape, 128), shape
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6, msg=f"{arch} shape {shape}")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_graph_is_a_plain_function_of_ids(traced, arch):
    _, graph = traced(arch)
    placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 1
    assert not any(n.op == "call_module" for n in graph.graph.nodes)  # guards module dropped
    assert not hasattr(graph.gm, "_guards_fn")
    out = graph.gm(torch.zeros(1, 3, dtype=torch.long))
    assert isinstance(out, torch.Tensor)  # no pytree tuple around the logits


def test_layer_names_drop_the_wrapper_prefix(traced):
    model, graph = traced("llama")
    names = [layer_name(n) for n in graph.nodes(torch.ops.aten.linear.default)]
    expected = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(names) == expected
    assert "model.layers.0.mlp.down_proj" in names and "lm_head" in names


def test_trace_ragged_hidden_size(helpers):
    model = helpers.build_tiny("llama", **helpers.RAGGED)
    graph = trace_model(model)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(graph(ids), ref, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- failures
class _DataDependentIf(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return self.inner(x)
        return -self.inner(x)


class _ItemBranch(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if int(x.abs().argmax().item()) % 2:
            return self.inner(x)
        return 2 * self.inner(x)


class _UsesNumpy(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + float(np.asarray(x.detach()).mean())


@pytest.mark.parametrize("cls", [_DataDependentIf, _ItemBranch, _UsesNumpy])
def test_unexportable_module_is_named(fresh_tiny, cls):
    model = fresh_tiny("llama")
    model.model.layers[1].mlp = cls(model.model.layers[1].mlp)
    with torch.no_grad():  # the eager model itself runs
        model(torch.randint(0, 128, (1, 4)))
    with pytest.raises(sq.TraceError) as info:
        trace_model(model)
    msg = str(info.value)
    assert f"model.layers.1.mlp ({cls.__name__})" in msg
    assert "LlamaForCausalLM" in msg
    assert "What to do" in msg
    assert info.value.__cause__ is not None  # the export error is chained, not swallowed


@pytest.mark.parametrize("bad", ["not a model", 3, None, {"input_ids": 1}])
def test_non_module_input_raises_trace_error(bad):
    with pytest.raises(sq.TraceError, match=type(bad).__name__):
        trace_model(bad)


def test_module_without_config_raises_trace_error():
    with pytest.raises(sq.TraceError, match="Linear has no transformers config"):
        trace_model(torch.nn.Linear(4, 4))


def test_compile_of_non_module_raises_trace_error():
    with pytest.raises(sq.TraceError):
        sq.compile(object(), sq.QuantConfig())
