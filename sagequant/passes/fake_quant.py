"""fake_quant: for QAT (QuantConfig.enable_qat), turn every quantized linear into a
FakeQuantLinear module — FakeQuant on its weight and, when the annotation quantizes activations,
on its input — read from the same QuantSpecs that convert will use.

Each `aten.linear(x, get_attr W, get_attr b)` becomes `call_module[<layer path>](x)`; the module
sits where W's holder sat (model.model.layers.0.self_attn.q_proj), so the graph keeps the
model's layer names and peft can target the layers by them. Initial scales are what PTQ would
use: round-to-nearest of W (or GPTQ's chosen qparams), the calibrated static activation scale.
`fold_fake_quant` turns the trained modules back into linears before convert.
"""
from __future__ import annotations

import torch

from ..calibration.fake_quant import FakeQuantize, FakeQuantLinear
from ..ir.graph import QuantGraph
from ..ir.quant_spec import compute_qparams
from .convert import static_input_scale, storage_prefix
from .manager import PassContext, PassResult, define_pass

ATEN = torch.ops.aten
# Static activation observers average per-batch ranges; weights track the weight exactly.
ACTIVATION_AVERAGING = 0.01


@define_pass("fake_quant", "QAT: quantized linears -> FakeQuantLinear modules (STE, optional LSQ)",
               requires=("annotate",))
def fake_quant(graph: QuantGraph, ctx: PassContext) -> PassResult:
    cfg = ctx.config
    inserted = learned = 0
    # Linears reading one tensor with one activation spec share its FakeQuant (q/k/v, gate/up), as
    # they share one calibrated scale in PTQ: one quantization of the tensor, fusable into its norm.
    shared_inputs: dict = {}
    for node in graph.annotated():
        ann = graph.annotation(node)
        if not ann.quantized or node.target != ATEN.linear.default:
            continue
        path = _holder_path(graph, node, ann.layer)
        weight = graph.attr(node.args[1]).detach()
        bias = node.args[2] if len(node.args) > 2 else None
        bias_value = graph.attr(bias).detach() if bias is not None else None
        if ann.weight_qparams is not None:  # GPTQ chose the grid: start QAT from it
            scale, zero_point = ann.weight_qparams
            ann = graph.update_annotation(node, weight_qparams=None)
        else:
            scale, zero_point = compute_qparams(weight, ann.weight_spec, ann.clip_ratio,
                                                f"weight of {ann.layer}")
        weight_fq = FakeQuantize(ann.weight_spec, scale, zero_point, cfg.qat_learn_scales,
                                 clip_ratio=ann.clip_ratio, what=f"weight of {ann.layer}")
        key = (node.args[0], ann.input_spec, ann.clip_ratio)
        if ann.input_spec is not None and key not in shared_inputs:
            shared_inputs[key] = _input_fake_quant(ann, cfg)
            learned += shared_inputs[key].learns_scale
        module = FakeQuantLinear(weight, bias_value, weight_fq, shared_inputs.get(key))
        graph.gm.set_submodule(path, module)
        with graph.graph.inserting_before(node):
            call = graph.graph.call_module(path, (node.args[0],))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        graph.graph.erase_node(node)
        inserted += 1
        learned += weight_fq.learns_scale
    # Not graph.recompile(): it drops attributes no get_attr reads, and the weights now live in
    # the FakeQuantLinear modules.
    graph.graph.eliminate_dead_code()
    graph.graph.lint()
    graph.gm.recompile()
    return PassResult(graph, inserted > 0, {"fake_quant_linears": inserted, "learned_scales": learned,
                                            "shared_input_fake_quants": len(shared_inputs)})


def _holder_path(graph: QuantGraph, node, layer: str) -> str:
    """The module path holding the linear's weight, checked to hold nothing else and be read once."""
    w_node = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if bias is not None and getattr(bias, "op", None) != "get_attr":
        raise ValueError(f"QAT: the bias of {layer} is computed in the graph, not a parameter; "
                         "keep that layer in QuantConfig.ignore")
    path = storage_prefix(w_node.target)
    readers = [user for n in graph.graph.nodes if n.op == "get_attr" and n.target == w_node.target
               for user in n.users]
    if readers != [node]:
        raise ValueError(f"QAT would train the weight {w_node.target} of {layer}, which other ops "
                         "also read (tied embeddings?); keep that layer in QuantConfig.ignore")
    holder = graph.gm.get_submodule(path)
    extra = set(holder._parameters) | set(holder._buffers) | set(holder._modules)
    if extra - {"weight", "bias"}:
        raise ValueError(f"QAT: the module {path} holding the weight of {layer} also holds "
                         f"{sorted(extra - {'weight', 'bias'})}; only a plain linear can be replaced")
    return path


def _input_fake_quant(ann, cfg) -> FakeQuantize:
    spec = ann.input_spec
    what = f"input of {ann.layer}"
    if spec.dynamic:
        return FakeQuantize(spec, None, None, clip_ratio=ann.clip_ratio, what=what)
    scale = static_input_scale(ann, "QAT's static activation scale (it starts from calibration)")
    return FakeQuantize(spec, scale, None, cfg.qat_learn_scales, averaging=ACTIVATION_AVERAGING,
                        clip_ratio=ann.clip_ratio, what=what)
