import json
import math

import pytest

from sagequant.config import ConfigError, QuantConfig
from sagequant.ir.kv_plan import KVQuantPlan, build_kv_plan


@pytest.mark.parametrize(
    "kv, precision, elem, scale",
    [("int8", "fp16", 1, 2), ("fp8", "fp32", 1, 4), ("fp8_e4m3", "fp16", 1, 2),
     ("none", "fp32", 2, 0)],
)
def test_build_kv_plan(kv, precision, elem, scale):
    cfg = QuantConfig(kv_cache_dtype=kv, kv_scale_precision=precision, kv_block_size=32,
                      kv_group_size=64, kv_high_precision_layers=[5, 0])
    plan = build_kv_plan(cfg)
    assert plan.dtype == cfg.kv_cache_dtype
    assert (plan.block_size, plan.group_size, plan.scale_precision) == (32, 64, precision)
    assert plan.enabled == (kv != "none")
    assert (plan.bytes_per_element, plan.scale_bytes) == (elem, scale)
    # High-precision layers only mean something when the cache is quantized.
    assert plan.high_precision_layers == ((0, 5) if plan.enabled else ())


def test_default_config_gives_disabled_plan():
    assert build_kv_plan(QuantConfig()) == KVQuantPlan()


def test_round_trip_through_json():
    plan = KVQuantPlan(dtype="int8", block_size=32, group_size=16, scale_precision="fp32",
                       high_precision_layers=(2, 0))
    assert plan.high_precision_layers == (0, 2)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["high_precision_layers"] == [0, 2]
    assert KVQuantPlan.from_dict(data) == plan


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"block_size": 64}, r"block_size=64 .*valid: 16, 32"),
        ({"block_size": 16.0}, r"block_size=16.0"),
        ({"block_size": math.nan}, r"block_size=nan"),
        ({"block_size": True}, r"block_size=True"),
        ({"dtype": "int4"}, r"dtype='int4' .*valid: none, int8, fp8"),
        ({"group_size": 0}, r"group_size=0"),
        ({"group_size": math.nan}, r"group_size=nan"),
        ({"scale_precision": "bf16"}, r"scale_precision='bf16'.*fp16, fp32"),
        ({"high_precision_layers": (1, -2)}, r"high_precision_layers=\(1, -2\)"),
        ({"high_precision_layers": (1.0,)}, r"high_precision_layers"),
    ],
)
def test_invalid_plans(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        KVQuantPlan(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match=r"no field 'bits'; valid fields: dtype, block_size"):
        KVQuantPlan.from_dict({"dtype": "int8", "bits": 8})


def test_validate_layers():
    plan = build_kv_plan(QuantConfig(kv_cache_dtype="fp8", kv_high_precision_layers=[0, 30, 31]))
    plan.validate_layers(32)
    with pytest.raises(ConfigError, match=r"layers \[30, 31\] that do not exist; valid: 0..29"):
        plan.validate_layers(30)
    with pytest.raises(ConfigError, match="num_layers=0"):
        plan.validate_layers(0)


def test_bad_block_size_from_config():
    with pytest.raises(ConfigError, match="kv_block_size=8"):
        build_kv_plan(QuantConfig(kv_cache_dtype="int8", kv_block_size=8))
