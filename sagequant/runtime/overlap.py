"""Decode steps overlapped with the host: step N+1 is enqueued before step N's tokens are read.

A synchronous decode step leaves the GPU idle while the host copies the sampled tokens back,
checks stop conditions and builds the next step's inputs (~0.5 ms a step at batch 1 on an H100,
BENCHMARKS §13c). The next step's input ids are this step's tokens (argmax, or a draw from the
request's own generator), which stay on the device: the engine launches step N+1 from them,
then reads step N's tokens (copied to pinned host memory behind the launch) and emits them.
Stop conditions are thus checked one step late. A row that ends on a stop token at step N has one extra token computed at
N+1, which is discarded (its cache write stays inside the blocks reserved for it, and any later
owner of those blocks is written after it on the same stream); a row that reaches max_new_tokens
at step N is left out of N+1, since its length is known on the host. The tokens are the
synchronous path's: the same graph replays on the same ids, and the same argmax or draw picks
them (a sampled request's generator is its own, so a discarded draw of one row moves no other's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cuda_graphs import nonfinite_error


@dataclass
class InFlight:
    """A launched decode step whose tokens are not yet read: batch row i is batch[i]."""
    batch: list             # the engine's _Request objects, in row order
    tokens: torch.Tensor    # [rows] int64 argmax on the device
    host: torch.Tensor      # [rows] the tokens' host copy (pinned on CUDA)
    flag: torch.Tensor      # [1] bool host copy of the step's NaN/Inf flag
    done: object = None     # torch.cuda.Event recorded after the copies (None on CPU)

    def rows(self) -> dict[int, int]:
        return {id(r): i for i, r in enumerate(self.batch)}


class HostBuffers:
    """Two pinned buffers used in turn: at most two steps are in flight (the one launched and
    the one being read)."""

    def __init__(self, rows: int, device: torch.device):
        pin = device.type == "cuda"
        self.bufs = [(torch.empty(rows, dtype=torch.int64, pin_memory=pin),
                      torch.empty(1, dtype=torch.bool, pin_memory=pin)) for _ in range(2)]
        self.turn = 0
        self.device = device

    def launch_copy(self, batch: list, tokens: torch.Tensor, flag: torch.Tensor) -> InFlight:
        """The step's tokens [rows] (on the device), copied to the host behind the step."""
        host, host_flag = self.bufs[self.turn]
        self.turn ^= 1
        n = tokens.shape[0]
        host[:n].copy_(tokens, non_blocking=True)
        host_flag.copy_(flag, non_blocking=True)
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return InFlight(batch, tokens, host[:n], host_flag, done)


def read(step: InFlight) -> list[int]:
    """Wait for the step's copies and return its tokens; a NaN/Inf cache write raises here."""
    if step.done is not None:
        step.done.synchronize()
    if bool(step.flag):
        raise nonfinite_error()
    return step.host.tolist()
