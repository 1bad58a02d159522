"""compressed-tensors export (backends/compressed_tensors): config.json's quantization_config,
weights decompressed by the compressed-tensors library vs ours, logits of transformers' own
compressed-tensors loading vs the torch path, and refusals.

Tolerances, transformers logits vs CompiledModel logits on the same ids:
  - W4A16 / mixed, W8A8 static (INT8, FP8), W8A8-FP8 dynamic: LOGITS_ATOL. The library
    decompresses weights as code * scale in the scale dtype (fp32 by default, as ours: bit-exact);
    activation codes round the same way.
  - W8A8-INT8 dynamic: INT8_DYNAMIC_ATOL. compressed-tensors' reference forward takes the per-token
    int8 scale as absmax / 127.5 (half the code range), we (and vLLM's int8 kernels) use
    absmax / 127, so activation codes differ by up to one step; the weights are still bit-exact.
"""
import json

import pytest
import torch

from sagequant.backends.onnxruntime.qlinear import ExportError
from sagequant.ir.quant_spec import QuantizedTensor, dequantize
from sagequant.lowering.unfuse import unfused_copy
from sagequant.backends.export import checkpoint_parity, export

LOGITS_ATOL = 1e-3
INT8_DYNAMIC_ATOL = 5e-2
W4 = dict(weight_dtype="int4", activation_dtype="a16", group_size=32,
          overrides={"down_proj": {"symmetric": False},
                     "v_proj": {"weight_dtype": "int8", "group_size": None}})


def _logit_diff(cm, directory, ids) -> float:
    return checkpoint_parity(cm, directory, ids)["max_abs"]


def _ours(cm, layer: str) -> torch.Tensor:
    """Our dequantized weight of `layer`, from the lowered node's buffers."""
    g = cm.graph
    node = next(n for n in unfused_copy(g.graph).nodes if g.annotation(n) and g.annotation(n).layer == layer)
    ann = g.annotation(node)
    q, s, z = (g.attr(a) if a is not None else None for a in node.args[1:4])
    shape = (ann.kernel.attrs["out_features"], ann.kernel.attrs["in_features"])
    return dequantize(QuantizedTensor(q, s, z, shape, ann.weight_spec), torch.float32)


