"""gptq: Hessian-based sequential rounding (calibration/gptq.py holds the math), block by block.

The graph runs one segment (prologue, decoder block i, epilogue) at a time over all calibration
samples (calibration/sequential.py). For each segment holding quantized linears: run it observing
their inputs (Hessians), quantize them with GPTQ, then run it again so the next block sees the
outputs of the already-quantized block — the inputs of block i+1 come from quantized block i.
With QuantConfig.gptq_true_sequential the same holds inside a block: the linears are quantized in
stages of one shared input each (q/k/v, o, gate/up, down), each stage observed after the earlier
ones were quantized, so o_proj's Hessian sees the quantized q/k/v's attention output.
QuantConfig.sink_tokens leaves the first positions of every sequence out of the Hessians (off by
default; measured harmful on SmolLM2, see config/calibration.py); QuantConfig.gptq_sink_weight
instead weights that position in the Hessians of the linears reading the attention input (q/k/v).
QuantConfig.gptq_select_blocks lets each of the last blocks keep GPTQ's rounding or round-to-nearest,
by KL at the logits on the held-back sequences (gptq_block_choice.py). Peak memory is the inter-block cache plus one block's activations and Hessians.

GPTQ's scales are left on the annotation so convert rounds onto exactly the chosen grid.
"""
from __future__ import annotations

import resource

import torch
from ..calibration.datasets import CalibrationDataError
from ..calibration.gptq import HessianAccumulator, attention_mass, gptq_quantize, reconstruction_error
from ..calibration.sequential import SequentialRunner
from ..calibration.stats import past_sink
from ..ir.graph import QuantGraph
from ..config.calibration import ATTENTION_MASS
from ..errors import UnsupportedError
from ..ir.patterns import attention_inputs, sequence_source
from ..ir.quant_spec import dequantize, quantize, weight_qparams
from ..progress import track
from .gptq_block_choice import BlockChoice
from .manager import PassContext, PassResult, define_pass

ATEN = torch.ops.aten
# Fewer calibration rows than this many times a layer's input width gives a poorly conditioned
# Hessian; damping handles it, but the user is told rather than silently served a bad result.
MIN_ROWS_PER_INPUT = 1


