"""The gptq pass's per-block choice (QuantConfig.gptq_select_blocks): for each of the last N
decoder blocks, GPTQ's rounding or round-to-nearest, whichever brings the model's next-token
distribution closer to the float model's on the sequences held back from calibration.

GPTQ minimises every linear's own output error on the calibration inputs; near the head that
objective can disagree with the model's: on SmolLM2 W4A16, GPTQ lowers each block's KL to the float
model in 29 of 30 blocks, but block 28's is 2.3x RTN's (BENCHMARKS §2h). The choice is measured
where it matters, KL(float || model) at the logits, with the blocks before already rounded (as
chosen) and the blocks after still float, on data GPTQ never saw.
"""
from __future__ import annotations

import torch

from ..calibration.datasets import CalibrationDataError
from ..evaluation.metrics import position_metrics
from ..ir.graph import QuantGraph
from ..ir.quant_spec import dequantize, quantize, weight_qparams


class BlockChoice:
    """Built before the gptq pass rounds anything (the graph is still float, up to exact folds):
    holds the float logits of the held-back sequences."""

    def __init__(self, graph: QuantGraph, held_back: list | None, last_blocks: int, num_blocks: int,
                 observer: str):
        if not held_back:
            raise CalibrationDataError("gptq_select_blocks chooses on the sequences held back from "
                                       "calibration for the accuracy guard, and none were held back")
        self.graph, self.held_back, self.observer = graph, held_back, observer
        self.first_chosen_block = max(0, num_blocks - last_blocks)
        self.reference = [self._logits(ids) for ids in held_back]
        self.chosen: dict[str, str] = {}   # block name -> "gptq" | "rtn"
        self.kl: dict[str, dict[str, float]] = {}

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.graph(ids)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()

    def mean_kl(self) -> float:
        """Mean KL(float || graph) over the held-back sequences' positions."""
        total, count = 0.0, 0
        for ids, ref in zip(self.held_back, self.reference):
            got = self._logits(ids)
            kl = position_metrics(ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1]),
                                  ids.reshape(-1))["kl"]
            total, count = total + float(kl.sum()), count + kl.numel()
        return total / count

    def choose(self, block: int, name: str, linears: list, float_weights: dict) -> None:
        """After GPTQ rounded block `block`'s linears (float_weights: node -> its weight before),
        keep that rounding or replace it with round-to-nearest of the float weights, by KL."""
        if block < self.first_chosen_block:
            return
        graph = self.graph
        kl_gptq = self.mean_kl()
        gptq_state = {n: (graph.attr(n.args[1]), graph.annotation(n).weight_qparams) for n in linears}
        for n in linears:
            ann = graph.annotation(n)
            w = float_weights[n]
            scale, zero = weight_qparams(w.float(), ann.weight_spec, ann.clip_ratio, self.observer)
            graph.set_attr(n.args[1].target, dequantize(quantize(w.float(), ann.weight_spec, scale, zero),
                                                        w.dtype))
            graph.update_annotation(n, weight_qparams=(scale, zero))
        kl_rtn = self.mean_kl()
        self.kl[name] = {"gptq": kl_gptq, "rtn": kl_rtn}
        if kl_rtn < kl_gptq:
            self.chosen[name] = "rtn"
            return
        self.chosen[name] = "gptq"
        for n, (w, qparams) in gptq_state.items():
            graph.set_attr(n.args[1].target, w)
            graph.update_annotation(n, weight_qparams=qparams)

    def stats(self) -> dict:
        return {"rtn_blocks": sorted(k for k, v in self.chosen.items() if v == "rtn"),
                "chosen_kl": self.kl}