def _decompressed(directory, layer: str) -> torch.Tensor:
    """The library's decompression of one layer, from the files alone."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    group = next(g for g in qc["config_groups"].values()
                 if g["targets"] == ["Linear"] or layer in g["targets"])
    scheme = QuantizationScheme(**group)
    state = {k[len(layer) + 1:]: v for k, v in load_file(str(directory / "model.safetensors")).items()
             if k.startswith(layer + ".")}
    return BaseCompressor.get_value_from_registry(group["format"]).decompress(state, scheme)["weight"]


@pytest.fixture(scope="module")
def w4(compiled, tmp_path_factory):
    cm = compiled("llama", **W4)
    return cm, export(cm, tmp_path_factory.mktemp("ct") / "w4", format="compressed-tensors")


def test_w4a16_mixed_config_groups(w4):
    cm, d = w4
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
    groups = {(g["weights"]["num_bits"], g["weights"]["symmetric"], g["weights"]["strategy"]): g
              for g in qc["config_groups"].values()}
    assert set(groups) == {(4, True, "group"), (4, False, "group"), (8, True, "channel")}
    assert groups[(4, False, "group")]["targets"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert all(g["input_activations"] is None and g["weights"]["group_size"] in (32, None) for g in groups.values())
    from safetensors.torch import load_file
    state = load_file(str(d / "model.safetensors"))
    assert state["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32
    assert state["model.layers.0.mlp.up_proj.weight_packed"].shape == (96, 64 * 4 // 32)
    assert "model.layers.0.mlp.down_proj.weight_zero_point" in state
    assert "model.layers.0.mlp.up_proj.weight_zero_point" not in state  # symmetric: none written
    assert "model.layers.0.mlp.up_proj.weight" not in state and "lm_head.weight" in state


@pytest.mark.parametrize("layer", ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj",
                                   "model.layers.0.self_attn.v_proj"])
def test_library_decompression_is_bit_exact(w4, layer):
    """int4 symmetric, uint4 with zero points, int8 per channel: the library's weights == ours,
    both in the fp32 scale dtype."""
    cm, d = w4
    theirs = _decompressed(d, layer)
    assert theirs.dtype == torch.float32
    assert torch.equal(theirs, _ours(cm, layer))


def test_w4a16_transformers_logits(compiled, tmp_path, eval_ids):
    """Symmetric int4 groups plus int8 channels. (An asymmetric layer's checkpoint is what the
    library writes and decompresses, above, but transformers 5.24 cannot load it: compressed-tensors
    0.20 compresses the empty model on the meta device without packing its zero point, and the
    loader then refuses the packed one as a size mismatch.)"""
    cm = compiled("llama", **{**W4, "overrides": {"v_proj": W4["overrides"]["v_proj"]}})
    d = export(cm, tmp_path / "w4sym", format="compressed-tensors")
    assert _logit_diff(cm, d, eval_ids) < LOGITS_ATOL


@pytest.mark.parametrize("cfg, fmt, atol", [
    (dict(weight_dtype="fp8", activation_dtype="fp8", group_size=None), "float-quantized", LOGITS_ATOL),
    (dict(weight_dtype="int8", activation_dtype="int8", group_size=None,
          activation_scale="static_per_tensor"), "int-quantized", LOGITS_ATOL),
    (dict(weight_dtype="int8", activation_dtype="int8", group_size=None), "int-quantized", INT8_DYNAMIC_ATOL),
])
def test_w8a8(compiled, tmp_path, eval_ids, cfg, fmt, atol):
    cm = compiled("llama", **cfg)
    d = export(cm, tmp_path / "w8a8", format="compressed-tensors")
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    act = group["input_activations"]
    assert qc["format"] == fmt and group["weights"]["strategy"] == "channel"
    static = cfg.get("activation_scale") == "static_per_tensor"
    assert (act["strategy"], act["dynamic"]) == (("tensor", False) if static else ("token", True))
    from safetensors.torch import load_file
    state = load_file(str(d / "model.safetensors"))
    w = state["model.layers.1.self_attn.o_proj.weight"]
    assert w.dtype == (torch.float8_e4m3fn if cfg["weight_dtype"] == "fp8" else torch.int8)
    assert ("model.layers.1.self_attn.o_proj.input_scale" in state) == static
    layer = "model.layers.1.mlp.gate_proj"
    assert torch.equal(_decompressed(d, layer), _ours(cm, layer))
    assert _logit_diff(cm, d, eval_ids) < atol


@pytest.mark.parametrize("cfg, match", [
    (dict(weight_dtype="nf4", activation_dtype="a16"), r"NF4-A16.*compressed-tensors.*code book"),
    (dict(weight_dtype="fp8", activation_dtype="a16", group_size=None, fp8_format="e5m2"), r"e5m2"),
    (dict(weight_dtype="int4", activation_dtype="a16", group_size=32, model_kw=True),
     r"in_features 80 is not a multiple of group_size 32"),
])
def test_refusals_name_layer_scheme_and_format(compiled, helpers, tmp_path, cfg, match):
    cfg = dict(cfg)
    model_kw = helpers.RAGGED if cfg.pop("model_kw", False) else None
    cm = compiled("llama", model_kw=model_kw, **cfg)
    with pytest.raises(ExportError, match=match):
        export(cm, tmp_path / "bad", format="compressed-tensors")
    assert not (tmp_path / "bad").exists()


def test_bad_arguments(w4, tmp_path):
    cm, _ = w4
    with pytest.raises(ExportError, match="weight_format is for format='onnx'"):
        export(cm, tmp_path / "x", format="compressed-tensors", weight_format="matmulnbits")
    with pytest.raises(ExportError, match="tokenizer= is for format='compressed-tensors'"):
        export(cm, tmp_path / "x.onnx", format="onnx", tokenizer=object())
