"""Data-parallel calibration over torch.distributed: every rank runs its share of the samples
through each block; the statistics algorithms decide from are combined across ranks, so every
rank takes the same decisions and holds the same quantized weights.

What is combined: GPTQ Hessians (sums weighted by rows), activation absmax (max), mean |x|
(sum and count), the sampled rows AWQ / SmoothQuant search on (gathered in rank order), and
min/max observer ranges. Observers whose state is not a reduction (percentile, histogram, MSE,
moving average) are refused under data parallelism. The process group is the caller's
(`torch.distributed.init_process_group`, e.g. under torchrun: gloo on CPU, NCCL on GPUs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedError

REDUCIBLE_OBSERVERS = ("minmax",)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(items: list) -> list:
    """This rank's share: every world-size-th item from its rank on."""
    rank, size = world()
    return items[rank::size]


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """All-reduce t in place where the backend wants it (NCCL: on this rank's GPU)."""
    import torch.distributed as dist
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        moved = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(moved, op=op)
        return t.copy_(moved.cpu())
    dist.all_reduce(t, op=op)
    return t


@dataclass
class MergedHessian:
    """What passes.gptq.quantize_linears reads of a HessianAccumulator: the Hessian and its row count."""

    hessian: torch.Tensor
    n: int


def merge_hessian(acc) -> MergedHessian:
    """H over all ranks' rows: Σ_r n_r H_r / Σ_r n_r (H is an average of 2 x xᵀ over rows)."""
    import torch.distributed as dist
    h = acc.hessian * acc.n
    n = _all_reduce(torch.tensor([float(acc.n)], dtype=torch.float64, device=h.device), dist.ReduceOp.SUM)
    return MergedHessian(_all_reduce(h, dist.ReduceOp.SUM) / n, int(n.item()))


def merge_accumulator(acc) -> None:
    """Combine a calibration.stats accumulator in place: absmax max, |x| sums and counts summed,
    sampled (and sink) rows gathered in rank order (identical on every rank)."""
    import torch.distributed as dist
    acc.absmax = _all_reduce(acc.absmax.clone(), dist.ReduceOp.MAX)
    acc.abs_sum = _all_reduce(acc.abs_sum.clone(), dist.ReduceOp.SUM)
    acc.count = int(_all_reduce(torch.tensor([float(acc.count)], dtype=torch.float64,
                                             device=acc.absmax.device), dist.ReduceOp.SUM).item())
    if acc.per_batch:
        acc.rows = _gather_rows(acc.rows, acc.absmax.device)
    if acc.keep_sink:
        acc.positions = int(_all_reduce(torch.tensor([float(acc.positions)], dtype=torch.float64,
                                                     device=acc.absmax.device), dist.ReduceOp.SUM).item())
        acc.sink_rows = _gather_rows(acc.sink_rows, acc.absmax.device)


def _gather_rows(rows: list, device) -> list:
    """Every rank's list of row tensors, concatenated in rank order."""
    import torch.distributed as dist
    gathered: list = [None] * world()[1]
    dist.all_gather_object(gathered, [r.cpu() for r in rows])
    return [r.to(device) for part in gathered for r in part]


def merge_observer(observer) -> None:
    """min/max observers: the range over all ranks' samples."""
    import torch.distributed as dist
    if observer.kind not in REDUCIBLE_OBSERVERS:
        raise UnsupportedError(f"observer {observer.kind!r} cannot be combined across data-parallel "
                               f"ranks; use one of {REDUCIBLE_OBSERVERS} or one process")
    t = torch.tensor([-observer.min, observer.max], dtype=torch.float64)
    _all_reduce(t, dist.ReduceOp.MAX)
    observer.min, observer.max = -float(t[0]), float(t[1])
    counts = _all_reduce(torch.tensor([observer.batches, observer.values], dtype=torch.float64),
                         dist.ReduceOp.SUM)
    observer.batches, observer.values = int(counts[0]), int(counts[1])
