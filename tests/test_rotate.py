"""The rotate pass (passes/rotate.py) and its math (calibration/rotation.py): Hadamard orders,
the online rotation op against dense float64 matrices, float equivalence of the rotated graph on
tiny random Llama / Qwen2 / Mistral models, exact graph structure, unsupported graphs, the config
and pipeline wiring, and a compiled artifact with rotation through save / load."""
import copy
import json
import math

import pytest
import torch

import sagequant as sq
from sagequant.calibration.rotation import (dense_online, describe_online, hadamard, kronecker_split,
                                            online_block, random_orthogonal, residual_rotation)
from sagequant.config import ConfigError
from sagequant.ir.ops import apply_online, walsh_hadamard
from sagequant.ir.rotation_patterns import RotationMatchError
from sagequant.passes import PASSES, PassContext
from sagequant.passes.pipeline import LAYERWISE, build_pipeline

ONLINE = "sagequant.online_rotate.default"


def sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def eye(n):
    return torch.eye(n, dtype=torch.float64)


# ----------------------------------------------------------------------------- math
@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 36, 64, 72, 96, 576, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.t(), n * eye(n))


def test_hadamard_unreachable_orders_and_their_fallback():
    assert [n for n in (3, 6, 10, 18, 52) if hadamard(n) is None] == [3, 6, 10, 18, 52]
    # SmolLM2 widths: Paley/Kronecker block times the largest power-of-two Walsh-Hadamard.
    assert [kronecker_split(n) for n in (576, 1536, 64, 99)] == [(36, 16), (12, 128), (1, 64), (99, 1)]
    assert describe_online(99) == "random-orthogonal99"
    q = online_block(99, seed=3)
    torch.testing.assert_close(q @ q.t(), eye(99), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(99, 3)) and not torch.equal(q, random_orthogonal(99, 4))


