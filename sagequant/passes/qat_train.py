"""qat_train: train the FakeQuant graph that fake_quant made (calibration/qat.py does the
training: LoRA adapters and/or LSQ scales, merged back at the end), so fold_fake_quant and the
PTQ passes from convert on lower exactly what was trained. The training windows, the teacher
(the float model, for the distillation loss) and the QATOptions come in PassContext.training."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.qat import QATOptions, train_fake_quant_graph
from ..ir.graph import QuantGraph
from .manager import PassContext, PassResult, define_pass


@dataclass(frozen=True)
class QATTraining:
    windows: torch.Tensor                 # [n, seq_len] token windows
    teacher: torch.nn.Module | None       # the float model for loss="distill", else None
    options: QATOptions


@define_pass("qat_train", "QAT: train the FakeQuant graph (LoRA / LSQ), adapters merged back",
               requires=("fake_quant",))
def qat_train(graph: QuantGraph, ctx: PassContext) -> PassResult:
    training = ctx.training
    if not isinstance(training, QATTraining):
        raise ValueError("qat_train needs PassContext.training=QATTraining(windows, teacher, options); "
                         "api.quantization_aware_training builds it")
    stats = train_fake_quant_graph(graph.gm, training.teacher, training.windows, training.options)
    return PassResult(graph, True, stats)
