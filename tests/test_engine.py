"""GenerationEngine: greedy output equals Hugging Face generate, continuous batching gives each
request what it gets alone, quantized KV stays close to float KV, abort frees blocks, bad input."""
import pytest
import torch

import sagequant
from sagequant.runtime import GenerationEngine

FLOAT = dict(ignore=["*"])  # every linear kept in float: the engine alone is under test


def _with_kv(cm, kv: str):
    """The same compiled graph (shared weights) with another KV cache dtype."""
    from sagequant.api import CompiledModel
    from sagequant.ir.kv_plan import build_kv_plan
    cfg = cm.config.replace(kv_cache_dtype=kv)
    return CompiledModel(cm.graph, cfg, build_kv_plan(cfg), cm.pass_history)


def _run(engine, prompts, max_new, **kw):
    rids = [engine.add_request(p, max_new, **kw) for p in prompts]
    out = {r: [] for r in rids}
    finished = {}
    while engine.has_work():
        for e in engine.step():
            out[e.request_id].append(e.token_id)
            if e.finished:
                finished[e.request_id] = e.finish_reason
    return [out[r] for r in rids], [finished[r] for r in rids]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_equals_hf_generate(tiny, compiled, arch):
    model, cm = tiny(arch), compiled(arch, **FLOAT)
    prompts = [[5, 9, 17, 3, 44, 2], [7, 1, 90]]
    got = cm.generate(torch.tensor([prompts[0]]), max_new_tokens=12)
    hf = model.generate(torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    assert got.tolist() == hf.tolist()
    # Two requests decoded as one batch; the 6-token prompt prefilled in chunks of 4 + 2.
    batched, reasons = _run(GenerationEngine(cm, max_batch=2, prefill_chunk=4), prompts, 12)
    for p, toks in zip(prompts, batched):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        assert toks == ref
    assert reasons == ["length", "length"]


def test_sliding_window_matches_full_recompute(helpers):
    """Gemma3 with a 4-token window on layer 0 only (from its config's layer_types): decode
    positions far past the window."""
    from sagequant.ir.paged_attention import paged_attention
    from sagequant.runtime.step_graph import step_graph
    model = helpers.build_tiny("gemma3", layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    cm = sagequant.compile(model, sagequant.QuantConfig(**FLOAT))
    assert [n.args[5] for n in step_graph(cm).nodes(paged_attention)] == [4, 0]
    prompt = [3, 8, 1, 22, 9, 14, 5, 60, 2]
    seq = list(prompt)
    for _ in range(8):
        seq.append(int(cm(torch.tensor([seq]))[0, -1].argmax()))
    assert cm.generate([prompt], max_new_tokens=8)[0].tolist() == seq


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_continuous_batching_and_quantized_kv(compiled, kv):
    """Requests joining mid-way, decoded together with different lengths, produce exactly what
    each produces alone; quantized KV is close to float KV and ~1/4 of float32's bytes."""
    cm = _with_kv(compiled("qwen2"), kv)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [40, 41], [7, 7, 7, 7, 7]]
    alone = [_run(GenerationEngine(cm, max_batch=1), [p], 20)[0][0] for p in prompts]
    engine = GenerationEngine(cm, max_batch=3)
    first = engine.add_request(prompts[0], 20)
    out = {first: []}
    for i in range(6):
        if i in (2, 4):
            out[engine.add_request(prompts[1 if i == 2 else 2], 20)] = []
        for e in engine.step():
            out[e.request_id].append(e.token_id)
    while engine.has_work():
        for e in engine.step():
            out[e.request_id].append(e.token_id)
    assert list(out.values()) == alone
    # Quantized vs float KV: same prefill logits up to the KV rounding.
    float_engine = GenerationEngine(compiled("qwen2"), max_batch=1)
    ids = torch.tensor([prompts[0] * 3])
    logits = {}
    for name, eng in (("q", GenerationEngine(cm, max_batch=1)), ("f", float_engine)):
        eng.pool.open(0, ids.shape[1])
        logits[name] = eng.forward([0], ids)[0]
    rel = (logits["q"] - logits["f"]).norm() / logits["f"].norm()
    assert 0 < rel < (0.02 if kv == "int8" else 0.08)
    ratio = engine.stats()["kv_bytes_per_token"] / float_engine.stats()["kv_bytes_per_token"]
    assert 0.25 < ratio < 0.27    # 1 byte vs 4, plus one fp16 scale per 16 tokens x 16 channels


def test_abort_frees_blocks_and_stats(compiled):
    engine = GenerationEngine(compiled("llama"), max_batch=2, num_kv_blocks=6)
    a = engine.add_request([1, 2, 3], 40)   # reserves ceil(43 / 16) = 3 blocks
    b = engine.add_request([4, 5], 40)
    c = engine.add_request([6], 10)         # waits: no slot
    engine.step()
    st = engine.stats()
    assert (st["running"], st["waiting"], st["kv_blocks_used"], st["kv_blocks_total"]) == (2, 1, 6, 6)
    assert engine.abort(a) and not engine.abort(a) and not engine.abort("nope")
    assert engine.stats()["kv_blocks_used"] == 3
    engine.step()                           # c is admitted into a's freed blocks
    assert engine.stats()["running"] == 2 and engine.abort(c) and engine.abort(b)
    assert engine.stats()["kv_blocks_used"] == 0 and not engine.has_work()


def test_stop_tokens_and_sampling(compiled):
    cm = compiled("llama", **FLOAT)
    greedy, _ = _run(GenerationEngine(cm), [[1, 2, 3]], 8)
    (toks,), (reason,) = _run(GenerationEngine(cm), [[1, 2, 3]], 8, stop_token_ids=[greedy[0][2]])
    assert toks == greedy[0][:3] and reason == "stop"
    # A tiny top_p keeps only the most likely token: sampling then is greedy.
    (nucleus,), _ = _run(GenerationEngine(cm), [[1, 2, 3]], 8, temperature=1.0, top_p=1e-6)
    assert nucleus == greedy[0]
    runs = [_run(GenerationEngine(cm, seed=s), [[1, 2, 3]], 16, temperature=5.0)[0][0] for s in (0, 0, 1)]
    assert runs[0] == runs[1] != runs[2]


@pytest.mark.parametrize("args, match", [
    (([], 4), "prompt_ids is empty"),
    (([1, 500], 4), r"not token ids in \[0, 128\)"),
    (([1.5], 4), "not token ids"),
    (([1], 0), "max_new_tokens=0"),
    (([1] * 250, 10), "exceeds max_seq_len=256"),
    (([1], 4, -1.0), "temperature=-1.0"),
    (([1], 4, 0.0, 0.0), r"top_p=0.0 must be in \(0, 1\]"),
])
def test_bad_requests(compiled, args, match):
    engine = GenerationEngine(compiled("llama"), max_batch=1)
    with pytest.raises(ValueError, match=match):
        engine.add_request(*args)


def test_bad_engine_arguments(compiled):
    cm = compiled("llama")
    with pytest.raises(ValueError, match="max_batch=0"):
        GenerationEngine(cm, max_batch=0)
    with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
        GenerationEngine(cm, max_seq_len=1000)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            GenerationEngine(cm, device="cuda")
    engine = GenerationEngine(cm, num_kv_blocks=2)
    with pytest.raises(ValueError, match="needs 3 KV blocks; the pool has 2"):
        engine.add_request([1] * 40, 4)
    engine.add_request([1], 2, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([1], 2, request_id="x")


def test_loaded_artifact_generates_the_same(compiled, tmp_path):
    """A saved and reloaded model (no traced shapes: the KV geometry comes from its config)."""
    cm = compiled("llama", kv_cache_dtype="int8")
    cm.save(tmp_path / "artifact")
    loaded = sagequant.load(tmp_path / "artifact")
    prompt = [[9, 8, 7, 6]]
    assert loaded.generate(prompt, max_new_tokens=10).tolist() == cm.generate(prompt, max_new_tokens=10).tolist()


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_static_padded_decode_step_equals_eager(compiled, kv):
    """The CUDA-graph decode path (static buffers, padded batch buckets, sync-free cache writes)
    run eagerly on CPU: same tokens as the plain engine; the padding never leaks."""
    cm = _with_kv(compiled("llama"), kv)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41], [7, 7, 7]]
    plain, _ = _run(GenerationEngine(cm, max_batch=4), prompts, 20)
    engine = GenerationEngine(cm, max_batch=4, cuda_graphs=True)
    assert engine.graphs.sizes == [1, 2, 4]
    static, _ = _run(engine, prompts, 20)        # 3 rows decode in the 4-row bucket
    assert static == plain
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["kv_blocks_total"] == engine.pool.num_blocks - 1


