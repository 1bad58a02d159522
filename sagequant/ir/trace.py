"""Frontend: a Hugging Face causal LM -> QuantGraph via torch.export (dynamic batch and sequence)."""
from __future__ import annotations

import inspect
import sys
import traceback

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

from .graph import QuantGraph
from ..errors import UnsupportedError

# The exported module holds the model under this attribute; layer names drop the prefix.
WRAPPER_PREFIX = "model."


class TraceError(UnsupportedError, RuntimeError):
    """The model could not be captured as a graph; the message names the module and op at fault."""


class _LogitsOnly(torch.nn.Module):
    """Exports the logits path only: no KV cache objects, so the graph is a pure function of ids
    (and of explicit position ids, which the model then uses for rotary / learned positions)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def _accepts_position_ids(model: torch.nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def trace_model(model: torch.nn.Module, example_seq_len: int = 8) -> QuantGraph:
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module (a transformers causal LM), got {type(model).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "vocab_size"):
        raise TraceError(f"{type(model).__name__} has no transformers config with vocab_size; "
                         "sagequant traces causal LMs that take input_ids and return .logits")
    model.eval()
    # Example inputs live where the weights do; on the meta device (weights not loaded) export
    # only propagates shapes, so tracing needs no weight memory on any device.
    device = next(iter(model.parameters()), torch.empty(0)).device
    example = torch.randint(0, min(int(config.vocab_size), 1000), (2, example_seq_len), device=device)
    args, dims = (example,), ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)
    with_positions = _accepts_position_ids(model)
    if with_positions:
        args += (torch.arange(example_seq_len, device=device).expand(2, -1).contiguous(),)
        dims += ({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)
    try:
        with torch.no_grad():
            exported = torch.export.export(_LogitsOnly(model), args, dynamic_shapes=dims, strict=False)
    except Exception as e:
        raise TraceError(_explain_failure(e, model)) from e
    gm = _plain_graph_module(exported.module())
    # Export bakes the trace device into arange / to / metadata-assert nodes; graphs are kept
    # on CPU (a meta trace included) and retargeted where they run.
    retarget_device(gm, torch.device("cpu"))
    positions = _default_positions(gm) if with_positions else None
    info = {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "vocab_size": int(config.vocab_size),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "hf_config": config.to_dict() if hasattr(config, "to_dict") else {},
        # The node holding positions 0..seq-1 [batch, seq]: runtime/kv_cache makes it an input.
        "position_ids_node": positions,
        "trace": "full",   # ir/replicate.py's shortcut says "replicated"
    }
    return QuantGraph(gm, info)


def retarget_device(gm: fx.GraphModule, device: torch.device) -> None:
    """Every device constant in the graph's node arguments becomes `device`."""
    swap = lambda a: device if isinstance(a, torch.device) else a  # noqa: E731
    changed = False
    for node in gm.graph.nodes:
        args, kwargs = pytree.tree_map(swap, node.args), pytree.tree_map(swap, dict(node.kwargs))
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs, changed = args, kwargs, True
    if changed:
        gm.recompile()


def _default_positions(gm: fx.GraphModule) -> str:
    """Replace the position_ids placeholder by positions computed from input_ids (0..seq-1 on
    every row, on input_ids' device), so the graph keeps its forward(input_ids) signature and
    the KV-cache pass finds one node to turn back into an input. Returns that node's name."""
    graph = gm.graph
    ids, placeholder = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholder):
        ones = graph.call_function(torch.ops.aten.ones_like.default, (ids,))
    with graph.inserting_after(ones):
        cumsum = graph.call_function(torch.ops.aten.cumsum.default, (ones, 1))
    with graph.inserting_after(cumsum):
        positions = graph.call_function(torch.ops.aten.sub.Tensor, (cumsum, 1))
    placeholder.replace_all_uses_with(positions)
    graph.erase_node(placeholder)
    gm.recompile()
    # Export's input check (a forward pre-hook) compares calls with the traced signature.
    if hasattr(gm, "_in_spec"):
        gm._in_spec = pytree.tree_flatten(((ids.meta.get("val"),), {}))[1]
    return positions.name


def _plain_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop export's pytree calling convention and shape-guard module: forward(input_ids) -> logits."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    while isinstance(result, (list, tuple)) and len(result) == 1:
        result = result[0]
    out.args = (result,)
    graph._codegen = fx.graph.CodeGen()
    gm.recompile()
    return gm


def _explain_failure(exc: Exception, model: torch.nn.Module) -> str:
    """Name the innermost model module executing when export failed, and the failing op/line."""
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    culprit = None
    frame_line = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        self_obj = frame.f_locals.get("self")
        if isinstance(self_obj, torch.nn.Module) and id(self_obj) in names:
            culprit = f"{names[id(self_obj)]} ({type(self_obj).__name__})"
            frame_line = f"{frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}"
    first_line = (str(exc).strip().splitlines() or [""])[0][:400]
    where = f" in module {culprit} at {frame_line}" if culprit else ""
    return (f"torch.export could not trace {type(model).__name__}{where}: "
            f"{type(exc).__name__}: {first_line}\n"
            "What to do: make sure the model runs with use_cache=False on input_ids alone; replace "
            "data-dependent Python control flow or unsupported ops in that module (or register them "
            "as torch custom ops); try attn_implementation='sdpa' or 'eager'. "
            f"(torch {torch.__version__}, python {sys.version.split()[0]})")


def layer_name(node: fx.Node) -> str | None:
    """Module path of the module that emitted node, without the export wrapper's prefix."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path[len(WRAPPER_PREFIX):] if path.startswith(WRAPPER_PREFIX) else path
