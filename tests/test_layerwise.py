"""passes/layerwise.py + calibration/onload.py: compile from a sharded safetensors checkpoint one
block at a time (device="cpu" here; the same code runs on "cuda"), traced on the meta device.

Weight-only RTN and GPTQ do not depend on the activations' path, so the layer-wise result must
equal the whole-model pipeline's bit for bit; AWQ / SmoothQuant calibrate block i+1 on the
quantized block i's output, so only block 0 is bit-equal and the rest must still beat RTN.
"""
import json
import os

import pytest
import torch

import sagequant as sq
from sagequant.calibration.onload import CheckpointWeights, empty_model, resolve_device, tied_aliases
from sagequant.errors import UnsupportedError
from sagequant.ir import replicate
from sagequant.ir.trace import trace_model
from sagequant.passes.layerwise import LayerwiseCompile

LAYERS, SAMPLES, SEQ = 3, 6, 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, helpers):
    model = helpers.build_tiny("llama", num_hidden_layers=LAYERS)
    d = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(d, max_shard_size="100KB")  # several shards + an index
    assert (d / "model.safetensors.index.json").is_file()
    return model, d


@pytest.fixture(scope="module")
def ids(helpers):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, helpers.VOCAB, (SAMPLES, SEQ), generator=g)


def _cfg(**kw):
    base = dict(weight_dtype="int4", group_size=32, guard="off", calibration_samples=SAMPLES,
                calibration_seq_len=SEQ)
    return sq.QuantConfig(**{**base, **kw})


def _ops(graph):
    """Op counts but aten.contiguous: the meta kernel of SDPA returns another memory layout than
    the CPU one, so a meta trace keeps the attention output's .contiguous() (a value no-op) that
    a CPU trace elides."""
    return {k: v for k, v in graph.op_counts().items() if k != "aten.contiguous.default"}


def _layerwise(d, cfg, ids, work):
    return sq.compile(d, cfg, calibration_data=ids, device="cpu", work_dir=work)


def test_meta_trace_has_no_weights_and_the_real_graph_structure(checkpoint):
    model, d = checkpoint
    skeleton = empty_model(d)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert {b.device.type for b in skeleton.buffers()} == {"cpu"}  # rotary tables are computed
    meta_graph, real_graph = trace_model(skeleton), trace_model(model)
    assert _ops(meta_graph) == _ops(real_graph)
    devices = {n: meta_graph.attr(n).device.type for n in meta_graph.graph.nodes if n.op == "get_attr"}
    assert {v for k, v in devices.items() if "rotary" not in k.target} == {"meta"}
    # no device constant of the trace survives: the graph runs wherever it is retargeted
    assert "device(type='meta')" not in meta_graph.gm.code


def test_checkpoint_reader_is_lazy_and_resolves_tied_names(checkpoint, tmp_path, helpers):
    model, d = checkpoint
    weights = CheckpointWeights(d)
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(weights.load(name), model.state_dict()[name], rtol=0, atol=0)
    tied = helpers.build_tiny("llama", tie_word_embeddings=True)
    tied.save_pretrained(tmp_path)
    reader = CheckpointWeights(tmp_path, tied_aliases(tied))
    assert "lm_head.weight" in reader
    assert torch.equal(reader.load("lm_head.weight"), tied.model.embed_tokens.weight)


@pytest.mark.parametrize("method", [{"calibration": "minmax"}, {"calibration": "gptq"},
                                    {"calibration": "gptq", "gptq_sink_weight": 50.0},
                                    {"calibration": "gptq", "gptq_sink_weight": "attention"}])
def test_weight_only_layerwise_equals_whole_model_bit_for_bit(checkpoint, ids, tmp_path, method):
    model, d = checkpoint
    cfg = _cfg(**method)
    lw = _layerwise(d, cfg, ids, tmp_path / "work")
    ref = sq.compile(model, cfg, calibration_data=ids)
    assert lw.graph.model_info["trace"] == "replicated" and ref.graph.model_info["trace"] == "full"
    got, want = lw.graph.state(), ref.graph.state()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert _ops(lw.graph) == _ops(ref.graph)
    assert torch.equal(lw(ids[:2]), ref(ids[:2]))


