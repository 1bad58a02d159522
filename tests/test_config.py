import math

import pytest

from sagequant.config import ConfigError, LayerSettings, QuantConfig

Q = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "weight, act, scheme",
    [
        ("int8", "fp16", "W8A16"),
        ("w8a16", "w8a16", "W8A16"),
        ("INT8", "bfloat16", "W8A16"),
        ("int4", "w8a16", "W4A16"),
        ("w4a16", "a16", "W4A16"),
        ("int4", "none", "W4A16"),
        ("fp8", "bf16", "FP8-W8A16"),
        ("fp8", "float16", "FP8-W8A16"),
        ("nf4", "w4a16", "NF4-A16"),
        ("int8", "int8", "W8A8-INT8"),
        ("w8a8", "int8", "W8A8-INT8"),
        ("w8a8", "w8a8", "W8A8-INT8"),
        ("int8", "w8a8", "W8A8-INT8"),
        ("fp8", "fp8", "W8A8-FP8"),
        ("w8a8", "fp8", "W8A8-FP8"),
        ("fp8", "w8a8", "W8A8-FP8"),
    ],
)
def test_scheme_normalisation(weight, act, scheme):
    cfg = QuantConfig(weight_dtype=weight, activation_dtype=act)
    assert cfg.scheme == scheme
    assert cfg.weight_dtype == weight.lower()
    assert cfg.activation_dtype in ("a16", "int8", "fp8")


def test_defaults_are_w4a16_cpu():
    cfg = QuantConfig()
    assert cfg.scheme == "W4A16"
    assert (cfg.group_size, cfg.backend, cfg.ignore) == (128, "cpu", ["lm_head"])
    assert cfg.activation_format is None


@pytest.mark.parametrize(
    "kwargs, fmt, act_fmt",
    [
        ({"weight_dtype": "int8"}, "int8", None),
        ({"weight_dtype": "int8", "symmetric": False}, "uint8", None),
        ({"weight_dtype": "int4", "symmetric": False}, "uint4", None),
        ({"weight_dtype": "nf4"}, "nf4", None),
        ({"weight_dtype": "fp8", "fp8_format": "E5M2"}, "fp8_e5m2", None),
        ({"weight_dtype": "fp8", "activation_dtype": "fp8"}, "fp8_e4m3", "fp8_e4m3"),
        ({"weight_dtype": "w8a8", "activation_dtype": "int8"}, "int8", "int8"),
    ],
)
def test_formats(kwargs, fmt, act_fmt):
    cfg = QuantConfig(**kwargs)
    assert (cfg.weight_format, cfg.activation_format) == (fmt, act_fmt)


@pytest.mark.parametrize(
    "dtypes, match",
    [
        (("w8a16", "int8"), "weight_dtype='w8a16'.*activation_dtype='int8'"),
        (("w4a16", "fp8"), "weight_dtype='w4a16'.*activation_dtype='fp8'"),
        (("w8a8", "bf16"), "weight_dtype='w8a8'.*activation_dtype='a16'"),
        (("nf4", "fp8"), "weight_dtype='nf4'.*NF4 weights run with 16-bit activations only.*W4A8-INT8"),
        (("fp8", "int8"), "weight_dtype='fp8'.*activation_dtype='int8'"),
        (("int8", "fp8"), "weight_dtype='int8'.*activation_dtype='fp8'"),
    ],
)
def test_scheme_contradictions_name_fields_and_valid_schemes(dtypes, match):
    with pytest.raises(ConfigError, match=match) as err:
        QuantConfig(weight_dtype=dtypes[0], activation_dtype=dtypes[1])
    assert "valid schemes: W8A16" in str(err.value) and "W8A8-FP8" in str(err.value)


@pytest.mark.parametrize("weight", ["fp8", "nf4"])
def test_asymmetric_fp8_nf4_rejected(weight):
    with pytest.raises(ConfigError, match=r"symmetric=False.*weight_dtype.*symmetric only"):
        QuantConfig(weight_dtype=weight, symmetric=False)


