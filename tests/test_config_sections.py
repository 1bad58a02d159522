"""QuantConfig in sections: the flat seed names stay the constructor's keywords, the attributes and
the JSON form, so configs written before the sections existed load to the same meaning."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from sagequant.config import FIELDS, SECTIONS, ConfigError, QuantConfig

# Written by the flat (single-class) QuantConfig of commit 0a66264: the JSON of five configs and
# what they meant (scheme, formats, observer, per-layer settings).
FIXTURE = json.loads((Path(__file__).parent / "data" / "quant_config_v1.json").read_text())


@pytest.mark.parametrize("name", sorted(FIXTURE))
def test_configs_written_before_the_sections_load_to_the_same_meaning(name):
    old = FIXTURE[name]
    cfg = QuantConfig.from_dict(old["json"])
    new = cfg.to_dict()
    assert [k for k in new if k in old["json"]] == list(old["json"])  # same keys in the same order
    assert {k: new[k] for k in old["json"]} == old["json"]           # with the same values
    defaults = QuantConfig().to_dict()                               # fields added since: defaults
    assert {k: v for k, v in new.items() if k not in old["json"]} == {
        k: v for k, v in defaults.items() if k not in old["json"]}
    assert (cfg.scheme, cfg.weight_format, cfg.activation_format, cfg.observer_kind) == (
        old["scheme"], old["weight_format"], old["activation_format"], old["observer_kind"])
    for layer, settings in old["layer_settings"].items():
        got = cfg.layer_settings(layer)
        assert (dataclasses.asdict(got) if got else None) == settings, layer
    assert QuantConfig.from_json(cfg.to_json()) == cfg


def test_every_flat_field_lives_in_exactly_one_section():
    owners = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owners, f"{f.name} in {owners.get(f.name)} and {section}"
            owners[f.name] = section
    assert sorted(owners) == sorted(FIELDS)
    assert set(FIXTURE["default"]["json"]) <= set(FIELDS)


def test_flat_attributes_read_their_section():
    cfg = QuantConfig(group_size=64, kv_cache_dtype="fp8_e4m3", guard="report", backend="cuda",
                      calibration="awq", awq_grid=10, target_bits_per_weight=5.0)
    assert cfg.group_size == cfg.weights.group_size == 64
    assert cfg.kv_cache_dtype == cfg.kv_cache.kv_cache_dtype == "fp8"  # normalised in its section
    assert (cfg.guard, cfg.guard_options.guard) == ("report", "report")
    assert (cfg.backend, cfg.backend_options.backend) == ("cuda", "cuda")
    assert (cfg.calibration, cfg.calibration_options.awq_grid) == ("awq", 10)
    assert cfg.mixed_precision.target_bits_per_weight == 5.0
    # Defaults come from the sections (the fixture predates these fields, and its scale_precision
    # default was fp16).
    newer = ("gptq_true_sequential", "sink_tokens", "rotate", "rotate_online", "rotate_heads", "rotate_seed",
             "gptq_row_energy_cap", "gptq_sink_weight", "gptq_select_blocks", "kv_scale_precision", "scale_precision",
             "awq_sink_weight", "awq_scale_loss", "gptq_static_groups")
    assert {k: v for k, v in QuantConfig().to_dict().items() if k not in newer} == \
        {k: v for k, v in FIXTURE["default"]["json"].items() if k != "scale_precision"}


def test_w8a8_activation_spelling_resolves_against_the_weights_section():
    assert QuantConfig(weight_dtype="fp8", activation_dtype="w8a8").activations.activation_dtype == "fp8"
    assert QuantConfig(weight_dtype="int8", activation_dtype="w8a8").activation_dtype == "int8"


def test_a_config_is_not_changed_after_construction():
    cfg = QuantConfig()
    with pytest.raises(AttributeError, match="replace"):
        cfg.group_size = 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.weights.group_size = 64
    assert cfg.replace(group_size=64).group_size == 64 and cfg.group_size == 128


def test_unknown_fields_fail_by_name():
    with pytest.raises(TypeError, match="'group_sizes'"):
        QuantConfig(group_sizes=64)
    with pytest.raises(ConfigError, match="no field 'group_sizes'; valid fields: weight_dtype"):
        QuantConfig.from_dict({"group_sizes": 64})


def test_section_checks_name_the_flat_field():
    with pytest.raises(ConfigError, match=r"QuantConfig.kv_block_size=8 is not supported; valid: 16, 32"):
        QuantConfig(kv_block_size=8)
    with pytest.raises(ConfigError, match=r"QuantConfig.fallback='cpu' equals QuantConfig.backend='cpu'"):
        QuantConfig(fallback="cpu")
