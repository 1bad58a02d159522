"""fold_fake_quant: after QAT, turn each trained FakeQuantLinear back into
`aten.linear(x, get_attr W, get_attr b)` with the trained weight and hand its quantization
parameters to convert: the weight's (learned or last observed) scales as `weight_qparams`, the
static activation scale as the input CalibrationRecord. convert, lower and schedule then build
the same static graph, kernels and artifact as PTQ, on exactly the grid training used.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..calibration.fake_quant import FakeQuantLinear
from ..ir.graph import QuantGraph
from .manager import PassContext, PassResult, define_pass

ATEN = torch.ops.aten


@define_pass("fold_fake_quant", "QAT: trained FakeQuantLinear modules -> linears + their qparams",
               requires=("fake_quant",))
def fold_fake_quant(graph: QuantGraph, ctx: PassContext) -> PassResult:
    folded = 0
    for node in [n for n in graph.graph.nodes if n.op == "call_module"]:
        module = graph.gm.get_submodule(node.target)
        ann = graph.annotation(node)
        if ann is None:
            continue
        if not isinstance(module, FakeQuantLinear):
            raise RuntimeError(f"{ann.layer}: expected a FakeQuantLinear, found {type(module).__name__}"
                               " (LoRA adapters must be merged before fold_fake_quant: "
                               "merge_and_unload)")
        _fold(graph, node, module, ann)
        folded += 1
    graph.recompile()
    return PassResult(graph, folded > 0, {"folded": folded})


def _fold(graph: QuantGraph, node, module: FakeQuantLinear, ann) -> None:
    path = node.target
    graph.gm.set_submodule(path, torch.nn.Module())
    graph.set_attr(f"{path}.weight", module.weight.detach().clone())
    if module.bias is not None:
        graph.set_attr(f"{path}.bias", module.bias.detach().clone())
    with graph.graph.inserting_before(node):
        weight = graph.graph.get_attr(f"{path}.weight")
        args = (node.args[0], weight)
        if module.bias is not None:
            args += (graph.graph.get_attr(f"{path}.bias"),)
        linear = graph.graph.call_function(ATEN.linear.default, args)
    linear.meta.update(node.meta)
    node.replace_all_uses_with(linear)
    graph.graph.erase_node(node)
    calibration = ann.calibration
    fq = module.input_fq
    if fq is not None and not fq.spec.dynamic:
        # convert derives the static scale as clip / qmax; record the trained scale that way.
        scale = float(fq.stored_qparams()[0])
        calibration = {**calibration, "input": replace(  # fake_quant started from the calibrated one
            calibration["input"], scale=scale, clip=scale * fq.spec.fmt.qmax,
            observer="qat_lsq" if fq.learns_scale else "qat_moving_average")}
    graph.update_annotation(linear, weight_qparams=module.weight_fq.stored_qparams(), calibration=calibration)
