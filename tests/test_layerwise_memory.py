"""CPU memory of a layer-wise compile does not grow with depth: each finished block's tensors
live in its segment file in the work dir (memory-mapped once the loop is done: file-backed pages
the kernel can drop), the heap's freed block buffers go back to the OS after each block, and the
artifact is written from the mappings, so what the process holds itself (RssAnon) between blocks
is the same after block 1 as after block 6.

A Llama block of 15M parameters (int4 g128: 7.9 MB quantized, 31 MB in bf16): a run that kept
each quantized block in its own memory would grow by 5 x 7.9 MB over the loop; glibc's heap kept
~35 MB a block before the trim.
"""
from pathlib import Path

import pytest
import torch

import sagequant as sq
from sagequant.passes.layerwise import LayerwiseCompile

HIDDEN, FFN, VOCAB, LAYERS = 1024, 4096, 512, 6
QUANTIZED_BLOCK = (4 * HIDDEN * HIDDEN // 2 + 3 * HIDDEN * FFN) // 2   # int4 codes alone


def _anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
def test_cpu_memory_between_blocks_and_for_the_artifact_does_not_grow_with_depth(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=8,
                         num_key_value_heads=2, num_hidden_layers=LAYERS, vocab_size=VOCAB,
                         tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40MB")
    del model
    held = {}
    monkeypatch.setattr(LayerwiseCompile, "_segment_done", lambda self, seg: held.__setitem__(seg, _anon()))
    cfg = sq.QuantConfig(weight_dtype="int4", group_size=128, guard="off", calibration_samples=2,
                         calibration_seq_len=16)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    cm = sq.compile(tmp_path / "ckpt", cfg, calibration_data=ids, device="cpu", work_dir=tmp_path / "w",
                    dtype=torch.bfloat16)
    after_compile = _anon()
    out = cm.save(tmp_path / "artifact")
    after_save = _anon()
    first, last = held[1], held[LAYERS]   # segment 0 is the prologue, 1..LAYERS the blocks
    assert last - first < QUANTIZED_BLOCK, (first, last, held)
    # the final tensors are mapped from the segment files, and the artifact written from them
    assert after_compile - last < QUANTIZED_BLOCK, (last, after_compile)
    assert after_save - after_compile < QUANTIZED_BLOCK, (after_compile, after_save)
    assert (out / "weights.safetensors").stat().st_size > LAYERS * QUANTIZED_BLOCK
