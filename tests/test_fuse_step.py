"""The fused step graph (runtime/fuse_step.py): which rewrites it makes on Llama-family graphs,
that the fused graph computes the same logits as the exported one (CPU: the same ATen math), and
the Triton kernels behind the fused ops against that math in Triton's interpreter."""
import importlib.util
import subprocess
import sys

import pytest
import torch

import sagequant
from sagequant.runtime import GenerationEngine
from sagequant.ir.paged_attention import paged_attention
from sagequant.runtime.step_graph import step_graph

aten = torch.ops.aten


def _targets(graph) -> list:
    return [n.target for n in graph.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("scheme", [dict(ignore=["*"]), dict(weight_dtype="int4", group_size=32)])
def test_llama_step_is_fused(compiled, scheme):
    cm = compiled("llama", **scheme)
    # Linears merge only where the step graph copies the weights to a device anyway.
    fused, plain = step_graph(cm, device=torch.device("cpu")), step_graph(cm, fused=False)
    layers = 2
    assert step_graph(cm).model_info["step_fusions"]["merged_linears"] == 0
    assert step_graph(cm, merge_linears=True).model_info["step_fusions"]["merged_linears"] == 5 * layers
    assert fused.model_info["step_fusions"] == {
        "merged_linears": 5 * layers, "add_rms_norm": 2 * layers, "rotary_embedding": 2 * layers,
        "silu_mul": layers, "rotary_in_attention": layers}
    ops = _targets(fused)
    linear = aten.linear.default if "ignore" in scheme else torch.ops.sagequant.weight_only_linear_ref.default
    # Per layer: one q|k|v, one o, one gate|up, one down linear (plus the float lm_head).
    assert ops.count(linear) == 4 * layers + (linear is aten.linear.default)
    for gone in (aten.silu.default, aten.neg.default):
        assert gone not in ops
    # Only the first input norm has no residual add in front of it.
    assert ops.count(torch.ops.sagequant.rms_norm.default) == 1
    assert ops.count(torch.ops.sagequant.add_rms_norm.default) == 2 * layers
    attn = fused.nodes(paged_attention)
    assert all(set(n.kwargs) == {"cos", "sin"} for n in attn)
    assert len(_targets(plain)) > len(ops) + 20


@pytest.mark.parametrize("arch,scheme", [("llama", dict(ignore=["*"])),
                                         ("llama", dict(weight_dtype="int4", group_size=32)),
                                         ("llama", dict(weight_dtype="int8", activation_dtype="int8")),
                                         ("qwen2", dict(weight_dtype="int4", group_size=32))])  # q/k/v biases
def test_fused_step_matches_exported_step(compiled, arch, scheme):
    """Prefill then two decode steps of a batch of two rows of different lengths: the logits of
    the fused and the exported graph are equal (the fused ops' CPU path is the same ATen math),
    and the graph with merged linears matches them to rounding."""
    cm = compiled(arch, **scheme)
    prompts = [[5, 9, 17, 3, 44, 2, 8], [7, 1, 90]]
    logits = []
    for variant in ("merged", "fused", "exported"):
        # merged: q|k|v and gate|up as one GEMM each, in place (as an engine on another device runs)
        engine = GenerationEngine(cm, max_batch=2, fused_step=variant != "exported",
                                  merge_linears=variant == "merged")
        out = []
        for slot, p in enumerate(prompts):
            engine.pool.open(slot, 16)
            out.append(engine.forward([slot], torch.tensor([p]))[0, -1])
        last = torch.stack(out).argmax(-1)[:, None]
        for _ in range(2):
            step = engine.forward([0, 1], last)[:, -1]
            out.extend(step)
            last = step.argmax(-1)[:, None]
        logits.append(torch.stack(out))
    torch.testing.assert_close(logits[1], logits[2], rtol=0, atol=0)
    # Merged GEMMs sum in another order (a different K-blocking of the wider GEMM): rounding only.
    torch.testing.assert_close(logits[0], logits[2], rtol=1e-4, atol=1e-4)


def test_non_llama_graph_is_left_runnable(compiled):
    """GPT-2 (learned positions, gelu MLP, fused c_attn): nothing rotary or SiLU to fuse, and the
    engine still decodes (test_engine checks it against generate)."""
    fusions = step_graph(compiled("gpt2", ignore=["*"])).model_info["step_fusions"]
    assert fusions["rotary_embedding"] == fusions["silu_mul"] == fusions["rotary_in_attention"] == 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_fused_kernels_in_triton_interpreter():
    run = subprocess.run([sys.executable, "-m", "sagequant.backends.cuda.fused_check", "--interpret"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert ", 0 failed" in run.stdout


def test_fused_ops_reference_math():
    """The ops' default (CPU) implementations are the ATen ops they replace."""
    from sagequant.backends.cuda import fused
    from sagequant.ir.ops import rms_norm
    g = torch.Generator().manual_seed(0)
    x, r, w = (torch.randn(3, 5, 32, generator=g) for _ in range(3))
    normed, total = fused.add_rms_norm(x, r, w[0, 0], 1e-6)
    torch.testing.assert_close(total, x + r, rtol=0, atol=0)
    torch.testing.assert_close(normed, rms_norm(x + r, w[0, 0], 1e-6, 0.0), rtol=0, atol=0)
    q = torch.randn(2, 3, 4, 8, generator=g)
    cos, sin = torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 1, 4, 8, generator=g)
    rot = torch.cat([-q[..., 4:], q[..., :4]], dim=-1)
    torch.testing.assert_close(fused.rotary_embedding(q, cos, sin), q * cos + rot * sin, rtol=0, atol=0)
    torch.testing.assert_close(fused.silu_mul(x, r), torch.nn.functional.silu(x) * r, rtol=0, atol=0)
