"""calibration/sequential.py: what the block-by-block runner computes and keeps.

Memory is measured as the peak of live tensor storages created by ATen ops (a dispatch mode
that counts each new storage's bytes until it is freed), so the numbers are exact and do not
depend on the allocator or on other tests in the process.
"""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import sagequant
from sagequant.calibration.sequential import SequentialRunner
from sagequant.passes import PassContext, PassManager

BIG_VOCAB, SEQ = 8192, 32  # logits of one sample: 32 x 8192 x 4 B = 1 MiB


class PeakStorageBytes(TorchDispatchMode):
    """Peak bytes of storages alive at once, counting only storages created inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.largest = 0
        self._seen: set[int] = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                if id(s) not in self._seen:
                    self._seen.add(id(s))
                    self.live += s.nbytes()
                    self.largest = max(self.largest, s.nbytes())
                    weakref.finalize(s, self._free, id(s), s.nbytes())
        self.peak = max(self.peak, self.live)
        return out


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, BIG_VOCAB, (1, SEQ), generator=g) for _ in range(n)]


def _gptq_peak(graph, n_samples, **cfg_kw):
    """Peak of the GPTQ pass (which runs every segment, epilogue included, over all samples)."""
    cfg = sagequant.QuantConfig(weight_dtype="int4", calibration="gptq", group_size=32, **cfg_kw)
    ctx = PassContext(cfg, _batches(n_samples))
    graph = PassManager(["canonicalize", "annotate"]).run(graph, ctx)
    with PeakStorageBytes() as mode:
        PassManager(["gptq"]).run(graph, ctx)
    return mode


@pytest.mark.parametrize("ignore", [["lm_head"], []], ids=["head-float", "head-quantized"])
def test_calibration_memory_does_not_grow_with_samples_times_vocab(traced, ignore):
    """3 -> 9 samples adds 6 x 1 MiB of logits if the runner keeps them; the allowance here is
    the growth of the inter-block hidden-state cache only (6 x 32 x 64 x 4 B = 48 KiB per
    cached tensor), far below one sample's logits per extra sample."""
    logits_per_sample = SEQ * BIG_VOCAB * 4
    small = _gptq_peak(traced("llama", vocab_size=BIG_VOCAB)[1], 3, ignore=ignore)
    large = _gptq_peak(traced("llama", vocab_size=BIG_VOCAB)[1], 9, ignore=ignore)
    assert large.peak - small.peak < 2 * logits_per_sample, (small.peak, large.peak)


def test_epilogue_is_not_computed_when_nothing_reads_it(traced):
    """With no hook on the head, running every segment never produces a [*, vocab] tensor."""
    _, graph = traced("llama", vocab_size=BIG_VOCAB)
    runner = SequentialRunner(graph)
    caches = runner.start(_batches(2), run_prologue=False)
    with PeakStorageBytes() as mode:
        for seg in range(len(runner.segments)):
            runner.run_segment(seg, caches)
    assert mode.largest < SEQ * BIG_VOCAB * 4
    assert all(len(c) == 1 for c in caches)  # only the input ids stay: nothing reads the rest


def test_hooked_head_sees_every_sample_and_its_logits_are_dropped(traced):
    _, graph = traced("llama", vocab_size=BIG_VOCAB)
    runner = SequentialRunner(graph)
    head = [n for n in runner.segments[-1] if n.target == torch.ops.aten.linear.default]
    assert len(head) == 1
    seen = []
    caches = runner.start(_batches(3), run_prologue=False)
    for seg in range(len(runner.segments)):
        runner.run_segment(seg, caches, {head[0]: lambda node, args, out: seen.append(out.shape)})
    assert seen == [torch.Size([1, SEQ, BIG_VOCAB])] * 3
    assert all(head[0] not in c for c in caches)