@pytest.mark.parametrize("n", [64, 96, 99, 576, 1536])
def test_online_rotation_is_the_kronecker_matrix(n):
    m, p = kronecker_split(n)
    dense = torch.kron(online_block(n), sylvester(p) / math.sqrt(p))
    torch.testing.assert_close(dense_online(n), dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(dense @ dense.t(), eye(n), rtol=0, atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(apply_online(x, online_block(n)), x @ dense, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.ops.sagequant.online_rotate(x.float(), online_block(n).float()),
                               (x @ dense).float(), rtol=0, atol=1e-5)


def test_walsh_hadamard_and_residual_rotation():
    x = torch.randn(7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(walsh_hadamard(x), x @ sylvester(32) / math.sqrt(32), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        walsh_hadamard(torch.ones(2, 12))
    for kind in ("hadamard", "random"):
        r = residual_rotation(576, kind, seed=1)
        torch.testing.assert_close(r @ r.t(), eye(576), rtol=0, atol=1e-12)
    # randomised Hadamard: signs times the Kronecker Hadamard, every entry ±1/√n
    r = residual_rotation(576, "hadamard", seed=1)
    torch.testing.assert_close(r.abs(), torch.full((576, 576), 1 / 24.0, dtype=torch.float64), rtol=0, atol=1e-12)
    assert not torch.equal(r, residual_rotation(576, "hadamard", seed=2))


# ----------------------------------------------------------------------------- the pass
_TRACES: dict = {}


@pytest.fixture(scope="module")
def traced64(helpers):
    """traced64(arch, **kw) -> (float64 model, a private copy of its traced graph), traced once."""
    from sagequant.ir.trace import trace_model

    def get(arch, **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in _TRACES:
            model = helpers.build_tiny(arch, **kw).double()
            _TRACES[key] = (model, trace_model(model))
        model, graph = _TRACES[key]
        return model, copy.deepcopy(graph)
    return get


def _rotated(graph, **cfg):
    ctx = PassContext(sq.QuantConfig(**{"rotate": "hadamard", **cfg}))
    for name in ("canonicalize", "annotate"):
        PASSES[name](graph, ctx)
        ctx.ran.append(name)
    before = graph.op_counts()
    result = PASSES["rotate"](graph, ctx)
    graph.verify()
    return graph, result, before


CASES = [("llama", dict(tie_word_embeddings=True)), ("qwen2", {}), ("mistral", {}),
         ("llama", dict(hidden_size=80, intermediate_size=99, head_dim=16))]


@pytest.mark.parametrize("arch,kw", CASES, ids=["llama-tied", "qwen2", "mistral", "llama-ragged"])
def test_rotated_graph_computes_the_float_model(traced64, eval_ids, arch, kw):
    model, graph = traced64(arch, **kw)
    graph, result, _ = _rotated(graph)
    with torch.no_grad():
        ref = model(eval_ids).logits
        out = graph(eval_ids)
    # float64 everywhere but inside RMSNorm, which (as in transformers) normalises in float32.
    err = (out - ref).abs().max() / ref.abs().max()
    assert err < 1e-6, err
    assert result.stats["norms_folded"] == 5 and result.stats["writers_rotated"] == 4
    # The rotation really moved the residual stream: the embedding rows are not the model's.
    emb = graph.nodes(torch.ops.aten.embedding.default)[0]
    assert not torch.allclose(graph.attr(emb.args[0]), model.get_input_embeddings().weight)


def test_rotated_graph_structure(traced64):
    _, graph = traced64("llama", tie_word_embeddings=True)
    graph, result, before = _rotated(graph)
    after = graph.op_counts()
    assert after.pop(ONLINE) == 2 and ONLINE not in before
    assert after == before  # nothing else added or removed
    norms = graph.nodes(torch.ops.sagequant.rms_norm.default)
    assert len(norms) == 5
    for n in norms:
        assert torch.equal(graph.attr(n.args[1]), torch.ones(64, dtype=torch.float64)) and n.args[3] == 0.0
    downs = [n for n in graph.nodes(torch.ops.aten.linear.default) if n.args[0].target ==
             torch.ops.sagequant.online_rotate.default]
    assert [graph.annotation(n).layer for n in downs] == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert graph.attr(downs[0].args[0].args[1]).shape == (12, 12)  # H12 block, H8 by Walsh-Hadamard
    # Untied: the embedding reads its own tensor, the head the rotated, norm-folded one.
    emb = graph.nodes(torch.ops.aten.embedding.default)[0]
    head = graph.nodes(torch.ops.aten.linear.default)[-1]
    assert emb.args[0].target == "model.model.embed_tokens.weight" != head.args[1].target
    assert graph.model_info["hf_config"]["tie_word_embeddings"] is False
    assert result.stats == {
        "rotation": "hadamard", "hidden": 64, "residual_block": "H64", "norms_folded": 5,
        "readers_rotated": 11, "writers_rotated": 4, "untied_embedding": True, "online_rotations": 2,
        "online_blocks": {96: "H12 x H8"}, "head_rotations": 2}


def test_rotate_options(traced64, eval_ids):
    model, graph = traced64("qwen2")
    graph, result, before = _rotated(graph, rotate_online=False, rotate_heads=False, rotate="random")
    assert graph.op_counts() == before
    assert result.stats["online_rotations"] == 0 and result.stats["head_rotations"] == 0
    with torch.no_grad():
        ref = model(eval_ids).logits
        assert (graph(eval_ids) - ref).abs().max() / ref.abs().max() < 1e-6


@pytest.mark.parametrize("arch,match", [("gemma3", "post-norm"), ("gpt2", "learned position embeddings")])
def test_unsupported_graphs_name_what_did_not_match(traced, arch, match):
    with pytest.raises(RotationMatchError, match=match):
        _rotated(traced(arch)[1])


# ----------------------------------------------------------------------------- config and pipeline
def test_config_and_pipeline():
    with pytest.raises(ConfigError, match="hadamard, none, off, random"):
        sq.QuantConfig(rotate="quarot")
    with pytest.raises(ConfigError, match="sensitivity_method='fisher'"):
        sq.QuantConfig(rotate="hadamard", sensitivity_method="fisher")
    with pytest.raises(ConfigError, match="rotate_online"):
        sq.QuantConfig(rotate="hadamard", rotate_online="yes")
    cfg = sq.QuantConfig(rotate="hadamard", weight_dtype="int8", activation_dtype="int8",
                         calibration="smoothquant")
    names = build_pipeline(cfg).names
    assert names[:4] == ["canonicalize", "annotate", "rotate", "smoothquant"]
    assert build_pipeline(cfg.replace(rotate="none")).omitted_reason("rotate") == "QuantConfig.rotate='off'"
    with pytest.raises(ConfigError, match="layerwise pipeline"):
        build_pipeline(cfg, LAYERWISE)


def test_compiled_rotated_artifact_round_trip(tiny, calib_ids, eval_ids, tmp_path):
    model = tiny("llama", tie_word_embeddings=True)
    cfg = sq.QuantConfig(rotate="hadamard", weight_dtype="int8", activation_dtype="int8",
                         calibration="smoothquant")
    qm = sq.compile(model, cfg, calibration_data=calib_ids)
    history = {h["pass"]: h for h in qm.report()["passes"]}
    assert history["rotate"]["stats"]["untied_embedding"] is True
    # The guard compared each rotated layer with its float layer through the recorded rotations.
    guard = qm.report()["accuracy_guard"]
    assert guard["passed"] and all(r["local_sqnr_db"] > 25 for r in guard["worst_layers"])
    out = qm(eval_ids)
    with torch.no_grad():
        ref = model(eval_ids).logits
    assert (out - ref).abs().max() / ref.abs().max() < 0.05
    qm.save(tmp_path / "art")
    back = sq.load(tmp_path / "art")
    assert back.graph.op_counts()[ONLINE] == 2
    assert torch.equal(back(eval_ids), out)


def test_online_rotation_is_refused_by_the_checkpoint_export(compiled, tmp_path):
    qm = compiled("llama", weight_dtype="int8", group_size=None, rotate="hadamard", guard="off")
    with pytest.raises(sq.errors.ExportError, match="rotate_online=False"):
        qm.export(tmp_path / "ct", format="compressed-tensors")
    fused = compiled("llama", {"tie_word_embeddings": True}, weight_dtype="int8", group_size=None,
                     rotate="hadamard", rotate_online=False, guard="off")
    fused.export(tmp_path / "ct2", format="compressed-tensors")
    config = json.loads((tmp_path / "ct2" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # untied by the rotation: two tensors written


def test_cli_rotate_flag():
    import argparse
    from sagequant.tools.compile_flags import add_compile_flags, config_from_args
    p = argparse.ArgumentParser()
    add_compile_flags(p, dataset_required=False)
    base = ["--model", "m", "--output", "o"]
    assert config_from_args(p.parse_args(base + ["--rotate", "hadamard"])).rotate == "hadamard"
    assert config_from_args(p.parse_args(base)).rotate == "off"
    with pytest.raises(ConfigError, match="QuantConfig.rotate='spin'"):
        config_from_args(p.parse_args(base + ["--rotate", "spin"]))


def test_gptq_after_rotation(tiny, helpers, eval_ids):
    """QuaRot's weight method: rotate, then GPTQ on the rotated weights with the rotated inputs'
    Hessians (§2j: on SmolLM2 int4 RTN loses in the rotated basis, GPTQ there is the best W4A16)."""
    model = tiny("llama")
    calib = torch.randint(0, helpers.VOCAB, (12, 16), generator=torch.Generator().manual_seed(7))
    cfg = sq.QuantConfig(weight_dtype="int4", activation_dtype="a16", group_size=32, rotate="hadamard",
                         guard="off")
    rtn = sq.compile(model, cfg, calibration_data=calib)
    gptq = sq.compile(model, cfg.replace(calibration="gptq"), calibration_data=calib)
    history = {h["pass"]: h for h in gptq.report()["passes"]}
    assert list(history).index("rotate") < list(history).index("gptq")
    stats = history["gptq"]["stats"]
    assert stats["layers"] == 14 and stats["gptq_error"] < 0.7 * stats["rtn_error"], stats
    with torch.no_grad():
        ref = torch.log_softmax(model(eval_ids).logits.double(), -1)
    kl = {name: (ref.exp() * (ref - torch.log_softmax(qm(eval_ids).double(), -1))).sum(-1).mean().item()
          for name, qm in (("rtn", rtn), ("gptq", gptq))}
    assert kl["gptq"] < kl["rtn"], kl
