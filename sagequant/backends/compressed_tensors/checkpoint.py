"""compressed-tensors checkpoints (the format vLLM and transformers load): a lowered QuantGraph as
a Hugging Face directory — config.json with `quantization_config`, model.safetensors, and the
tokenizer files when the caller has them.

Per scheme (one config group per distinct weight/activation QuantSpec pair):
  W4A16 / W8A16 int4|uint4|int8|uint8  -> "pack-quantized" (codes packed into int32 words)
  W8A8-INT8                            -> "int-quantized"  (int8 weight, input args int8)
  W8A8-FP8, FP8-W8A16 (e4m3)           -> "float-quantized" (float8_e4m3fn weight)
The packing and the code rounding are the compressed-tensors library's own: each layer's weight
is handed to its compressor already dequantized from our codes, with our scales (and zero points),
so its round(w / scale) lands back on exactly our codes — tests check that bit for bit.
compressed-tensors conventions that differ from ours: asymmetric integer codes are signed with a
signed zero point (our uint4 code c with zero point z is c - 8 with z - 8: the same (c - z) * s),
and grouped weights need in_features divisible by group_size (no ragged last group).
Not expressible, refused naming layer, scheme and format: NF4 (a code book), fp8 e5m2 weights,
per-tensor int4, the rotate pass's online rotations (a rotation fused into the weights exports as
is: the norm weights are ones, the head untied).
Only parameters are written (names ending in .weight / .bias); buffers the model code rebuilds from
config.json (rotary inv_freq) are not.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ...ir import ops  # noqa: F401  (registers sagequant::online_rotate, refused here)
from ...ir.annotations import META_KEY
from ...ir.lowered import LinearCall
from ...safe_write import output_dir
from ...ir.quant_spec import QuantizedTensor, QuantSpec, dequantize
from ...ir.trace import WRAPPER_PREFIX
from ...progress import track
from ..onnxruntime.qlinear import ExportError

FORMAT = "compressed-tensors"
WEIGHTS_FILE = "model.safetensors"


def _module_name(attr: str) -> str:
    return attr[len(WRAPPER_PREFIX):] if attr.startswith(WRAPPER_PREFIX) else attr


def _refuse(layer: str, scheme: str, why: str) -> ExportError:
    return ExportError(f"cannot export layer {layer} ({scheme}) as {FORMAT}: {why}; {FORMAT} "
                       "expresses W4A16 / W8A16 (int4, uint4, int8, uint8 weights, per channel or in "
                       "groups dividing in_features), W8A8-INT8, W8A8-FP8 and FP8-W8A16 (fp8 e4m3)")


def check_layer(layer: str, scheme: str, spec: QuantSpec, act: QuantSpec | None, in_features: int) -> None:
    """Raise ExportError when compressed-tensors cannot express this layer's quantization."""
    if spec.format == "nf4":
        raise _refuse(layer, scheme, "NF4 is a code book format compressed-tensors has no type for")
    if spec.format == "fp8_e5m2" or (act is not None and act.format == "fp8_e5m2"):
        raise _refuse(layer, scheme, "compressed-tensors FP8 is e4m3 only, this layer uses fp8 e5m2")
    if spec.granularity == "per_group" and in_features % spec.group_size:
        raise _refuse(layer, scheme, f"in_features {in_features} is not a multiple of group_size "
                      f"{spec.group_size} (a ragged last group); compile with a group size dividing "
                      "every in_features")
    if spec.fmt.bits == 4 and spec.granularity == "per_tensor":
        raise _refuse(layer, scheme, "4-bit weights with one scale per tensor")


def _args(spec: QuantSpec) -> dict:
    """compressed-tensors QuantizationArgs (as a dict) for one of our QuantSpecs."""
    strategy = {"per_group": "group", "per_channel": "channel", "per_token": "token",
                "per_tensor": "tensor"}[spec.granularity]
    return {"num_bits": spec.fmt.bits, "type": "float" if spec.fmt.kind == "float" else "int",
            "symmetric": spec.symmetric, "strategy": strategy, "dynamic": spec.dynamic,
            "group_size": spec.group_size}


def _format(spec: QuantSpec, act: QuantSpec | None) -> str:
    if spec.fmt.kind == "float":
        return "float-quantized"
    return "int-quantized" if act is not None else "pack-quantized"


def _layers(graph):
    """(annotation, lowered node) of every quantized linear, checked for compressed-tensors; nodes
    of the unfused form, whose arguments are (x, qweight, scales, zeros, bias, ..., act_scale)."""
    from ...lowering.unfuse import unfused_copy
    out = []
    for node in unfused_copy(graph.graph).nodes:
        ann = node.meta.get(META_KEY)
        if ann is None:
            continue
        if not (ann.quantized and ann.kernel is not None):
            continue
        check_layer(ann.layer, ann.scheme, ann.weight_spec, ann.input_spec,
                    int(ann.kernel.attrs["in_features"]))
        out.append((ann, node))
    return out