@pytest.mark.parametrize("method", [{"calibration": "awq"}, {"calibration": "awq", "awq_sink_weight": 50.0},
                                    {"calibration": "awq", "awq_scale_loss": "module"},
                                    {"calibration": "awq+gptq"},
                                    {"calibration": "awq+gptq", "gptq_sink_weight": 50.0}])
def test_awq_layerwise_block0_equals_whole_model_and_beats_rtn(checkpoint, ids, tmp_path, method):
    model, d = checkpoint
    lw = _layerwise(d, _cfg(**method), ids, tmp_path / "awq")
    ref = sq.compile(model, _cfg(**method), calibration_data=ids)
    rtn = sq.compile(model, _cfg(calibration="minmax"), calibration_data=ids)
    got, want = lw.graph.state(), ref.graph.state()
    block0 = [k for k in want if ".layers.0." in k]
    assert block0 and all(torch.equal(got[k], want[k]) for k in block0)
    with torch.no_grad():
        target = model(input_ids=ids, use_cache=False).logits
    err = {name: float((cm(ids) - target).pow(2).mean()) for name, cm in [("lw", lw), ("rtn", rtn)]}
    assert err["lw"] < err["rtn"], err


def test_static_w8a8_smoothquant_layerwise_records_every_input(checkpoint, ids, tmp_path):
    _, d = checkpoint
    cfg = _cfg(weight_dtype="int8", activation_dtype="int8", activation_scale="static_per_tensor",
               group_size=None, calibration="smoothquant")
    cm = _layerwise(d, cfg, ids, tmp_path / "sq")
    records = cm.calibration_records
    assert len(records) == 7 * LAYERS
    assert all(r["input"]["num_samples"] == SAMPLES and r["input"]["scale"] > 0 for r in records.values())


@pytest.mark.parametrize("method", ["gptq", "awq"])   # AWQ's grid argmins flip on float noise (BENCHMARKS §12i)
def test_killed_run_resumes_and_yields_the_same_artifact_bytes(checkpoint, ids, tmp_path, monkeypatch, method):
    _, d = checkpoint
    cfg = _cfg(calibration=method)
    full = _layerwise(d, cfg, ids, tmp_path / "full").save(tmp_path / "full.sq")

    class Killed(Exception):
        pass

    def crash_after_block_1(self, seg):
        if seg == 2:   # prologue, block 0, block 1 finished
            raise Killed
    monkeypatch.setattr(LayerwiseCompile, "_segment_done", crash_after_block_1)
    with pytest.raises(Killed):
        _layerwise(d, cfg, ids, tmp_path / "resumed")
    monkeypatch.undo()
    done = sorted(p.name for p in (tmp_path / "resumed").glob("segment_*.json"))
    assert done == ["segment_000.json", "segment_001.json", "segment_002.json"]
    resumed_cm = _layerwise(d, cfg, ids, tmp_path / "resumed")
    layerwise_stats = next(p["stats"] for p in resumed_cm.pass_history if p["pass"] == "layerwise")
    assert layerwise_stats["restored"] == 3 and layerwise_stats["calibrated"] == LAYERS + 2 - 3
    resumed = resumed_cm.save(tmp_path / "resumed.sq")
    for f in ("weights.safetensors", "graph.json"):
        assert (full / f).read_bytes() == (resumed / f).read_bytes(), f


def test_replicated_trace_gives_the_full_trace_compile_bit_for_bit(checkpoint, ids, tmp_path, monkeypatch):
    _, d = checkpoint
    cfg = _cfg(calibration="gptq")
    grown = _layerwise(d, cfg, ids, tmp_path / "grown")

    def refuse(model):
        raise replicate.NotReplicable("full trace asked for")
    monkeypatch.setattr(replicate, "identical_blocks", refuse)
    full = _layerwise(d, cfg, ids, tmp_path / "full")
    assert (grown.graph.model_info["trace"], full.graph.model_info["trace"]) == ("replicated", "full")
    assert [n.target for n in grown.graph.graph.nodes] == [n.target for n in full.graph.graph.nodes]
    a, b = grown.save(tmp_path / "grown.sq"), full.save(tmp_path / "full.sq")
    assert (a / "weights.safetensors").read_bytes() == (b / "weights.safetensors").read_bytes()


