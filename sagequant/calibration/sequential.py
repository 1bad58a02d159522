"""Sequential, memory-bounded execution of a QuantGraph: one decoder block at a time over all
calibration samples, caching between blocks only the values later blocks read.

Decoder blocks are found from the graph, not from a per-architecture table: they are the
repeated modules `<prefix>.<i>` of one class (model.layers.0, model.layers.1, ... for Llama-style
models; transformer.h.0, ... for GPT-2). Nodes are grouped into segments — prologue (embedding,
rotary tables, masks), one segment per block, epilogue — and a pass can act between segments,
e.g. GPTQ quantizes block i before block i+1 sees its output, so peak memory is about one block's
activations for all samples plus the inter-block cache, not the whole model's.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from ..ir.graph import QuantGraph
from ..ir.trace import WRAPPER_PREFIX
from ..errors import CompileError

_INDEXED = re.compile(r"^(.*)\.(\d+)$")


class SequentialError(CompileError):
    """Layer-wise calibration cannot split the graph into blocks or run one."""


def decoder_block_prefixes(graph: QuantGraph) -> list[str]:
    """Module paths of the repeated blocks, in index order (wrapper prefix included)."""
    by_parent: dict[str, dict[int, str]] = defaultdict(dict)
    for node in graph.graph.nodes:
        for path, cls in (node.meta.get("nn_module_stack") or {}).values():
            m = _INDEXED.match(path)
            if m:
                by_parent[m.group(1)][int(m.group(2))] = cls if isinstance(cls, str) else cls.__name__
    best: list[str] = []
    for parent, members in by_parent.items():
        if len(members) >= 2 and len(set(members.values())) == 1 and len(members) > len(best):
            best = [f"{parent}.{i}" for i in sorted(members)]
    return best


def _block_of(node: fx.Node, index: dict[str, int]) -> int | None:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if path in index:
            return index[path]
    return None


class SequentialRunner:
    """device: where segments run (the samples' ids go there). offload_cache: the values kept
    between segments wait in CPU memory and come to the device one sample at a time, for
    activation caches larger than the device memory."""

    def __init__(self, graph: QuantGraph, device: torch.device | str | None = None,
                 offload_cache: bool = False):
        self.graph = graph
        self.device = torch.device(device) if device is not None else None
        self.offload_cache = offload_cache
        prefixes = decoder_block_prefixes(graph)
        if not prefixes:
            raise SequentialError("no repeated decoder blocks found in the graph (no module path "
                                  "<parent>.<i> repeated with one class); sequential calibration "
                                  "needs a block-structured model")
        self.block_names = [p[len(WRAPPER_PREFIX):] if p.startswith(WRAPPER_PREFIX) else p for p in prefixes]
        index = {p: i for i, p in enumerate(prefixes)}
        # segment 0: prologue, 1..B: blocks, B+1: epilogue
        self.segments: list[list[fx.Node]] = [[] for _ in range(len(prefixes) + 2)]
        current, last = 0, len(prefixes)
        for node in graph.graph.nodes:
            if node.op in ("output", "get_attr", "placeholder"):
                continue
            b = _block_of(node, index)
            if b is not None:
                if b + 1 < current:
                    raise SequentialError(f"node {node.name} of block {b} comes after segment "
                                          f"{current} started; blocks interleave")
                current = b + 1
            elif current == last and node.meta.get("nn_module_stack"):
                current = last + 1  # a module outside the blocks after the last one: epilogue
            self.segments[current].append(node)
        self.placeholders = [n for n in graph.graph.nodes if n.op == "placeholder"]
        seg_of = {n: s for s, nodes in enumerate(self.segments) for n in nodes}
        # Last segment that reads each value: after it, the value leaves the cache. The graph's
        # output (the logits) is no reader here: calibration never needs it, and keeping it for
        # every sample would cost samples x tokens x vocab floats.
        self.last_use = {n: max((seg_of[u] for u in n.users if u in seg_of), default=seg_of[n])
                         for n in seg_of}

    def adopt(self, seg: int, new_nodes: list[fx.Node]) -> None:
        """Nodes a pass inserted into segment `seg` (e.g. convert's dequantize nodes) run with it."""
        added = {n for n in new_nodes if n.op not in ("get_attr", "placeholder", "output")}
        members = set(self.segments[seg]) | added
        self.segments[seg] = [n for n in self.graph.graph.nodes if n in members]
        for n in added:
            self.last_use[n] = seg

    @property
    def num_blocks(self) -> int:
        return len(self.segments) - 2

    def segment_name(self, seg: int) -> str:
        """What segment `seg` holds, for progress displays: prologue, a block's path, epilogue."""
        if seg == 0:
            return "prologue"
        return self.block_names[seg - 1] if seg <= self.num_blocks else "epilogue"

    def start(self, batches: list[torch.Tensor], run_prologue: bool = True) -> list[dict]:
        """One value cache per sample, after the prologue (segment 0) unless run_prologue=False."""
        if not batches:
            raise SequentialError("no calibration batches to run")
        caches = [{self.placeholders[0]: b if self.device is None else b.to(self.device)}
                  for b in batches]
        if run_prologue:
            self.run_segment(0, caches)
        return caches

    def run_block(self, block: int, caches: list[dict],
                  hooks: dict[fx.Node, Callable[[fx.Node, tuple, torch.Tensor], None]] | None = None) -> None:
        """Run block `block` for every sample, calling hooks[node](node, args, out) per sample."""
        self.run_segment(block + 1, caches, hooks or {})

    def run_segment(self, seg: int, caches: list[dict], hooks: dict | None = None,
                    commit: bool = True, only_hooked: bool = False) -> None:
        """Run segment `seg` over every sample's cache. commit=False only observes (hooks fire,
        the caches stay as they were), so the segment can run again after its weights change;
        only_hooked (with commit=False) computes just what the hooked nodes need."""
        hooks = hooks or {}
        if only_hooked and commit:
            raise SequentialError("run_segment(only_hooked=True) leaves the segment's outputs "
                                  "uncomputed: it needs commit=False")
        nodes = self._live_nodes(seg, hooks, only_hooked)
        with torch.inference_mode():
            # Values that depend on no sample (a quantized weight's dequantize_weight, say) are
            # computed once for all samples, not once per sample: the same op on the same inputs.
            shared: dict = {}
            for node in self._sample_independent(nodes, hooks):
                shared[node] = self._call(node, lambda n: shared[n] if n in shared else self._value(n, {}))
            for original in caches:
                cache = original if commit else dict(original)
                for node in nodes:
                    if node in shared:
                        cache[node] = shared[node]
                        continue
                    out, args = self._call(node, lambda n: self._value(n, cache), with_args=True)
                    if node in hooks:
                        hooks[node](node, args, out)
                    cache[node] = out
                if commit:
                    for n in [n for n in cache if self.last_use.get(n, -1) <= seg and n.op != "placeholder"]:
                        del cache[n]
                    if self.offload_cache:
                        for n in cache:
                            cache[n] = tree_map(lambda v: v.cpu() if isinstance(v, torch.Tensor) else v,
                                                cache[n])

    def _call(self, node: fx.Node, value, with_args: bool = False):
        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "call_module":
            out = self.graph.gm.get_submodule(node.target)(*args, **kwargs)
        else:
            out = node.target(*args, **kwargs)
        return (out, args) if with_args else out

    @staticmethod
    def _sample_independent(nodes: list[fx.Node], hooks: dict) -> list[fx.Node]:
        """The call_function nodes (in order) whose inputs are all weights or such nodes; a hooked
        node stays per sample (its hook sees every sample)."""
        found: set = set()
        for node in nodes:
            if node.op == "call_function" and node not in hooks and all(
                    a.op == "get_attr" or a in found for a in node.all_input_nodes):
                found.add(node)
        return [n for n in nodes if n in found]

    def _live_nodes(self, seg: int, hooks: dict, only_hooked: bool = False) -> list[fx.Node]:
        """The nodes of segment `seg` whose value a hook or (unless only_hooked) a later segment
        reads, with what they need: the rest (the epilogue's logits unless the head is hooked) is
        never computed."""
        nodes = self.segments[seg]
        live = {n for n in nodes if n in hooks or (not only_hooked and self.last_use[n] > seg)}
        for node in reversed(nodes):
            if node in live:
                live.update(a for a in node.all_input_nodes if a.op not in ("get_attr", "placeholder"))
        return [n for n in nodes if n in live]

    def _value(self, node: fx.Node, cache: dict):
        if node.op == "get_attr":
            return self.graph.attr(node)  # read now: a pass may have replaced the weight
        try:
            value = cache[node]
        except KeyError:
            raise SequentialError(f"value of {node.name} is not cached: it was freed or never computed "
                                  "(segment order broken)") from None
        if self.offload_cache and self.device is not None:
            value = tree_map(lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, value)
        return value
