"""Host work on the engine's hot paths, counted on CPU: every op that reads a device value on the
host (`.item()`, `bool(t)`, `nonzero`) or makes a tensor from host data (`torch.tensor(list)`,
a host-to-device copy that waits for the GPU queue to drain on CUDA) is seen by a
TorchDispatchMode. A prefill must do a fixed few of them whatever the depth (one per layer was
what left an H100 idle between layers, BENCHMARKS §13d), and a steady overlapped decode step
none but the read of its own host copy."""
from collections import Counter
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sagequant.runtime import GenerationEngine

aten = torch.ops.aten
HOST_OPS = (aten.lift_fresh.default, aten._local_scalar_dense.default, aten.nonzero.default,
            aten.masked_select.default)


class HostOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_OPS:
            self.seen[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _cuda_prefill_engine(cm, **kw):
    """The engine as it runs on CUDA: the static decode step, and the CUDA attention kernel for
    fresh prompts (flash SDPA over the new k, v: plain torch). Decode attention is the reference
    kernel, uncounted: it gathers blocks by host lists, where the Triton kernel it stands in for
    reads the step's device index."""
    from torch.utils._python_dispatch import _disable_current_modes

    from sagequant.backends.cuda.kv_attention import CUDA_PAGED_ATTENTION, cuda_paged_attention
    from sagequant.backends.reference.kv_attention import paged_attention_ref

    def attend(q, step, layer, scale, window):
        if q.shape[2] > 1:
            return cuda_paged_attention(q, step, layer, scale, window)
        with _disable_current_modes():
            return paged_attention_ref(q, step, layer, scale, window)

    engine = GenerationEngine(cm, max_batch=2, cuda_graphs=True, **kw)
    engine.kernel = replace(CUDA_PAGED_ATTENTION, op=attend)
    return engine


def _prefill_host_ops(engine, prompt_len: int) -> Counter:
    engine.add_request([(5 * i) % 100 + 1 for i in range(prompt_len)], 1)
    with HostOps() as mode:
        (event,) = engine.step()
    assert event.finished and not engine.has_work()
    return mode.seen


def test_prefill_host_work_does_not_grow_with_depth(compiled):
    counts = []
    for layers in (2, 4):
        cm = compiled("llama", model_kw=dict(num_hidden_layers=layers))
        engine = _cuda_prefill_engine(cm)
        counts.append([_prefill_host_ops(engine, n) for n in (7, 40)])
    assert counts[0] == counts[1]
    # The prompt, its positions, the cache write index (start positions, block table): tensors
    # from host lists, once per forward; the first token's argmax read once.
    assert counts[0][0] == counts[0][1] == Counter(lift_fresh=4, _local_scalar_dense=1)


def test_steady_overlapped_decode_step_reads_only_its_host_copy(compiled):
    engine = _cuda_prefill_engine(compiled("llama"), overlap_decode=True)
    engine.add_request([1, 2, 3], 12)
    engine.add_request([4, 5, 6, 7], 12)
    for _ in range(3):
        engine.step()
    for _ in range(5):
        with HostOps() as mode:
            events = engine.step()
        assert len(events) == 2
        # No host-built index or ids (the device advances them); the one value read on the host
        # is the NaN/Inf flag of the pinned copy (its tokens come back through tolist()).
        assert mode.seen == Counter(_local_scalar_dense=1)


def test_step_graph_reads_its_weights_from_the_root(compiled):
    """The generated forward reads each weight with one attribute lookup (no module walk), and
    the weights are the compiled model's own tensors (nothing copied on the same device)."""
    from sagequant.runtime.step_graph import step_graph
    cm = compiled("llama")
    graph = step_graph(cm)
    targets = [n.target for n in graph.graph.nodes if n.op == "get_attr"]
    assert targets and not any("." in t for t in targets)
    assert not list(graph.gm.children())
    assert "getattr(" not in graph.gm.code and "self.model." not in graph.gm.code
    own = {t.untyped_storage().data_ptr() for t in cm.graph.state().values()}
    assert {t.untyped_storage().data_ptr() for t in graph.state().values()} <= own


def test_a_graph_calling_submodules_keeps_its_module_tree():
    """_flatten_attrs only rewrites graphs whose get_attrs are all tensors and that call no
    submodule; anything else runs as traced."""
    import torch.fx as fx

    from sagequant.ir.graph import QuantGraph
    from sagequant.runtime.step_graph import _flatten_attrs

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.scale = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.lin(x) * self.scale

    graph = QuantGraph(fx.symbolic_trace(Net()))
    before = graph.gm
    _flatten_attrs(graph)
    assert graph.gm is before and [n.target for n in graph.graph.nodes if n.op == "get_attr"] == ["scale"]