def test_qat_with_nf4_rejected_naming_supported_schemes():
    with pytest.raises(ConfigError, match=r"enable_qat=True.*weight_dtype='nf4'.*W4A16"):
        QuantConfig(weight_dtype="nf4", enable_qat=True)
    assert QuantConfig(weight_dtype="int4", enable_qat=True).enable_qat


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("backend", "tpu", "backend='tpu' is not supported; valid: ascend, cpu, cuda, kunlun, mlu, "
                           "onnxruntime, rocm, tensorrt"),
        ("weight_dtype", "int3", "weight_dtype='int3'.*valid: fp8, int4"),
        ("activation_dtype", "int4", "activation_dtype='int4'"),
        ("calibration", "hqq", "calibration='hqq'.*smoothquant\\+awq"),
        ("kv_cache_dtype", "fp16", "kv_cache_dtype='fp16'.*valid: fp8, fp8_e4m3, int8, none"),
        ("priority", "speed", "priority='speed'"),
        ("scale_precision", "bf16", "scale_precision='bf16'"),
        ("fp8_format", "e3m4", "fp8_format='e3m4'"),
        ("group_size", 0, "group_size=0"),
        ("group_size", -2, "group_size=-2"),
        ("group_size", "128", "group_size='128'"),
        ("group_size", True, "group_size=True"),
        ("symmetric", "yes", "symmetric='yes' must be a bool"),
        ("per_channel", 1, "per_channel=1 must be a bool"),
        ("clip_ratio", 0.0, "clip_ratio=0.0"),
        ("clip_ratio", 1.5, "clip_ratio=1.5"),
        ("clip_ratio", math.nan, "clip_ratio=nan"),
        ("clip_ratio", math.inf, "clip_ratio=inf"),
        ("calibration_samples", 0, "calibration_samples=0"),
        ("calibration_seq_len", True, "calibration_seq_len=True"),
        ("kv_block_size", 64, "kv_block_size=64.*valid: 16, 32"),
        ("kv_block_size", 16.0, "kv_block_size=16.0"),
        ("kv_group_size", -1, "kv_group_size=-1"),
        ("kv_high_precision_layers", [0, -1], "kv_high_precision_layers"),
        ("ignore", "lm_head", "ignore='lm_head' must be a list"),
        ("fallback", "cpu", "fallback='cpu' equals QuantConfig.backend='cpu'"),
        ("fallback", "gpu", "fallback='gpu' is not supported"),
        ("overrides", [], "overrides=\\[\\] must be a dict"),
    ],
)
def test_bad_field_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**{field: value})


def test_normalisations():
    cfg = QuantConfig(calibration="AWQ+SmoothQuant", group_size=-1, kv_cache_dtype="fp8_e4m3",
                      backend="CUDA", fallback="cpu", kv_high_precision_layers=[3, 0, 3],
                      clip_ratio=1)
    assert cfg.calibration == "smoothquant+awq"
    assert cfg.group_size is None
    assert cfg.kv_cache_dtype == "fp8"
    assert (cfg.backend, cfg.fallback) == ("cuda", "cpu")
    assert cfg.kv_high_precision_layers == [0, 3]
    assert isinstance(cfg.clip_ratio, float)


def test_kv_layers_without_kv_quant_are_accepted():
    assert QuantConfig(kv_cache_dtype="none", kv_high_precision_layers=[0]).kv_cache_dtype == "none"