def test_step_graph_on_another_device_leaves_the_compiled_model_where_it_was(fresh_tiny, calib_ids):
    """The engine's device copy must not move the tensors it shares with the compiled (and the
    user's) model: a second compile of the same model would then trace half on the other device."""
    from sagequant.runtime.step_graph import step_graph
    model = fresh_tiny("llama")
    cm = sagequant.compile(model, sagequant.QuantConfig(group_size=32, guard="off"))
    moved = step_graph(cm, device=torch.device("meta"))
    assert all(t.device.type == "meta" for t in moved.gm.state_dict().values())
    assert all(t.device.type == "cpu" for t in cm.graph.gm.state_dict().values())
    assert all(p.device.type == "cpu" for p in model.parameters())
    again = sagequant.compile(model, sagequant.QuantConfig(group_size=32, guard="off"))
    torch.testing.assert_close(again(calib_ids[:1]), cm(calib_ids[:1]), rtol=0, atol=0)


def test_step_graph_of_a_model_compiled_off_cpu_targets_its_device(fresh_tiny):
    """A model compiled where its weights live (meta here, standing in for a GPU): the traced
    graph's device constants (kept on CPU by the tracer) follow the weights in the step graph."""
    from sagequant.runtime.step_graph import step_graph
    model = fresh_tiny("llama").to("meta")
    cm = sagequant.compile(model, sagequant.QuantConfig(ignore=["*"], guard="off"))
    graph = step_graph(cm)
    consts = [a for n in graph.graph.nodes for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs))
              if isinstance(a, torch.device)]
    assert consts and {d.type for d in consts} == {"meta"}
    assert {t.device.type for t in graph.gm.state_dict().values()} == {"meta"}


