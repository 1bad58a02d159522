"""Overlapped decode (runtime/overlap.py): each step is launched before the previous one's tokens
are read, and the tokens, finish reasons and freed blocks are the synchronous engine's, token for
token, through stop tokens, max_new_tokens, admissions, aborts, sampled rows and a quantized
cache. The padded static step runs eagerly on CPU (cuda_graphs=True)."""
import pytest
import torch

from sagequant.runtime import GenerationEngine
from sagequant.runtime.cuda_graphs import DecodeGraphs

from test_engine import _run, _with_kv

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41], [7, 7, 7], [100, 3],
           [5, 9, 17, 3, 44, 2], [60]]
MAX_NEW = [12, 1, 7, 20, 3, 9]


def _engines(cm, **kw):
    return (GenerationEngine(cm, max_batch=4, cuda_graphs=True, overlap_decode=False, **kw),
            GenerationEngine(cm, max_batch=4, cuda_graphs=True, overlap_decode=True, **kw))


def _run_each(engine, prompts, max_new, stops=None, **kw):
    rids = [engine.add_request(p, n, stop_token_ids=(stops or {}).get(i, ()), **kw)
            for i, (p, n) in enumerate(zip(prompts, max_new))]
    out, reasons, steps = {r: [] for r in rids}, {}, 0
    while engine.has_work():
        steps += 1
        for e in engine.step():
            assert e.request_id not in reasons, "an event after the request finished"
            out[e.request_id].append(e.token_id)
            if e.finished:
                reasons[e.request_id] = e.finish_reason
    return [out[r] for r in rids], [reasons[r] for r in rids], steps


@pytest.mark.parametrize("kv", ["none", "int8"])
def test_overlapped_decode_gives_the_synchronous_tokens(compiled, kv):
    """Six requests through four slots (admissions mid-run), mixed lengths, stop tokens that end
    rows mid-batch (each after its 3rd token, so the step launched behind it is discarded)."""
    sync, lapped = _engines(_with_kv(compiled("llama"), kv))
    want, _, _ = _run_each(sync, PROMPTS, MAX_NEW)
    stops = {i: [toks[2]] for i, toks in enumerate(want) if len(toks) > 3 and toks[2] not in toks[:2]}
    assert len(stops) >= 2
    for engine in (sync, lapped):
        assert engine.stats()["kv_blocks_used"] == 0
    want, want_reasons, _ = _run_each(sync, PROMPTS, MAX_NEW, stops)
    got, reasons, _ = _run_each(lapped, PROMPTS, MAX_NEW, stops)
    assert got == want and reasons == want_reasons
    assert [reasons[i] for i in stops] == ["stop"] * len(stops)
    assert lapped.stats()["kv_blocks_used"] == 0 and not lapped.has_work()
    assert lapped.stats()["tokens_generated"] == sum(map(len, got))   # discarded tokens not counted


def test_overlapped_decode_launches_ahead_and_reuses_the_index(compiled, monkeypatch):
    """One request of 10 tokens: after the prefill step, each step() launches a decode before it
    returns the previous one's token (so the first decode's token arrives a call later), and the
    static index is filled from host lists once, then advanced on the device."""
    fills = []
    original = DecodeGraphs._fill
    monkeypatch.setattr(DecodeGraphs, "_fill", lambda self, *a: fills.append(1) or original(self, *a))
    sync, lapped = _engines(compiled("llama"))
    (want,), _ = _run(sync, [[1, 2, 3]], 10)
    assert len(fills) == 1
    fills.clear()
    lapped.add_request([1, 2, 3], 10)
    per_call = []
    while lapped.has_work():
        per_call.append([e.token_id for e in lapped.step()])
    # prefill emits token 1 and launches decode 1; each later call emits the previous decode's
    # token; the 9th decode (token 10) is the last: nothing is launched after it.
    assert [len(c) for c in per_call] == [1] + [1] * 9
    assert sum(per_call, []) == want and len(fills) == 1


