"""Measure the weight-only linears of an engine's step graph on its GPU and install the fastest
path per M bucket (backends/cuda/measure_paths.py times them, measured_dispatch.py keeps the choice), once per distinct weight key.

The buckets are the Ms the engine runs: its decode batch buckets (CUDA graphs pad to those) and
powers of two up to the prefill chunk (a prompt of M tokens runs the choice of the next bucket
up). The returned rows are the engine's record of what runs where (`engine.kernel_choices`): a
linear that could not be measured says why ("skipped" / "error") and keeps the M thresholds.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from ..backends.cuda import kernels  # noqa: F401  (registers the CUDA linear ops)
from ..backends.cuda import measured_dispatch
from ..ir.graph import QuantGraph
from ..ir.quant_spec import QuantSpec

WEIGHT_ONLY = torch.ops.sagequant.cuda_weight_only_linear.default


def m_buckets(decode_sizes, prefill_chunk: int) -> list[int]:
    prefill = [2 ** i for i in range(max(prefill_chunk - 1, 1).bit_length() + 1)
               if 2 ** i <= prefill_chunk]
    return sorted({*decode_sizes, *prefill, prefill_chunk})


def _stored(node) -> bool:
    return node is None or (isinstance(node, fx.Node) and node.op == "get_attr")


def measure_linears(graph: QuantGraph, ms: list[int], dtype: torch.dtype) -> list[dict]:
    """One row per distinct (spec, [N, K], zero points) weight-only linear: its measured rows
    (measured once per process and device: a later engine reuses them)."""
    done: dict[tuple, dict] = {}
    out: list[dict] = []
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target is not WEIGHT_ONLY:
            continue
        _, qw, sc, zp, _, spec_text, shape = node.args[:7]
        spec = QuantSpec.decode(spec_text)
        record = {"weight": getattr(qw, "target", str(qw)), "spec": spec.describe(),
                  "shape": list(shape), "layers": 1}
        if not all(_stored(n) for n in (qw, sc, zp)):   # e.g. double-quantized NF4 scales
            out.append({**record, "skipped": "weight operands are computed in the graph"})
            continue
        qweight, scales = graph.attr(qw), graph.attr(sc)
        zeros = graph.attr(zp) if zp is not None else None
        k = measured_dispatch.key(qweight.device, spec, shape, zeros is not None, dtype)
        if k in done:
            done[k]["layers"] += 1
            continue
        rows = measured_dispatch.measured(k, ms)   # another engine of this process measured it
        try:
            if rows is None:
                rows = measure_weight(qweight, scales, zeros, spec, list(shape), dtype, ms)
                measured_dispatch.install(k, rows)
            done[k] = {**record, "rows": rows}
        except Exception as err:  # recorded: this weight keeps the M thresholds' paths
            done[k] = {**record, "error": f"{type(err).__name__}: {err}"[:500]}
            warnings.warn(f"measuring the weight-only paths of {record['weight']} "
                          f"({record['spec']} {record['shape']}) failed; it runs the M "
                          f"thresholds' paths: {done[k]['error']}", stacklevel=2)
        out.append(done[k])
    return out


def measure_weight(qweight, scales, zeros, spec, shape, dtype, ms) -> list[dict]:
    """The kernels' timings of one weight (backends/cuda/measure_paths.py; it imports triton, so
    only where a GPU measures)."""
    from ..backends.cuda.measure_paths import measure
    return measure(qweight, scales, zeros, spec, shape, dtype, ms)
