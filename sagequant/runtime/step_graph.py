"""The graph an engine runs: a copy of a compiled model's graph (sharing its weight tensors)
rewritten by the kv_cache and kv_cache_quant passes into forward(input_ids, position_ids) ->
logits that reads and writes a paged KV pool."""
from __future__ import annotations

import copy
import weakref

import torch
import torch.fx as fx

from ..ir.graph import QuantGraph
from ..ir.trace import retarget_device
from ..passes.manager import PassContext
from ..passes.pipeline import STEP_GRAPH, build_pipeline
from ..ir.paged_attention import AttentionCall, paged_attention
from .fuse_step import LINEAR_OPS, fuse_step

_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def step_graph(compiled, device: torch.device | None = None, fused: bool = True,
               merge_linears: bool | None = None) -> QuantGraph:
    """The cache-aware graph of `compiled`, carrying its KV plan; with `device`, a copy whose
    weights live there (the compiled model is left as it is); fused: the decoder glue rewritten
    into fused ops (fuse_step.py; same math on CPU). merge_linears (fused only): concatenate the
    weights of linears that read one input; None merges when the weights are copied to `device`
    (free there), True also in place, at the cost of a second copy of those weights."""
    merge = device is not None if merge_linears is None else bool(merge_linears)
    key = (str(compiled.kv_plan.to_dict()), str(device), fused, merge)
    per_model = _CACHE.setdefault(compiled, {})
    if key not in per_model:
        src = compiled.graph
        gm = fx.GraphModule(src.gm, copy.deepcopy(src.graph))  # new containers, same tensors
        graph = QuantGraph(gm, copy.deepcopy(src.model_info))
        graph.kv_plan = compiled.kv_plan
        pipeline = build_pipeline(compiled.config, STEP_GRAPH)
        graph = pipeline.manager().run(graph, PassContext(compiled.config))
        if fused:
            graph.model_info["step_fusions"] = fuse_step(graph, merge_linears=merge)
        _flatten_attrs(graph)
        # Traced graphs keep their device constants on CPU: a model compiled in place on a GPU
        # needs its aranges and rotary .to(device) there too (tensors already there stay shared).
        _move(graph, device if device is not None else embedding_weight(graph).device)
        per_model[key] = graph
    return per_model[key]


def _flatten_attrs(graph: QuantGraph) -> None:
    """Every tensor the graph reads as an attribute of the root module: the generated code then
    reads `self.layers_0_mlp_w` (one lookup) instead of walking `self.model.layers[0].mlp.w`,
    whose nn.Module lookups were ~10 µs a weight, ~0.1 ms a layer, of an eager prefill's host
    time on a busy CPU. A graph calling submodules or reading non-tensors is left as it is."""
    nodes = [n for n in graph.graph.nodes if n.op == "get_attr"]
    if any(n.op == "call_module" for n in graph.graph.nodes) or \
            not all(isinstance(graph.attr(n), torch.Tensor) for n in nodes):
        return
    flat: dict[str, str] = {}
    attrs: dict[str, torch.Tensor] = {}
    for n in nodes:
        if n.target not in flat:
            name = n.target.replace(".", "_")
            while name in attrs:
                name += "_"
            flat[n.target] = name
            attrs[name] = graph.attr(n)
        n.target = flat[n.target]
    graph.gm = fx.GraphModule(attrs, graph.graph)


def _move(graph: QuantGraph, device: torch.device) -> None:
    """Weights to `device`, and the device constants export baked into the graph (aranges,
    .to(device) of rotary buffers) rewritten to it."""
    retarget_device(graph.gm, device)
    # Rebind copies on the new containers: Module.to() would swap .data inside the Parameter
    # objects this copy shares with the compiled model (and the user's model), moving theirs too.
    for name, tensor in [*graph.gm.named_parameters(), *graph.gm.named_buffers()]:
        owner_name, _, leaf = name.rpartition(".")
        owner = graph.gm.get_submodule(owner_name)
        moved = tensor.detach().to(device)
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(moved, requires_grad=False)
        else:
            owner._buffers[leaf] = moved
    graph.gm.recompile()


def last_position_module(graph: QuantGraph, index: torch.Tensor | None = None
                         ) -> fx.GraphModule | None:
    """The step graph with its output linear (the lm_head) applied to one new token per row:
    logits [rows, 1, vocab], the same weights. A prefill samples from that position alone, so
    the head's GEMM over every prompt token (2 x 128256 x 4096 FLOPs a token at Llama-3-8B, ~7%
    of the model's) and its [rows, tokens, vocab] logits are saved. The last token, or with
    `index` (int64 [1], read at every call: the module's buffer `last_index`) that position.
    None when the output is not one linear (the graph is then run whole)."""
    g = copy.deepcopy(graph.graph)
    out = next(n for n in g.nodes if n.op == "output")
    head = out.args[0]
    if isinstance(head, (tuple, list)):
        head = head[0] if len(head) == 1 else None
    if not (isinstance(head, fx.Node) and head.op == "call_function" and head.target in LINEAR_OPS
            and isinstance(head.args[0], fx.Node)):
        return None
    hidden = head.args[0]
    with g.inserting_before(head):
        if index is None:
            last = g.call_function(torch.ops.aten.slice.Tensor, (hidden, 1, -1, 2 ** 62))
        else:
            last = g.call_function(torch.ops.aten.index_select.default,
                                   (hidden, 1, g.get_attr("last_index")))
    head.args = (last, *head.args[1:])
    if index is None:
        return fx.GraphModule(graph.gm, g)
    attrs = {n.target: graph.attr(n.target) for n in g.nodes
             if n.op in ("get_attr", "call_module") and n.target != "last_index"}
    return fx.GraphModule({**attrs, "last_index": index}, g)


def attention_nodes(graph: QuantGraph) -> list[fx.Node]:
    return graph.nodes(paged_attention)


def kv_geometry(graph: QuantGraph) -> tuple[int, int]:
    """(kv_heads, head_dim) of the cache: from the traced k shapes, else from the model config."""
    k = AttentionCall.of(attention_nodes(graph)[0]).k
    if "val" in k.meta:
        return int(k.meta["val"].shape[1]), int(k.meta["val"].shape[-1])
    cfg = graph.model_info.get("hf_config") or {}
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    kv_heads = cfg.get("num_key_value_heads") or heads
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    if not (kv_heads and head_dim):
        raise ValueError("cannot tell the KV cache's heads and head_dim: the graph carries no "
                         "shapes and the model config names neither num_key_value_heads / "
                         "num_attention_heads nor head_dim / hidden_size")
    return int(kv_heads), int(head_dim)


def embedding_weight(graph: QuantGraph) -> torch.Tensor:
    """The token embedding table: its dtype is the activation dtype, its device the model's."""
    emb = graph.nodes(torch.ops.aten.embedding.default)
    if not emb:
        raise ValueError("the graph has no aten.embedding: cannot tell the activation dtype")
    return graph.attr(emb[0].args[0])
