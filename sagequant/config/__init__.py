"""QuantConfig and its sections, one file each:

  weights.py          weight_dtype, group_size, symmetric, per_channel, clip_ratio, scale_precision,
                      fp8_format, weight_observer, nf4_double_quant
  activations.py      activation_dtype, activation_scale, observer
  kv_cache.py         kv_cache_dtype, kv_block_size, kv_group_size, kv_high_precision_layers,
                      kv_scale_precision
  calibration.py      calibration (the method), samples / seq_len, SmoothQuant / AWQ / GPTQ options
  guard.py            guard, guard_samples, guard_bounds (and the per-scheme default bounds)
  mixed_precision.py  target_bits_per_weight / target_max_delta_loss, upgrades, sensitivity
  qat.py              enable_qat, qat_learn_scales
  backend.py          backend, priority, fallback, fuse_ln, fuse_qdq, draft_mode
  rotation.py         rotate, rotate_online, rotate_heads, rotate_seed (the rotate pass)
  layers.py           ignore, overrides; LayerSettings (one layer's effective quantization)
  quant_config.py     QuantConfig: the sections together, the checks across them, the flat form
  checks.py           ConfigError and the field checks the sections share
"""
from .backend import BACKENDS
from .checks import ConfigError, layer_matches, strict_from_dict
from .guard import GUARD_BOUND_KEYS, GUARD_DEFAULTS
from .kv_cache import KV_BLOCK_SIZES
from .layers import OVERRIDE_KEYS, SKIP, LayerSettings
from .mixed_precision import PRECISION_UPGRADES
from .quant_config import FIELDS, SCHEMES, SECTIONS, QuantConfig

__all__ = ["BACKENDS", "ConfigError", "FIELDS", "GUARD_BOUND_KEYS", "GUARD_DEFAULTS", "KV_BLOCK_SIZES",
           "LayerSettings", "OVERRIDE_KEYS", "PRECISION_UPGRADES", "QuantConfig", "SCHEMES", "SECTIONS",
           "SKIP", "layer_matches", "strict_from_dict"]
