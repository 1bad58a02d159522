"""calibrate: run the calibration batches through the observed graph, turn every observer into a
CalibrationRecord on its consumer's annotation, then remove the observers.

Static activation scales are derived from these records, so then every batch is observed. When no
scale depends on them (weight-only or dynamic per-token schemes) the records only document the
ranges for reports, and the first RANGE_ONLY_BATCHES batches are enough: the algorithms that need
the full data (SmoothQuant, AWQ, GPTQ) collect their own statistics. Each record's num_samples
says how many batches it saw.
"""
from __future__ import annotations

import torch
from ..calibration.datasets import CalibrationDataError
from ..ir.graph import QuantGraph
from ..progress import track
from .insert_observers import observer_nodes
from .manager import PassContext, PassResult, define_pass


RANGE_ONLY_BATCHES = 4


@define_pass("calibrate", "run calibration data through observers and fill CalibrationRecords",
               requires=("insert_observers",))
def calibrate(graph: QuantGraph, ctx: PassContext) -> PassResult:
    observers = observer_nodes(graph)
    batches = ctx.calibration_batches
    static = [graph.annotation(n).layer for n in graph.annotated()
              if graph.annotation(n).input_spec is not None and not graph.annotation(n).input_spec.dynamic]
    if batches is None and static:
        raise CalibrationDataError(
            f"static activation scales ({len(static)} layers, e.g. {static[0]}) need calibration "
            "data: pass calibration_data= (texts with a tokenizer, token tensors, or a dataset "
            "path), or use QuantConfig.activation_scale='dynamic_per_token'")
    tokens, observed = 0, []
    if batches is not None:
        if len(batches) == 0:
            raise CalibrationDataError("calibration data is empty: no batches to calibrate on")
        observed = batches if static else batches[:RANGE_ONLY_BATCHES]
        with torch.inference_mode():
            for batch in track(observed, "calibrate", unit="batch"):
                graph.gm(batch)
                tokens += batch.numel()
    records = 0
    for obs_node in observers:
        consumer = next(iter(obs_node.users))
        ann = graph.annotation(consumer)
        if batches is not None:
            observer = graph.gm.get_submodule(obs_node.target)
            graph.update_annotation(consumer, calibration={
                **ann.calibration, "input": observer.record("input", ann.clip_ratio)})
            records += 1
        obs_node.replace_all_uses_with(obs_node.args[0])
        graph.graph.erase_node(obs_node)
        graph.gm.delete_submodule(obs_node.target)
    graph.recompile()
    return PassResult(graph, bool(observers), {"records": records, "batches": len(batches or []),
                                               "observed_batches": len(observed) if batches else 0,
                                               "tokens": tokens})
