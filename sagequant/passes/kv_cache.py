"""kv_cache: turn the full-sequence graph into one step of cached generation.

Each aten.scaled_dot_product_attention becomes ir.paged_attention.paged_attention(q, k, v, layer,
scale, window): k and v are taken *before* the grouped-query expansion (the repeat_kv chain
unsqueeze -> expand -> reshape is matched and skipped), so the cache stores kv_heads heads; the
causal mask the model built is dropped (the op masks by cached positions). The node the frontend
recorded as the default positions (model_info["position_ids_node"]) becomes a `position_ids`
input, so rotary / learned positions see true positions during decode.

The result runs only inside an engine step (it reads and writes the engine's KV pool): the
engine applies this pass to a copy of the compiled graph that shares its weights. The KV
numerics per layer are the next pass's job (kv_cache_quant).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..ir.graph import QuantGraph
from ..ir.paged_attention import paged_attention
from .manager import PassContext, PassResult, define_pass
from ..errors import CompileError

ATEN = torch.ops.aten
SDPA = ATEN.scaled_dot_product_attention.default


class KVCacheRewriteError(CompileError):
    """The attention pattern cannot be rewritten onto the paged KV cache."""


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _before_repeat_kv(node: fx.Node) -> fx.Node:
    """x [b, kv_heads, s, d] when node is reshape(expand(unsqueeze(x, 2), [b, kv, rep, s, d])),
    with export's no-op full slices allowed in between; else node itself (no expansion)."""
    full_slice = lambda n: _is(n, ATEN.slice.Tensor) and tuple(n.args[2:4]) == (0, 2**63 - 1)  # noqa: E731
    if not _is(node, ATEN.reshape.default, ATEN.view.default, ATEN._unsafe_view.default):
        return node
    cur = node.args[0]
    if not _is(cur, ATEN.expand.default):
        return node
    cur = cur.args[0]
    while full_slice(cur):
        cur = cur.args[0]
    if not (_is(cur, ATEN.unsqueeze.default) and cur.args[1] == 2):
        return node
    cur = cur.args[0]
    while full_slice(cur):
        cur = cur.args[0]
    return cur


def _windows(hf_config: dict, n_layers: int) -> list[int]:
    """Sliding-window size per attention layer (0 = full attention), from the model config."""
    window = hf_config.get("sliding_window") or 0
    types = hf_config.get("layer_types")
    if types:
        if len(types) != n_layers:
            raise KVCacheRewriteError(f"config layer_types has {len(types)} entries but the graph "
                                      f"has {n_layers} attention ops")
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise KVCacheRewriteError(f"attention layer types {unknown} are not supported by the "
                                      "KV cache; supported: full_attention, sliding_attention")
        return [window if t == "sliding_attention" else 0 for t in types]
    if hf_config.get("use_sliding_window") is False:
        return [0] * n_layers
    return [window] * n_layers


def _sdpa_scale(node: fx.Node, layer: int) -> float | None:
    """The attention's softmax scale (None: 1/sqrt(head_dim)); refuses what a cache cannot do."""
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    if dropout:
        raise KVCacheRewriteError(f"attention {node.name} (layer {layer}) has dropout_p={dropout}; "
                                  "generation needs an eval-mode model (dropout 0)")
    return node.kwargs.get("scale")


@define_pass("kv_cache", "attention -> paged_attention over the KV pool; position_ids becomes an input")
def kv_cache(graph: QuantGraph, ctx: PassContext) -> PassResult:
    attns = graph.nodes(SDPA)
    if not attns:
        raise KVCacheRewriteError("no aten.scaled_dot_product_attention in the graph: the KV cache "
                                  "needs the model traced with attn_implementation='sdpa'")
    windows = _windows(graph.model_info.get("hf_config") or {}, len(attns))
    _positions_input(graph)
    for layer, node in enumerate(attns):
        scale = _sdpa_scale(node, layer)
        k, v = _before_repeat_kv(node.args[1]), _before_repeat_kv(node.args[2])
        with graph.graph.inserting_before(node):
            new = graph.graph.call_function(paged_attention, (node.args[0], k, v, layer, scale, windows[layer], "none"))
        new.meta.update({key: node.meta[key] for key in ("val", "nn_module_stack") if key in node.meta})
        node.replace_all_uses_with(new)
        graph.graph.erase_node(node)
    graph.recompile()
    graph.model_info["kv_layers"] = len(attns)
    return PassResult(graph, True, {"paged_attention": len(attns), "sdpa_left": len(graph.nodes(SDPA)),
                                    "sliding_window_layers": sum(1 for w in windows if w)})


def _positions_input(graph: QuantGraph) -> None:
    name = graph.model_info.get("position_ids_node")
    node = next((n for n in graph.graph.nodes if n.name == name), None) if name else None
    if node is None:
        raise KVCacheRewriteError(
            "the graph has no default position ids to turn into an input (model_info "
            f"position_ids_node={name!r}): retrace the model with this sagequant version, whose "
            "frontend records them for models whose forward accepts position_ids")
    ids = next(n for n in graph.graph.nodes if n.op == "placeholder")
    with graph.graph.inserting_after(ids):
        placeholder = graph.graph.placeholder("position_ids")
    node.replace_all_uses_with(placeholder)
