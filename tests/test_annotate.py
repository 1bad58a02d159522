"""annotate: which linears quantize and how, from QuantConfig, ignore globs and overrides."""
import pytest
import torch

import sagequant as sq
from sagequant.ir.annotations import META_KEY, NodeAnnotation
from sagequant.ir.quant_spec import QuantSpec
from sagequant.passes import PassContext, PassManager

LAYER0 = [f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj",
                                          "self_attn.v_proj", "self_attn.o_proj",
                                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
ALL_LINEARS = LAYER0 + [n.replace("layers.0", "layers.1") for n in LAYER0] + ["lm_head"]


def annotate(traced, cfg, arch="llama", **kw):
    _, graph = traced(arch, **kw)
    pm = PassManager(["canonicalize", "annotate"])
    graph = pm.run(graph, PassContext(cfg))
    anns = {graph.annotation(n).layer: graph.annotation(n) for n in graph.annotated()}
    return anns, graph, pm


def int4(g, sym=True, scale="fp32"):
    return QuantSpec("int4" if sym else "uint4", "per_group", g, sym, scale)


def test_default_config_keeps_lm_head_float(traced):
    anns, graph, pm = annotate(traced, sq.QuantConfig(group_size=32))
    assert sorted(anns) == sorted(ALL_LINEARS)
    # Every annotated node is a linear and the annotation is the typed dataclass.
    for node in graph.annotated():
        assert node.target == torch.ops.aten.linear.default
        assert isinstance(node.meta[META_KEY], NodeAnnotation)
    head = anns["lm_head"]
    assert not head.quantized and head.scheme is None and head.weight_spec is None
    assert head.skip_reason == "QuantConfig.ignore"
    for name in ALL_LINEARS[:-1]:
        a = anns[name]
        assert a.quantized and a.scheme == "W4A16" and a.skip_reason is None
        assert a.weight_spec == int4(32)
        assert a.input_spec is None  # A16: activations stay float
        assert a.clip_ratio == 1.0 and a.role == "linear"
        assert a.calibration == {} and a.kernel is None and a.scheduler is None
    assert pm.history[-1]["stats"] == {"quantized": 14, "kept_float": 1}


def test_ignore_nothing_quantizes_lm_head(traced):
    anns, *_ = annotate(traced, sq.QuantConfig(group_size=64, ignore=[]))
    assert all(a.quantized for a in anns.values())
    assert anns["lm_head"].weight_spec == int4(64)


@pytest.mark.parametrize("patterns, kept", [
    (["lm_head", "layers.0.*"], LAYER0 + ["lm_head"]),
    (["lm_head", "*.down_proj"], ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
                                  "lm_head"]),
    (["lm_head", "model.layers.1.self_attn.[qk]_proj"], ["model.layers.1.self_attn.q_proj",
                                                         "model.layers.1.self_attn.k_proj", "lm_head"]),
    (["mlp.*"], [n for n in ALL_LINEARS if ".mlp." in n]),
])
def test_ignore_globs(traced, patterns, kept):
    anns, *_ = annotate(traced, sq.QuantConfig(ignore=patterns))
    assert sorted(n for n, a in anns.items() if not a.quantized) == sorted(kept)
    for name in kept:
        assert anns[name].skip_reason == "QuantConfig.ignore"


def test_glob_matches_dotted_suffix_only(traced):
    # "proj" is not a dotted suffix of any name ("q_proj" is), so it matches no layer.
    with pytest.raises(sq.ConfigError, match="'proj'"):
        annotate(traced, sq.QuantConfig(ignore=["proj"]))


def test_override_skip(traced):
    cfg = sq.QuantConfig(overrides={"layers.1.mlp.*": "skip"})
    anns, *_ = annotate(traced, cfg)
    skipped = sorted(n for n, a in anns.items() if not a.quantized)
    assert skipped == sorted(["lm_head", "model.layers.1.mlp.gate_proj",
                              "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"])
    assert anns["model.layers.1.mlp.up_proj"].skip_reason == "QuantConfig.overrides: skip"
    assert anns["lm_head"].skip_reason == "QuantConfig.ignore"


def test_per_layer_overrides_mixed_precision(traced, helpers):
    cfg = sq.QuantConfig(group_size=32, overrides={
        "*.down_proj": {"weight_dtype": "int8", "group_size": None},
        "*.q_proj": {"group_size": 16},
        "layers.1.self_attn.k_proj": {"symmetric": False},
        "layers.0.mlp.up_proj": {"clip_ratio": 0.9, "group_size": -1, "per_channel": False},
        "layers.1.mlp.gate_proj": {"weight_dtype": "fp8"},
    })
    anns, *_ = annotate(traced, cfg, **helpers.RAGGED)
    for i in (0, 1):
        down = anns[f"model.layers.{i}.mlp.down_proj"]
        assert down.scheme == "W8A16"
        assert down.weight_spec == QuantSpec("int8", "per_channel", None, True, "fp32")
        assert anns[f"model.layers.{i}.self_attn.q_proj"].weight_spec == int4(16)
        assert anns[f"model.layers.{i}.self_attn.v_proj"].weight_spec == int4(32)
    assert anns["model.layers.1.self_attn.k_proj"].weight_spec == int4(32, sym=False)
    assert anns["model.layers.0.self_attn.k_proj"].weight_spec == int4(32)
    up0 = anns["model.layers.0.mlp.up_proj"]
    assert up0.weight_spec == QuantSpec("int4", "per_tensor", None, True, "fp32")
    assert up0.clip_ratio == 0.9 and anns["model.layers.1.mlp.up_proj"].clip_ratio == 1.0
    gate1 = anns["model.layers.1.mlp.gate_proj"]
    assert gate1.scheme == "FP8-W8A16"
    assert gate1.weight_spec == QuantSpec("fp8_e4m3", "per_group", 32, True, "fp32")