@pytest.mark.parametrize("scheme", [dict(ignore=["*"]), dict(weight_dtype="int4", group_size=32)])
def test_prefill_computes_the_last_positions_logits_only(compiled, scheme):
    """The prefill graph applies the lm_head to each row's last new token alone: the same
    logits as that position of the whole graph's output (to float32 rounding), and only that."""
    cm = compiled("llama", **scheme)
    engine = GenerationEngine(cm, max_batch=2)
    head = [n for n in engine.last_position_gm.graph.nodes if n.op == "output"][0].args[0]
    assert head.args[0].target == torch.ops.aten.slice.Tensor and head.args[0].args[1:3] == (1, -1)
    ids = torch.tensor([[5, 9, 17, 3, 44], [7, 1, 90, 2, 8]])
    outs = []
    for last_only in (False, True):
        for slot in (0, 1):
            engine.pool.open(slot, 8)
        outs.append(engine.forward([0, 1], ids, last_only=last_only))
        for slot in (0, 1):
            engine.pool.free(slot)
    whole, only = outs
    assert whole.shape == (2, 5, engine.vocab_size) and only.shape == (2, 1, engine.vocab_size)
    torch.testing.assert_close(only, whole[:, -1:])  # float32: GEMM blocking differs by M


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_padded_static_prefill_equals_eager(compiled, kv):
    """The prefill-graph path (run eagerly here, as on CPU): prompts padded to 128-token buckets
    give the eager prefill's first-token logits and the same greedy continuation; a quantized
    cache is not eligible and prefills eagerly."""
    from dataclasses import replace

    from sagequant.backends.cuda.kv_attention import CUDA_PAGED_ATTENTION, cuda_paged_attention
    from sagequant.backends.reference.kv_attention import paged_attention_ref

    def attend(q, step, layer, scale, window):   # the CUDA kernel's prefill (torch SDPA), CPU decode
        run = cuda_paged_attention if q.shape[2] > 1 else paged_attention_ref
        return run(q, step, layer, scale, window)

    cm = compiled("llama", kv_cache_dtype=kv)
    prompts = [[5, 9, 17, 3, 44], [(7 * i) % 128 for i in range(130)]]
    plain = GenerationEngine(cm, max_batch=2, cuda_graphs=True)
    padded = GenerationEngine(cm, max_batch=2, cuda_graphs=True, prefill_graphs=True)
    padded.pool.open(0, 8)
    assert not padded.prefill_graphs.fits(0, 5)   # the CPU kernel gathers blocks: eager prefill
    padded.pool.free(0)
    padded.kernel = replace(CUDA_PAGED_ATTENTION, op=attend)
    padded.pool.open(0, 140)
    assert [padded.prefill_graphs.fits(0, len(p)) for p in prompts] == [kv == "none"] * 2
    padded.pool.free(0)
    want, _ = _run(plain, prompts, 6)
    got, _ = _run(padded, prompts, 6)
    assert got == want
    assert sorted(padded.prefill_graphs.buckets) == ([128, 256] if kv == "none" else [])
    if kv == "none":
        for eng in (plain, padded):
            eng.pool.open(0, 140)
        first = padded.prefill_graphs.prefill(0, torch.tensor([prompts[1]]))
        ref = plain.forward([0], torch.tensor([prompts[1]]), last_only=True)
        torch.testing.assert_close(first, ref)
        assert padded.pool.lengths[0] == plain.pool.lengths[0] == 130