def check_exportable(compiled) -> None:
    online = compiled.graph.nodes(torch.ops.sagequant.online_rotate.default)
    if online:
        raise ExportError(f"cannot export as {FORMAT}: the graph applies {len(online)} online rotations "
                          f"(sagequant::online_rotate, e.g. {online[0].name} before down_proj), which a "
                          f"{FORMAT} checkpoint cannot express; compile with QuantConfig.rotate_online="
                          "False (every rotation fused into the weights) to export it")
    _layers(compiled.graph)


def quantization_config(compiled) -> dict:
    """The `quantization_config` entry of config.json."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
    layers = _layers(compiled.graph)
    groups: dict[tuple, list[str]] = {}
    for ann, _ in layers:
        groups.setdefault((ann.weight_spec, ann.input_spec), []).append(ann.layer)
    quantized = {ann.layer for ann, _ in layers}
    ignore = [a.layer for a in map(compiled.graph.annotation, compiled.graph.annotated())
              if a.layer not in quantized]
    config_groups = {}
    for i, ((spec, act), names) in enumerate(groups.items()):
        # One group covers every Linear not ignored; several groups name their layers exactly.
        targets = ["Linear"] if len(groups) == 1 else names
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=targets, weights=_args(spec),
            input_activations=_args(act) if act is not None else None,
            format=_format(spec, act))
    formats = sorted({g.format for g in config_groups.values()})
    cfg = QuantizationConfig(config_groups=config_groups, ignore=ignore,
                             format=formats[0] if len(formats) == 1 else "mixed-precision",
                             quantization_status="compressed")
    return json.loads(json.dumps(cfg.to_dict(), default=str))


def _compressor_inputs(graph, ann, node) -> tuple[dict, QuantSpec]:
    """The layer's weight dequantized from our codes, with scale / zero point in their convention."""
    spec = ann.weight_spec
    qweight, scales, zeros = (graph.attr(a) if a is not None else None for a in LinearCall.of(node).weights)
    n, k = int(ann.kernel.attrs["out_features"]), int(ann.kernel.attrs["in_features"])
    qt = QuantizedTensor(qweight, scales, zeros, (n, k), spec)
    state = {"weight": dequantize(qt, torch.float32).to(scales.dtype),
             "weight_scale": scales.reshape(1) if spec.granularity == "per_tensor" else scales}
    if zeros is not None:
        state["weight_zero_point"] = (zeros - (1 << (spec.fmt.bits - 1))).to(torch.int8)
    return state, spec


def checkpoint_state(compiled) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, by its transformers name."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    graph = compiled.graph
    layers = _layers(graph)
    out: dict[str, torch.Tensor] = {}
    owned = set()
    for ann, node in track(layers, "export: compress", unit="layer", note=lambda item: item[0].layer):
        call = LinearCall.of(node)
        owned.update(a.target for a in call.weights if a is not None)
        state, spec = _compressor_inputs(graph, ann, node)
        scheme = QuantizationScheme(targets=["Linear"], weights=_args(spec),
                                    input_activations=_args(ann.input_spec) if ann.input_spec else None)
        fmt = _format(spec, ann.input_spec)
        compressed = BaseCompressor.get_value_from_registry(fmt).compress(state, scheme)
        for key, value in compressed.items():
            out[f"{ann.layer}.{key}"] = value.contiguous()
        if ann.input_spec is not None and not ann.input_spec.dynamic:
            # clone: layers sharing one quantizer (fuse_norm_qdq) share its scale tensor
            out[f"{ann.layer}.input_scale"] = graph.attr(call.act_scale).reshape(1).float().clone()
            owned.add(call.act_scale.target)
        bias = call.bias
        if bias is not None:
            out[f"{ann.layer}.bias"] = graph.attr(bias).detach().contiguous()
            owned.add(bias.target)
    for attr, tensor in graph.state().items():
        name = _module_name(attr)
        if attr in owned or not name.endswith((".weight", ".bias")):
            continue
        out[name] = tensor.detach().contiguous()
    return out


def write_checkpoint(compiled, directory: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write the checkpoint directory atomically through safe_write.output_dir (never over files
    sagequant did not write, unless overwrite=True)."""
    from safetensors.torch import save_file
    hf_config = dict(compiled.graph.model_info.get("hf_config") or {})
    if not hf_config.get("model_type"):
        raise ExportError(f"{FORMAT} export needs the source model's transformers config, and this "
                          "compiled model does not record one (model_info['hf_config'])")
    check_exportable(compiled)
    state = checkpoint_state(compiled)
    hf_config["quantization_config"] = quantization_config(compiled)
    if any(k.startswith("lm_head.weight_") for k in state):
        hf_config["tie_word_embeddings"] = False  # the head is quantized, the embedding is not
    hf_config.setdefault("architectures", [compiled.graph.model_info.get("architecture")])
    with output_dir(directory, overwrite, what=f"{FORMAT} checkpoint") as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(directory)