def test_unknown_key_and_bad_json():
    with pytest.raises(ConfigError, match=r"no field 'bits'; valid fields: weight_dtype, "):
        QuantConfig.from_dict({"bits": 4})
    with pytest.raises(ConfigError, match=r"no field 'grup_size'"):
        QuantConfig.from_json('{"grup_size": 64}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        QuantConfig.from_json("{")
    with pytest.raises(ConfigError, match="needs a mapping"):
        QuantConfig.from_json("[1]")
    with pytest.raises(ConfigError, match="group_size='128'"):
        QuantConfig.from_json('{"group_size": "128"}')


def test_json_round_trip_keeps_overrides_and_their_order():
    cfg = QuantConfig(weight_dtype="w8a8", activation_dtype="int8", kv_cache_dtype="int8",
                      overrides={"*.mlp.*": {"group_size": -1}, "*down_proj": "skip",
                                 "layers.0.*": {"weight_dtype": "INT8",
                                                "activation_dtype": "fp16"}},
                      ignore=["lm_head", "*.embed_tokens"], kv_high_precision_layers=[0, 1])
    back = QuantConfig.from_json(cfg.to_json())
    assert back == cfg
    assert list(back.overrides) == ["*.mlp.*", "*down_proj", "layers.0.*"]
    assert back.overrides["*.mlp.*"] == {"group_size": None}
    assert back.overrides["layers.0.*"] == {"weight_dtype": "int8", "activation_dtype": "a16"}
    assert back.layer_settings("model.layers.0.self_attn.o_proj").scheme == "W8A16"


def test_replace_validates():
    cfg = QuantConfig()
    assert cfg.replace(weight_dtype="int8").scheme == "W8A16"
    assert cfg.scheme == "W4A16"
    assert cfg.replace(activation_dtype="int8").scheme == "W4A8-INT8"
    with pytest.raises(ConfigError, match="activation_dtype='int8'"):
        cfg.replace(weight_dtype="nf4", activation_dtype="int8")
    with pytest.raises(ConfigError, match="no field 'bogus'"):
        cfg.replace(bogus=1)


def test_ignore_matching():
    cfg = QuantConfig(ignore=["lm_head", "model.layers.1.*", "k_proj", "layers.2.mlp.*"])
    assert QuantConfig().layer_settings("lm_head") is None
    assert QuantConfig().layer_settings("model.lm_head") is None
    assert cfg.layer_settings("model.layers.1.mlp.up_proj") is None
    assert cfg.layer_settings("model.layers.0.self_attn.k_proj") is None
    assert cfg.layer_settings("model.layers.2.mlp.up_proj") is None
    assert cfg.layer_settings("model.layers.12.mlp.up_proj") is not None
    assert cfg.layer_settings(Q) is not None
    # A short name matches whole dotted components only.
    assert cfg.layer_settings("model.layers.0.self_attn.kk_proj") is not None
    assert QuantConfig(ignore=[]).layer_settings("lm_head") is not None


def test_layer_settings_without_overrides():
    cfg = QuantConfig(weight_dtype="int4", group_size=64, clip_ratio=0.9)
    assert cfg.layer_settings(Q) == LayerSettings("W4A16", "int4", None, 64, True, True, 0.9)


def test_overrides_applied_later_patterns_win():
    cfg = QuantConfig(weight_dtype="int4", overrides={
        "*.mlp.*": {"weight_dtype": "int8", "group_size": None, "per_channel": False},
        "*.down_proj": {"group_size": 32, "symmetric": False},
        "model.layers.3.*": "skip",
        "model.layers.3.mlp.gate_proj": {"clip_ratio": 0.5},
    })
    assert cfg.layer_settings(Q).scheme == "W4A16"
    up = cfg.layer_settings("model.layers.0.mlp.up_proj")
    assert (up.scheme, up.group_size, up.per_channel) == ("W8A16", None, False)
    down = cfg.layer_settings("model.layers.0.mlp.down_proj")
    assert (down.scheme, down.weight_format, down.group_size) == ("W8A16", "uint8", 32)
    assert cfg.layer_settings("model.layers.3.self_attn.v_proj") is None
    gate = cfg.layer_settings("model.layers.3.mlp.gate_proj")
    assert (gate.scheme, gate.clip_ratio) == ("W8A16", 0.5)


def test_override_to_quantized_activations():
    cfg = QuantConfig(weight_dtype="int8", activation_dtype="int8",
                      overrides={"*down_proj": {"activation_dtype": "bf16"}})
    assert cfg.layer_settings("model.layers.0.mlp.down_proj").scheme == "W8A16"
    assert cfg.layer_settings(Q).activation_format == "int8"


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"*q_proj": {"bits": 4}}, r"overrides\['\*q_proj'\] sets unknown key 'bits'; valid keys"),
        ({"*q_proj": {"backend": "cuda"}}, r"overrides\['\*q_proj'\] sets unknown key 'backend'"),
        ({"*q_proj": {"weight_dtype": "nf4", "activation_dtype": "int8"}},
         r"overrides\['\*q_proj'\]: .*weight_dtype='nf4'.*W4A8"),
        ({"*q_proj": {"weight_dtype": "nf4", "symmetric": False}},
         r"overrides\['\*q_proj'\]: .*symmetric=False"),
        ({"*q_proj": {"group_size": 0}}, r"overrides\['\*q_proj'\]: .*group_size=0"),
        ({"*q_proj": "keep"}, r"overrides\['\*q_proj'\]='keep' must be a dict or 'skip'"),
        ({"": "skip"}, "pattern that is not a non-empty string"),
    ],
)
def test_bad_overrides(overrides, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(overrides=overrides)


def test_overrides_are_validated_against_the_base_config():
    # w8a8 weights need quantized activations, so a 16-bit override must also change the weights.
    with pytest.raises(ConfigError, match=r"overrides\['\*o_proj'\]: .*weight_dtype='w8a8'"):
        QuantConfig(weight_dtype="w8a8", activation_dtype="int8",
                    overrides={"*o_proj": {"activation_dtype": "fp16"}})


def test_overrides_contradicting_only_in_combination_fail_per_layer():
    cfg = QuantConfig(weight_dtype="int8", overrides={
        "*.mlp.*": {"activation_dtype": "int8"},
        "*.down_proj": {"weight_dtype": "nf4"},
    })
    assert cfg.layer_settings("model.layers.0.mlp.up_proj").scheme == "W8A8-INT8"
    assert cfg.layer_settings("model.layers.0.self_attn.o_proj").scheme == "W8A16"
    with pytest.raises(ConfigError, match=r"overrides of layer '\S+down_proj'.*NF4 weights"):
        cfg.layer_settings("model.layers.0.mlp.down_proj")
