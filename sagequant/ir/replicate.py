"""Trace a model of L identical decoder blocks in the time of two: export the model with blocks 0
and 1 only, then grow the graph to L blocks by copying block 1's nodes (fx `node_copy`) for
blocks 2..L-1, each copy reading the previous one where block 1 reads block 0.

torch.export costs about the same per block whatever the width (~0.6 s on a CPU core), so at 32
to 80 blocks tracing is most of a layer-wise compile's fixed time. The grown graph is the one a
full trace gives: the same ops in the same order, the same get_attr targets (meta tensors of
block 1's shapes), nn_module_stack paths and keys renamed `<blocks>.1` -> `<blocks>.j`
(calibration/sequential.py finds blocks by those paths), the prologue (embedding, rotary tables,
masks) shared and the epilogue reading the last block. Node names differ (fx numbers copies).

The shortcut needs interchangeable blocks: one class; the same parameter names, shapes and
dtypes; equal buffers and scalar attributes but the layer index; one config.layer_types for all
layers; and, in the traced graph, block 1 must be block 0 with its inputs renamed and nothing
after the blocks may read block 0. Otherwise the model is traced in full. info["trace"] says
which ("replicated" or "full"; info["trace_fallback"] says why not replicated).
"""
from __future__ import annotations

import contextlib
import copy
import re

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .graph import QuantGraph
from .trace import WRAPPER_PREFIX, trace_model

# Per-block attributes that only number the block (KV-cache slots); a use_cache=False trace does
# not read them, and an index that changed the numerics would differ between blocks 0 and 1.
_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_number", "block_idx"})
_SCALARS = (bool, int, float, str, type(None))


class NotReplicable(Exception):
    """The blocks are not interchangeable; the message says what differs (the full trace runs)."""


def trace_reusing_blocks(model: torch.nn.Module) -> QuantGraph:
    """trace_model(model), exporting two decoder blocks and copying the second for the rest when
    the model's blocks are interchangeable and its parameters on the meta device (the copies'
    attributes are meta tensors, which a layer-wise compile onloads block by block)."""
    try:
        path, blocks = identical_blocks(model)
        with _first_two_blocks(model, path, blocks):
            graph = trace_model(model)
        expand_blocks(graph, WRAPPER_PREFIX + path, len(blocks))
    except NotReplicable as e:
        graph = trace_model(model)
        graph.model_info["trace_fallback"] = str(e)
        return graph
    config = model.config
    graph.model_info.update(num_hidden_layers=config.num_hidden_layers, hf_config=config.to_dict(),
                            trace="replicated")
    return graph


def identical_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(module path, ModuleList) of the model's decoder blocks if they are interchangeable."""
    config = model.config
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int) or depth < 3:
        raise NotReplicable(f"num_hidden_layers is {depth!r}: fewer than 3 blocks, nothing to reuse")
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == depth]
    if len(lists) != 1:
        raise NotReplicable(f"{len(lists)} module lists of num_hidden_layers={depth} entries, "
                            f"{[n for n, _ in lists]}; the blocks must be the only one")
    path, blocks = lists[0]
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        raise NotReplicable(f"config.layer_types mixes {sorted(set(layer_types))}")
    if any(p.device.type != "meta" for p in blocks[0].parameters()):
        raise NotReplicable("the blocks' parameters are not on the meta device")
    reference = _signature(blocks[0])
    for i in range(1, depth):
        signature = _signature(blocks[i])
        if signature != reference:
            diff = next((a, b) for a, b in zip(reference + [None], signature + [None]) if a != b)
            raise NotReplicable(f"{path}.{i} differs from {path}.0: {diff[1]} where block 0 has {diff[0]}")
        for (name, a), (_, b) in zip(blocks[0].named_buffers(), blocks[i].named_buffers()):
            if a.device.type != "meta" and not torch.equal(a, b):
                raise NotReplicable(f"{path}.{i} buffer {name} differs from {path}.0's")
    return path, blocks


def _signature(block: torch.nn.Module) -> list[tuple]:
    """What must agree between interchangeable blocks: submodule classes and scalar attributes,
    parameter and buffer names, shapes, dtypes and devices."""
    out = []
    for name, m in block.named_modules():
        scalars = sorted((k, v) for k, v in vars(m).items()
                         if isinstance(v, _SCALARS) and k not in _INDEX_ATTRS)
        out.append(("module", name, type(m).__qualname__, tuple(scalars)))
    for kind, tensors in (("parameter", block.named_parameters()), ("buffer", block.named_buffers())):
        out.extend((kind, n, tuple(t.shape), t.dtype, t.device.type) for n, t in tensors)
    return out