@define_pass("gptq", "GPTQ weight rounding, sequential over decoder blocks", requires=("annotate",))
def gptq(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    if not ctx.calibration_batches:
        raise CalibrationDataError("GPTQ needs calibration data (its Hessians come from layer inputs); "
                                   "pass calibration_data=")
    runner = SequentialRunner(graph)
    caches = runner.start(ctx.calibration_batches, run_prologue=False)
    rss_before = _peak_rss_mb()
    sink_readers = sink_weighted_linears(graph, cfg)
    choice = (BlockChoice(graph, ctx.held_back_batches, cfg.gptq_select_blocks, runner.num_blocks,
                          cfg.weight_observer) if cfg.gptq_select_blocks else None)
    stats = {"layers": 0, "blocks": runner.num_blocks, "rtn_error": 0.0, "gptq_error": 0.0,
             "sink_weighted_layers": len(sink_readers)}
    for seg in track(range(len(runner.segments)), "gptq", unit="segment", note=runner.segment_name):
        targets = [n for n in runner.segments[seg] if n.target == ATEN.linear.default
                   and graph.annotation(n) is not None and graph.annotation(n).quantized]
        float_weights = {n: graph.attr(n.args[1]) for n in targets} if choice else {}
        for stage in (stages(targets) if cfg.gptq_true_sequential else [targets] if targets else []):
            shared, hooks = observe_hessians(graph, stage, cfg, sink_readers)
            runner.run_segment(seg, caches, hooks, commit=False)
            while shared:
                nodes, acc = shared.pop(0)
                quantize_linears(graph, nodes, acc, cfg, stats)
        if choice and targets and 1 <= seg <= runner.num_blocks:
            choice.choose(seg - 1, runner.segment_name(seg), targets, float_weights)
        runner.run_segment(seg, caches)
    if choice:
        stats.update(choice.stats())
    stats["peak_rss_mb"] = _peak_rss_mb()
    stats["peak_rss_growth_mb"] = round(stats["peak_rss_mb"] - rss_before, 1)
    return PassResult(graph, stats["layers"] > 0, stats)


def sink_weighted_linears(graph: QuantGraph, cfg) -> dict:
    """{linear: the attention it feeds} for the linears whose Hessians weight the sink position
    (QuantConfig.gptq_sink_weight): those reading an attention input; empty when the weight is 1."""
    if cfg.gptq_sink_weight == 1:
        return {}
    return {n: sdpa for sdpa, linears in attention_inputs(graph) for n in linears}


def observe_hessians(graph: QuantGraph, stage: list, cfg, sink_readers: dict) -> tuple[list, dict]:
    """([(the linears reading one input, their HessianAccumulator)], the run_segment hooks that
    fill them). Linears that read the same value (q/k/v, gate/up) share one Hessian: it is the
    same matrix, observed once. An attention reader is observed on its input's [batch, seq,
    features] form (GPT-2 flattens it before c_attn), where the sink is each sequence's first
    position. gptq_sink_weight="attention": that input waits for the attention op, whose hook
    weighs every row by the attention mass its position receives as a key."""
    by_mass = cfg.gptq_sink_weight == ATTENTION_MASS
    groups: dict = {}   # (input value, sink-weighted) -> linears
    for n in stage:
        groups.setdefault((n.args[0], n in sink_readers), []).append(n)
    shared = [(nodes, HessianAccumulator(
        graph.attr(nodes[0].args[1]).shape[1], f"input of {', '.join(graph.annotation(n).layer for n in nodes)}",
        cfg.gptq_row_energy_cap, cfg.gptq_sink_weight if weighted and not by_mass else 1.0))
        for (_, weighted), nodes in groups.items()]
    linears = set(stage)
    pending: dict = {}
    observers: dict = {}   # hooked node -> [fn(value)]
    for nodes, acc in shared:
        n = nodes[0]
        if n not in sink_readers:
            observers.setdefault(n, []).append(lambda x, acc=acc: acc.add(past_sink(x, cfg.sink_tokens)))
            continue
        source = sequence_source(n.args[0])
        if source is None:
            raise UnsupportedError(f"gptq_sink_weight: the input of {graph.annotation(n).layer} has no "
                                   "[batch, seq, features] form to find each sequence's first position in")
        observers.setdefault(n if source is n.args[0] else source, []).append(
            (lambda x, acc=acc: pending.__setitem__(acc, x)) if by_mass else (lambda x, acc=acc: acc.add(x)))
    # a linear's hook sees its input (args[0]); any other hooked node, its own output
    hooks = {node: (lambda node, args, out: [fn(args[0] if node in linears else out) for fn in observers[node]])
             for node in observers}
    if by_mass:
        readers: dict = {}
        for nodes, acc in shared:
            if nodes[0] in sink_readers:
                readers.setdefault(sink_readers[nodes[0]], []).append(acc)

        def add_by_mass(sdpa, args, out):
            mass = attention_mass(args[0], args[1], *_mask_and_causal(sdpa, args),
                                  scale=sdpa.kwargs.get("scale"))
            for acc in readers[sdpa]:
                acc.add(pending.pop(acc), mass)
        hooks.update((sdpa, add_by_mass) for sdpa in readers)
    return shared, hooks


def _mask_and_causal(sdpa, args) -> tuple:
    mask = args[3] if len(args) > 3 else sdpa.kwargs.get("attn_mask")
    if isinstance(mask, torch.fx.Node):
        raise UnsupportedError(f"gptq_sink_weight='attention': {sdpa.name} takes its attention mask as a "
                               "keyword the runner does not evaluate; supported: a positional mask")
    return mask, bool(args[5] if len(args) > 5 else sdpa.kwargs.get("is_causal", False))


def stages(targets: list) -> list[list]:
    """Linears grouped by the value they read, in graph order (q/k/v, then o, gate/up, down for a
    Llama block): each stage's Hessians come from a run after the earlier stages were quantized."""
    by_input: dict = {}
    for n in targets:
        by_input.setdefault(n.args[0], []).append(n)
    return list(by_input.values())


def quantize_linears(graph: QuantGraph, nodes: list, acc, cfg, stats: dict) -> None:
    """GPTQ-round the linears that share the Hessian `acc`. GPTQ treats every output row on its
    own given H, so linears whose weights use one per-channel or per-group format are rounded as
    one row-stacked matrix: one Cholesky and one column loop instead of one per linear."""
    hessian = acc.hessian
    for part in _same_format(graph, nodes):
        weights = [_own_weight(graph, n) for n in part]
        ann = graph.annotation(part[0])
        weight = torch.cat([w.float() for w in weights]) if len(part) > 1 else weights[0].float()
        what = f"weight of {', '.join(graph.annotation(n).layer for n in part)}"
        result = gptq_quantize(weight, hessian, ann.weight_spec, block_size=cfg.gptq_block_size,
                               damp=cfg.gptq_damp, act_order=cfg.gptq_act_order,
                               static_groups=cfg.gptq_static_groups, clip_ratio=ann.clip_ratio,
                               min_samples=MIN_ROWS_PER_INPUT * weight.shape[1], n_samples=acc.n,
                               observer=cfg.weight_observer, what=what)
        scale, zero_point = weight_qparams(weight, ann.weight_spec, ann.clip_ratio, cfg.weight_observer)
        rtn = dequantize(quantize(weight, ann.weight_spec, scale, zero_point))
        stats["rtn_error"] += reconstruction_error(weight, rtn, hessian)
        stats["gptq_error"] += reconstruction_error(weight, result.dequantized.float(), hessian)
        stats["layers"] += len(part)
        q_scale, q_zero = result.qtensor.scale, result.qtensor.zero_point
        row = 0
        for node, w in zip(part, weights):
            rows = slice(row, row + w.shape[0])
            row += w.shape[0]
            # clones: a row slice would share the stacked tensor's storage (safetensors refuses that)
            graph.set_attr(node.args[1].target, result.dequantized[rows].to(w.dtype).clone())
            graph.update_annotation(node, weight_qparams=(q_scale[rows].clone(),
                                                          None if q_zero is None else q_zero[rows].clone()))


def _same_format(graph: QuantGraph, nodes: list) -> list[list]:
    """The linears in runs that can be row-stacked: one weight spec, clip ratio and dtype, with
    scales per row (a per-tensor scale would be shared across the stacked weights)."""
    parts: dict = {}
    for n in nodes:
        ann, w = graph.annotation(n), graph.attr(n.args[1])
        stackable = ann.weight_spec.granularity in ("per_channel", "per_group")
        key = (ann.weight_spec, ann.clip_ratio, w.dtype) if stackable else n
        parts.setdefault(key, []).append(n)
    return list(parts.values())


def _own_weight(graph: QuantGraph, node) -> torch.Tensor:
    w_node = node.args[1]
    readers = [n for n in graph.graph.nodes if n.op == "get_attr" and n.target == w_node.target
               for _ in n.users]
    if len(readers) > 1:
        raise ValueError(f"GPTQ would rewrite the weight {w_node.target} of {graph.annotation(node).layer}, "
                         "which other ops also read (tied embeddings?); keep that layer in QuantConfig.ignore")
    return graph.attr(w_node).detach()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