def test_later_override_wins_and_skip_can_be_undone(traced):
    cfg = sq.QuantConfig(group_size=32, overrides={
        "*.o_proj": "skip",
        "layers.0.self_attn.o_proj": {"group_size": 8},
    })
    anns, *_ = annotate(traced, cfg)
    assert anns["model.layers.0.self_attn.o_proj"].weight_spec == int4(8)
    assert not anns["model.layers.1.self_attn.o_proj"].quantized


def test_ignore_beats_override(traced):
    cfg = sq.QuantConfig(ignore=["lm_head", "layers.0.mlp.*"],
                         overrides={"*.mlp.*": {"weight_dtype": "int8"}})
    anns, *_ = annotate(traced, cfg)
    assert not anns["model.layers.0.mlp.up_proj"].quantized
    assert anns["model.layers.1.mlp.up_proj"].scheme == "W8A16"


def test_scale_precision_and_asymmetric_config(traced):
    cfg = sq.QuantConfig(group_size=32, symmetric=False, scale_precision="fp16")
    anns, *_ = annotate(traced, cfg)
    assert anns["model.layers.0.mlp.up_proj"].weight_spec == int4(32, sym=False, scale="fp16")


def test_w8a8_annotates_input_spec(traced):
    has_scale_choice = hasattr(sq.QuantConfig(), "activation_scale")
    kw = {"activation_scale": "static_per_tensor"} if has_scale_choice else {}
    cfg = sq.QuantConfig(weight_dtype="int8", activation_dtype="int8", group_size=None, **kw)
    anns, *_ = annotate(traced, cfg)
    a = anns["model.layers.0.self_attn.q_proj"]
    assert a.scheme == "W8A8-INT8"
    assert a.weight_spec == QuantSpec("int8", "per_channel", None, True, "fp32")
    assert a.input_spec == QuantSpec("int8", "per_tensor", None, True, "fp32")
    assert anns["lm_head"].input_spec is None
    if has_scale_choice:  # the default: per-token scales computed at run time
        cfg = sq.QuantConfig(weight_dtype="fp8", activation_dtype="fp8", group_size=None)
        anns, *_ = annotate(traced, cfg)
        a = anns["model.layers.1.mlp.down_proj"]
        assert a.scheme == "W8A8-FP8"
        assert a.input_spec == QuantSpec("fp8_e4m3", "per_token", None, True, "fp32", dynamic=True)


@pytest.mark.parametrize("field, cfg_kwargs, pattern", [
    ("ignore", {"ignore": ["lm_head", "layers.7.*"]}, "layers.7.*"),
    ("ignore", {"ignore": ["lm_haed"]}, "lm_haed"),
    ("overrides", {"overrides": {"*.dwon_proj": "skip"}}, "*.dwon_proj"),
    ("overrides", {"overrides": {"*.down_proj": "skip", "*.c_attn": {"group_size": 64}}}, "*.c_attn"),
])
def test_pattern_matching_no_layer_is_config_error(traced, field, cfg_kwargs, pattern):
    with pytest.raises(sq.ConfigError) as info:
        annotate(traced, sq.QuantConfig(**cfg_kwargs))
    msg = str(info.value)
    assert f"QuantConfig.{field} pattern {pattern!r}" in msg
    assert "matches no linear layer" in msg and "model.layers.0.self_attn.q_proj" in msg
    assert any("'annotate'" in note for note in getattr(info.value, "__notes__", []))


def test_gpt2_layer_names(traced):
    anns, *_ = annotate(traced, sq.QuantConfig(group_size=32, ignore=["lm_head", "*.c_proj"]), "gpt2")
    assert anns["transformer.h.0.attn.c_attn"].quantized
    assert anns["transformer.h.1.mlp.c_fc"].quantized
    assert not anns["transformer.h.0.attn.c_proj"].quantized
    assert not anns["transformer.h.1.mlp.c_proj"].quantized
    assert len(anns) == 9


def test_annotate_requires_canonicalize(traced):
    _, graph = traced("llama")
    with pytest.raises(RuntimeError, match=r"annotate requires \['canonicalize'\]"):
        PassManager(["annotate"]).run(graph, PassContext(sq.QuantConfig()))
