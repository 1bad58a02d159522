"""compile() for ONNX input: an exported LLM graph (logits from input_ids) -> a quantized ONNX model
that runs in onnxruntime, with the same QuantConfig, QuantSpecs and formats as the torch side.

Steps (the onnx pipeline of passes/pipeline.py, which leaves out those the config does not
select), each reported in `pass_history`:
  load       read and check the model (graph.load: corrupt files and unknown ops are refused)
  annotate   find the linears (MatMul / Gemm with a constant weight), name them after their module,
             apply QuantConfig's per-layer rules (ignore, overrides) -> weight / activation QuantSpecs
  smoothquant / awq   (calibration='smoothquant' / 'awq') per-channel scales folded into norm ->
             linears groups, from statistics gathered through onnxruntime
  calibrate  static activation scales (minmax / percentile / ... observers), through onnxruntime,
             on the balanced graph
  quantize   round-to-nearest weights in our storage (QuantSpec.quantize) behind one
             sagequant::QLinear placeholder per linear — the same placeholder the torch export
             captures, so every ONNX emitter (QDQ, MatMulNBits, TensorRT) applies unchanged
  emit       the placeholders rewritten into the chosen form (QDQ by default)
GPTQ needs a Hessian per layer from the quantized prefix (a sequential run) and is not offered here.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ...config import ConfigError, QuantConfig
from ...ir.quant_spec import quantize
from .graph import Linear, OnnxInputError, find_linears, load, norm_groups, scope_names

METHODS = ("minmax", "percentile", "smoothquant", "awq")
OPSET = 21  # the emitters' block-quantized DequantizeLinear and INT4 tensors


def _at_least_opset(model, version: int):
    import onnx
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if current >= version:
        return model
    try:
        return onnx.version_converter.convert_version(model, version)
    except Exception as e:
        raise OnnxInputError(f"the ONNX model's opset {current} could not be converted to opset {version}, "
                             f"which quantized ONNX needs: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def compile_onnx(model_or_path, cfg: QuantConfig, batches: list[torch.Tensor] | None) -> "OnnxCompiledModel":
    import onnx_graphsurgeon as gs
    from ...passes.annotate import check_patterns_match, layer_specs
    from ...passes.pipeline import ONNX, build_pipeline
    if cfg.calibration not in METHODS:
        raise ConfigError(f"QuantConfig.calibration={cfg.calibration!r} is not available for ONNX input "
                          f"models; valid there: {', '.join(METHODS)}")
    torch_only = [f for f, on in (("enable_qat=True", cfg.enable_qat), ("draft_mode=True", cfg.draft_mode),
                                  (f"kv_cache_dtype={cfg.kv_cache_dtype!r}", cfg.kv_cache_dtype != "none")) if on]
    if torch_only:
        raise ConfigError(f"QuantConfig.{torch_only[0]} needs the torch pipeline; ONNX input models "
                          "take weight / activation quantization settings only")
    pipeline = build_pipeline(cfg, ONNX)
    history = []
    t = time.perf_counter()

    def step(name, **stats):
        nonlocal t
        history.append({"pass": name, "seconds": round(time.perf_counter() - t, 4), "stats": stats})
        t = time.perf_counter()

    model = load(model_or_path)
    scopes = scope_names(model)  # before the opset conversion, which drops node metadata
    model = _at_least_opset(model, OPSET)
    graph = gs.import_onnx(model)
    step("load", nodes=len(graph.nodes))
    linears = find_linears(graph, scopes)
    if not linears:
        raise OnnxInputError("the ONNX model has no MatMul / Gemm with a constant weight: nothing to quantize")
    check_patterns_match(cfg, [lin.name for lin in linears])
    for lin in linears:
        specs = layer_specs(cfg, lin.name)
        if specs is not None:
            settings, lin.weight_spec, lin.act_spec = specs
            lin.scheme, lin.clip_ratio = settings.scheme, settings.clip_ratio
    quantized = [lin for lin in linears if lin.weight_spec is not None]
    step("annotate", linears=len(linears), quantized=len(quantized))
    static = [lin for lin in quantized if lin.act_spec is not None and not lin.act_spec.dynamic]
    needs_data = static or cfg.calibration in ("smoothquant", "awq")
    if needs_data and not batches:
        from ...calibration.datasets import CalibrationDataError
        raise CalibrationDataError(f"calibration={cfg.calibration!r}"
                                   + (f" with static activation scales ({static[0].name}, ...)" if static else "")
                                   + " needs calibration data: pass calibration_data=")
    if {"smoothquant", "awq"} & set(pipeline.names):
        _balance(graph, linears, quantized, cfg, batches, step)
    stats = {}
    if "calibrate" in pipeline.names:
        from .calibrate import collect
        stats = collect(gs.export_onnx(graph), static, batches, cfg) if static else {}
        step("calibrate", tensors=len(stats), batches=len(batches or ()))
    placeholders = _quantize(graph, quantized, stats)
    step("quantize", quantized=len(quantized), weight_bytes=sum(placeholders.values()))
    compiled = OnnxCompiledModel(gs.export_onnx(graph), cfg, history,
                                 {lin.name: lin.scheme for lin in linears}, pipeline)
    compiled.model  # emit QDQ now, so an inexpressible scheme fails inside compile
    return compiled


def _balance(graph, linears, quantized, cfg, batches, step) -> None:
    import onnx_graphsurgeon as gs
    from . import balance
    from .calibrate import collect
    if cfg.calibration == "smoothquant" and cfg.activation_format is None:
        raise ConfigError(f"QuantConfig.calibration='smoothquant' smooths activations for activation "
                          f"quantization, but scheme {cfg.scheme} keeps 16-bit activations; use awq")
    if cfg.smoothquant_alpha == "auto" and cfg.calibration == "smoothquant":
        raise ConfigError("QuantConfig.smoothquant_alpha='auto' is not available for ONNX input; give a number")
    groups = norm_groups(graph, linears, {lin.name for lin in quantized})
    if not groups:
        raise OnnxInputError(f"{cfg.calibration} found no norm -> linear group (Mul by a 1-D norm "
                             "scale read only by quantized MatMuls) in this ONNX graph")
    heads = [g.linears[0] for g in groups]
    stats = collect(gs.export_onnx(graph), heads, batches, cfg,
                    keep_rows=balance.AWQ_ROWS if cfg.calibration == "awq" else 0)
    if cfg.calibration == "smoothquant":
        result = balance.smoothquant(groups, stats, cfg.smoothquant_alpha)
    else:
        result = balance.awq(groups, stats, cfg.awq_grid)
    clip = {}
    if cfg.calibration == "awq" and cfg.awq_clip:  # on the balanced inputs, as the torch side
        stats = collect(gs.export_onnx(graph), quantized, batches, cfg, keep_rows=balance.AWQ_ROWS)
        clip = balance.awq_clip(quantized, stats, cfg.awq_grid)
    step(cfg.calibration, groups=len(groups), per_group=result, **clip)


def _quantize(graph, quantized: list[Linear], stats) -> dict[str, int]:
    """Each quantized linear -> one sagequant::QLinear placeholder; returns stored bytes per layer."""
    import onnx_graphsurgeon as gs
    from ...backends.onnxruntime.qlinear import DOMAIN, OP_TYPE
    nbytes = {}
    for lin in quantized:
        w = torch.from_numpy(lin.weight_out_in())
        qt = quantize(w, lin.weight_spec, clip_ratio=lin.clip_ratio, what=f"weight of {lin.name}")
        data = qt.data.view(torch.uint8) if lin.weight_spec.fmt.kind == "float" else qt.data
        empty = gs.Variable.empty
        inputs = [lin.x, gs.Constant(f"{lin.name}.qweight", data.numpy()),
                  gs.Constant(f"{lin.name}.scales", qt.scale.numpy()),
                  gs.Constant(f"{lin.name}.zeros", qt.zero_point.numpy()) if qt.zero_point is not None else empty(),
                  lin.bias if lin.bias is not None else empty(), empty()]
        act_text = ""
        if lin.act_spec is not None:
            act_text = lin.act_spec.encode()
            if not lin.act_spec.dynamic:
                record = stats[lin.x.name].observer.record("input", lin.clip_ratio)
                clip = record.clip if record.clip > 0 else 1.0
                scale = lin.act_spec.fmt.symmetric_scale(torch.tensor(clip, dtype=torch.float32))
                inputs[5] = gs.Constant(f"{lin.name}.input_scale", np.asarray(scale.numpy(), dtype=np.float32))
        out = lin.node.outputs[0]
        lin.node.outputs.clear()
        lin.node.inputs.clear()
        graph.nodes.append(gs.Node(OP_TYPE, f"{lin.name}/qlinear", domain=DOMAIN, inputs=inputs, outputs=[out],
                                   attrs={"layer": lin.name, "spec": lin.weight_spec.encode(),
                                          "shape": [lin.out_features, lin.in_features], "act_spec": act_text}))
        nbytes[lin.name] = qt.nbytes()
    graph.cleanup().toposort()
    return nbytes


class OnnxCompiledModel:
    """A quantized ONNX model: run it (onnxruntime, CPU), export it as QDQ / MatMulNBits /
    TensorRT explicit-quantization ONNX, read its report."""

    def __init__(self, placeholder_model, config: QuantConfig, pass_history: list[dict], layers: dict,
                 pipeline=None):
        self.placeholder_model = placeholder_model  # linears as sagequant::QLinear placeholders
        self.config = config
        self.pass_history = pass_history
        self.pipeline = pipeline  # passes/pipeline.Pipeline of mode onnx: the steps run
        self.layers = layers  # layer -> scheme, None where kept in float
        self._model = None
        self._session = None

    def to_onnx(self, format: str = "onnx", weight_format: str = "qdq", accuracy_level: int = 0):
        from ...backends.export import check_args, emit_placeholders, emitter
        check_args(format, weight_format)
        if format == "compressed-tensors":
            raise OnnxInputError("format='compressed-tensors' needs a transformers checkpoint; an ONNX "
                                 "input model can be exported as format='onnx' or 'tensorrt'")
        _, emit = emitter(format, weight_format, accuracy_level)
        return emit_placeholders(self.placeholder_model, emit, self.config, format, weight_format)

    @property
    def model(self):
        """The QDQ form (what __call__ runs)."""
        if self._model is None:
            self._model = self.to_onnx()
        return self._model

    def export(self, path, format: str = "onnx", weight_format: str = "qdq", accuracy_level: int = 0):
        from pathlib import Path
        from ...backends.export import _save
        model = self.model if (format, weight_format) == ("onnx", "qdq") else \
            self.to_onnx(format, weight_format, accuracy_level)
        return _save(model, Path(path))

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        from ...backends.export import onnxruntime_session
        from .calibrate import run_logits
        if self._session is None:
            self._session = onnxruntime_session(self.model)
        return run_logits(self._session, input_ids)

    def report(self) -> dict:
        return {"scheme": self.config.scheme, "source": "onnx",
                "linear_layers": len(self.layers),
                "quantized_layers": sum(s is not None for s in self.layers.values()),
                "kept_in_high_precision": sorted(n for n, s in self.layers.items() if s is None),
                "passes": self.pass_history, "config": self.config.to_dict()}