def test_resume_refuses_a_work_dir_of_other_settings(checkpoint, ids, tmp_path):
    _, d = checkpoint
    _layerwise(d, _cfg(calibration="minmax"), ids, tmp_path / "w")
    with pytest.raises(sq.ConfigError, match="group_size|config"):
        _layerwise(d, _cfg(calibration="minmax", group_size=16), ids, tmp_path / "w")


def test_device_plumbing_errors():
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedError, match="no CUDA GPU"):
            resolve_device("cuda")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UnsupportedError, match="guard"):
        sq.compile("unused", sq.QuantConfig(), calibration_data=[[1, 2]], device="cpu")


def test_plan_cli_prints_the_estimate_and_refuses_what_cannot_fit(checkpoint, capsys):
    from sagequant.tools.cli import main
    _, d = checkpoint
    assert main(["plan", "--model", str(d), "--method", "gptq", "--device", "cpu", "--samples", "8",
                 "--seq-len", "16", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # GPTQ statistics: a float64 Hessian per linear of a block (6 of width 64, down_proj 96)
    assert plan["detail"]["stats_bytes"] >= (6 * 64 * 64 + 96 * 96) * 8
    assert plan["detail"]["layers"] == LAYERS and plan["peak_cpu_bytes"] > plan["detail"]["cache_bytes"]
    # 10^6 samples x 4096 tokens: the activation cache alone is terabytes
    assert main(["plan", "--model", str(d), "--method", "gptq", "--device", "cpu",
                 "--samples", "1000000", "--seq-len", "4096"]) == 2
    err = capsys.readouterr().err
    assert "cannot fit" in err and "CPU memory: needs ~" in err and "GiB available" in err


def test_finished_blocks_leave_nothing_large_on_the_device(checkpoint, ids, tmp_path, monkeypatch):
    """After block i, every tensor of blocks <= i at or above the resident threshold (1 KiB here,
    so the tiny model's weights count) is a meta placeholder: the replaced float weights too."""
    import sagequant.passes.layerwise as layerwise
    _, d = checkpoint
    monkeypatch.setattr(layerwise, "KEEP_RESIDENT_BYTES", 1024)
    seen = []

    def check(self, seg):
        if 1 <= seg <= LAYERS:
            done = [f".layers.{b}." for b in range(seg)]
            big = {n for n, t in list(self.graph.gm.named_buffers()) + list(self.graph.gm.named_parameters())
                   if any(p in n for p in done) and t.device.type != "meta" and t.numel() * t.element_size() >= 1024}
            seen.append(big)
    monkeypatch.setattr(LayerwiseCompile, "_segment_done", check)
    cm = _layerwise(d, _cfg(calibration="gptq"), ids, tmp_path / "w")
    assert seen == [set()] * LAYERS
    assert cm.graph.attr("model.model.layers.2.mlp.down_proj.qweight").device.type == "cpu"


def test_calibrate_cli_with_device_writes_a_loadable_artifact(tmp_path, word_checkpoint, capsys):
    """`sagequant calibrate --device cpu`: plan lines first, blocks recorded in --work-dir, and
    the artifact loads back and computes what the compile returned."""
    from sagequant.tools.cli import main
    d, data = word_checkpoint(tmp_path / "ckpt", "calib.jsonl", hidden_size=64, num_hidden_layers=2)
    out, work = tmp_path / "art", tmp_path / "work"
    assert main(["calibrate", "--model", str(d), "--dataset", str(data), "--output", str(out),
                 "--method", "gptq", "--weight-dtype", "int4", "--group-size", "32", "--guard", "off",
                 "--samples", "8", "--seq-len", "16", "--device", "cpu", "--work-dir", str(work)]) == 0
    captured = capsys.readouterr()
    assert "plan (gptq on cpu, 8 x 16 tokens, 2 blocks" in captured.err
    assert sorted(p.name for p in work.glob("segment_*.json")) == [f"segment_{i:03d}.json" for i in range(4)]
    cm = sq.load(out)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    assert cm(ids).shape == (1, 8, 64)
    assert cm.report()["quantized_layers"] == 14