def test_overlapped_sampling_gives_the_synchronous_tokens(compiled):
    """Sampled rows overlap too: each request draws from its own generator on the device, so the
    draw discarded behind a row that stopped moves no other row's tokens."""
    cm = compiled("llama")
    prompts, max_new = [[1, 2, 3], [4, 5], [6, 7, 8], [9], [3, 3]], [10, 8, 12, 6, 9]
    kw = dict(temperature=0.8, top_p=0.9)
    free, _, _ = _run_each(_engines(cm, seed=3)[0], prompts, max_new, **kw)
    stops = {i: [t[2]] for i, t in enumerate(free) if t[2] not in t[:2]}
    assert stops
    want, want_reasons, _ = _run_each(_engines(cm, seed=3)[0], prompts, max_new, stops, **kw)
    got, reasons, _ = _run_each(_engines(cm, seed=3)[1], prompts, max_new, stops, **kw)
    assert got == want and reasons == want_reasons
    assert [reasons[i] for i in stops] == ["stop"] * len(stops)
    # Stopping early changes who shares the batch when: no request's draws move.
    assert all(w == f[:len(w)] for w, f in zip(want, free))
    greedy, _, _ = _run_each(_engines(cm)[0], prompts, max_new)
    assert sum(g != f for g, f in zip(greedy, free)) >= 3     # the rows really sample


def test_overlap_handles_aborts(compiled):
    lapped = _engines(compiled("llama"))[1]
    # Abort with a step in flight: no event for it afterwards, its blocks are freed at once.
    rid = lapped.add_request([9, 9, 9], 30)
    other = lapped.add_request([8], 5)
    for _ in range(3):
        lapped.step()
    assert lapped._inflight is not None and lapped.abort(rid)
    seen = []
    while lapped.has_work():
        seen += [e.request_id for e in lapped.step()]
    assert rid not in seen and other in seen
    assert lapped.stats()["kv_blocks_used"] == 0


def test_overlap_needs_the_static_step(compiled):
    with pytest.raises(ValueError, match="overlap_decode=True needs the static decode step"):
        GenerationEngine(compiled("llama"), cuda_graphs=False, overlap_decode=True)
    assert not GenerationEngine(compiled("llama")).overlap   # CPU default: off


def test_prefill_graphs_need_the_static_step(compiled):
    with pytest.raises(ValueError, match="prefill_graphs=True needs the static decode step"):
        GenerationEngine(compiled("llama"), cuda_graphs=False, prefill_graphs=True)
    assert GenerationEngine(compiled("llama")).prefill_graphs is None   # CPU default: eager
    assert GenerationEngine(compiled("llama"), cuda_graphs=True).prefill_graphs is None


def test_capture_all_captures_every_bucket_on_padding_rows(compiled, monkeypatch):
    """What `engine start` runs before serving: one capture per batch bucket, its rows all the
    pad slot at position 0; the first real step then refills the index from its own rows."""
    engine = GenerationEngine(compiled("llama"), max_batch=4, cuda_graphs=True)
    graphs, seen = engine.graphs, []

    def capture(b, slots, starts):
        seen.append((b.ids.shape[0], slots, starts, b.index.slots.tolist(), b.index.positions.tolist()))
        b.graph = "captured"

    monkeypatch.setattr(graphs, "_capture", capture)
    graphs.capture = True
    graphs.capture_all()
    pad = graphs.pad_slot
    assert seen == [(n, [pad] * n, [0] * n, [pad] * n, [0] * n) for n in (1, 2, 4)]
    graphs.capture_all()   # already captured: nothing again
    assert len(seen) == 3 and all(b.last == () for b in graphs.buckets.values())


def test_prefill_capture_all_captures_every_bucket_on_padding(compiled, monkeypatch):
    """`engine start` also captures every prefill bucket up front; each capture prompt writes only
    the pad block, and a model the padded path cannot serve captures nothing."""
    from dataclasses import replace
    from sagequant.backends.cuda.kv_attention import CUDA_PAGED_ATTENTION
    engine = GenerationEngine(compiled("llama"), max_batch=2, max_seq_len=200, cuda_graphs=True,
                              prefill_graphs=True)
    pg, seen = engine.prefill_graphs, []
    monkeypatch.setattr(pg, "_capture", lambda b: (seen.append(
        (b.ids.shape[1], b.ids.abs().sum().item(), set(b.blk.flatten().tolist()),
         b.off[0, :20].tolist())), setattr(b, "graph", "captured")))
    pg.capture = True
    pg.capture_all()
    assert seen == []                        # the CPU reference kernel: no prompt takes this path
    engine.kernel = replace(CUDA_PAGED_ATTENTION, op=engine.kernel.op)
    pg.capture_all()
    bs = engine.pool.block_size
    assert seen == [(n, 0, {engine.graphs.pad_block}, [i % bs for i in range(20)])
                    for n in (128, 256)]   # up to the 200-token context, rounded up
    pg.capture_all()
    assert len(seen) == 2