@contextlib.contextmanager
def _first_two_blocks(model: torch.nn.Module, path: str, blocks: torch.nn.ModuleList):
    """The model (and its config) with blocks 0 and 1 only, restored on exit."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    config = model.config
    saved = {k: getattr(config, k) for k in ("num_hidden_layers", "layer_types")
             if getattr(config, k, None) is not None}
    setattr(parent, attr, blocks[:2])
    config.num_hidden_layers = 2
    if "layer_types" in saved:
        config.layer_types = list(saved["layer_types"][:2])
    try:
        yield
    finally:
        setattr(parent, attr, blocks)
        for k, v in saved.items():
            setattr(config, k, v)


def expand_blocks(graph: QuantGraph, blocks: str, depth: int) -> QuantGraph:
    """Graph of blocks `<blocks>.0` and `<blocks>.1` -> the same graph with `depth` blocks, in
    place. Raises NotReplicable, the graph untouched, unless block 1 is block 0 renamed."""
    g, gm = graph.graph, graph.gm
    compute = [n for n in g.nodes if n.op not in ("get_attr", "placeholder", "output")]
    first, second = _block_nodes(compute, f"{blocks}.0"), _block_nodes(compute, f"{blocks}.1")
    if compute.index(second[0]) != compute.index(first[-1]) + 1:
        raise NotReplicable(f"nodes outside the blocks run between {blocks}.0 and {blocks}.1")
    if _block_nodes(compute, f"{blocks}.2", required=False):
        raise NotReplicable(f"the two-block trace has a {blocks}.2")
    in_first = {n: k for k, n in enumerate(first)}
    in_second = {n: k for k, n in enumerate(second)}
    _match(first, second, in_first, in_second, blocks)
    for n in first:
        if any(u not in in_first and u not in in_second for u in n.users):
            raise NotReplicable(f"{n.name} of {blocks}.0 is read after {blocks}.1 (the epilogue "
                                "reads more than the last block)")
    attrs = [n for n in g.nodes if n.op == "get_attr" and n.target.startswith(f"{blocks}.1.")]
    if not attrs:
        raise NotReplicable(f"{blocks}.1 reads no parameters")
    if any(graph.attr(a).device.type != "meta" for a in attrs):
        raise NotReplicable(f"{blocks}.1 reads real tensors; copies would need their own values")
    readers_after = [(u, n) for n in second for u in n.users if u not in in_second]

    anchor, last_attr, previous = second[-1].next, attrs[-1], second
    for j in range(2, depth):
        rename = _renamer(blocks, j)
        env = {}
        for a in attrs:
            target = rename(a.target)
            _register_like(gm, target, graph.attr(a), is_parameter=_is_parameter(gm, a.target))
            with g.inserting_after(last_attr):
                env[a] = last_attr = g.get_attr(target)
            last_attr.meta = copy.copy(a.meta)
        stream = {n: previous[k] for n, k in in_first.items()}
        current = []
        with g.inserting_before(anchor):
            for n in second:
                new = g.node_copy(n, lambda a: env[a] if a in env else stream.get(a, a))
                stack = n.meta.get("nn_module_stack")
                if stack:
                    new.meta["nn_module_stack"] = {rename(k): (rename(p), c) for k, (p, c) in stack.items()}
                env[n] = new
                current.append(new)
        previous = current
    for user, n in readers_after:
        user.replace_input_with(n, previous[in_second[n]])
    g.lint()
    gm.recompile()
    return graph


def _block_nodes(compute: list[fx.Node], path: str, required: bool = True) -> list[fx.Node]:
    """The nodes of the block at `path`, which must run one after another."""
    positions = [i for i, n in enumerate(compute)
                 if any(p == path for p, _ in (n.meta.get("nn_module_stack") or {}).values())]
    if not positions:
        if required:
            raise NotReplicable(f"no node of {path} in the graph")
        return []
    if positions[-1] - positions[0] + 1 != len(positions):
        raise NotReplicable(f"nodes of {path} interleave with other nodes")
    return compute[positions[0]:positions[-1] + 1]


def _match(first, second, in_first, in_second, blocks: str) -> None:
    """Block 1 must compute what block 0 does: same targets and constants, and each input the
    same role: an own node at the same position, the same block-relative attribute, a shared
    node, or (block 0's input from before the blocks) one fixed node of block 0."""
    fed: dict[fx.Node, object] = {}   # block 0's inputs from before the blocks -> block 1's
    shared: set[fx.Node] = set()

    def role(a, own: dict, block: int):
        if a in own:
            return ("own", own[a])
        if a.op == "get_attr" and a.target.startswith(f"{blocks}.{block}."):
            return ("attr", a.target[len(f"{blocks}.{block}."):])
        if block == 1 and a in in_first:
            return ("from block 0", in_first[a])
        return ("shared", a)

    if len(first) != len(second):
        raise NotReplicable(f"{blocks}.0 has {len(first)} nodes, {blocks}.1 {len(second)}")
    for n0, n1 in zip(first, second):
        leaves0, spec0 = pytree.tree_flatten((n0.args, dict(n0.kwargs)))
        leaves1, spec1 = pytree.tree_flatten((n1.args, dict(n1.kwargs)))
        same = n0.op == n1.op and n0.target == n1.target and spec0 == spec1
        for a0, a1 in zip(leaves0, leaves1) if same else ():
            if not isinstance(a0, fx.Node) or not isinstance(a1, fx.Node):
                same = type(a0) is type(a1) and a0 == a1
            else:
                r0, r1 = role(a0, in_first, 0), role(a1, in_second, 1)
                if r1[0] == "from block 0" and r0[0] == "shared":
                    same = a0 not in shared and fed.setdefault(a0, r1) == r1
                else:
                    same = r0 == r1 and (r0[0] != "shared" or a0 not in fed)
                    if r0[0] == "shared":
                        shared.add(a0)
            if not same:
                break
        if not same:
            raise NotReplicable(f"{n1.name} of {blocks}.1 does not compute what {n0.name} of "
                                f"{blocks}.0 does")


def _renamer(blocks: str, j: int):
    pattern = re.compile(re.escape(f"{blocks}.1") + r"(?=\.|$)")
    return lambda s: pattern.sub(f"{blocks}.{j}", s)


def _is_parameter(gm: fx.GraphModule, name: str) -> bool:
    parent, _, leaf = name.rpartition(".")
    return leaf in gm.get_submodule(parent)._parameters


def _register_like(gm: fx.GraphModule, name: str, like: torch.Tensor, is_parameter: bool) -> None:
    """A meta tensor of like's shape and dtype at `name`, parents created as needed."""
    *parents, leaf = name.split(".")
    mod = gm
    for part in parents:
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    tensor = torch.empty_like(like, device="meta")
    if is_parameter:
        mod.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=like.requires_grad))
    else:
        mod.register_buffer(leaf, tensor)
