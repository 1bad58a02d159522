"""Public API: compile() runs the pipeline and returns a CompiledModel; load() gives a saved one
back; QuantizationManager / QuantizationProtocol are the seed's facade over the same compiler."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from . import backends  # noqa: F401  (kernel registry)
from .artifact import ArtifactError, read_artifact, write_artifact
from .safe_write import output_file
from .calibration.datasets import CalibrationDataError, as_token_batches, check_token_range, load_texts
from .config import ConfigError, LayerSettings, QuantConfig
from .ir.annotations import META_KEY
from .ir.graph import GraphVerificationError, QuantGraph
from .ir.kv_plan import KVQuantPlan, build_kv_plan
from .ir.serialize import GraphSerializationError, graph_from_json, graph_to_json
from .ir.replicate import trace_reusing_blocks
from .ir.trace import trace_model
from .lowering.registry import REGISTRY, KernelSpec
from .passes import DumpIR, PassContext, PrintIRAfter
from .passes.annotate import weight_spec_for
from .passes.guard import split_held_back
from .passes.pipeline import LAYERWISE, PTQ, QAT, Pipeline, build_pipeline
from .passes.qat_train import QATTraining
from .passes.schedule import scheduler_ir


def _compile_qat(model, cfg: QuantConfig, train_data, tokenizer, options, instrumented: bool):
    """enable_qat: calibration_data is the training text; quantization_aware_training trains the FakeQuant
    graph and lowers it like PTQ."""
    if not cfg.enable_qat:
        raise ConfigError("compile(qat=QATOptions(...)) needs QuantConfig.enable_qat=True")
    if instrumented:
        raise ConfigError("print_ir_after / dump_dir / stop_after apply to PTQ compiles; for QAT run "
                          "build_pipeline(config, 'qat').manager(...) from sagequant.passes.pipeline")
    return quantization_aware_training(model, cfg, train_data, tokenizer, options)


def compile(model, config: QuantConfig | None = None, calibration_data=None, tokenizer=None, *,
            print_ir_after: list[str] | str | None = None, dump_dir: str | Path | None = None,
            stop_after: str | None = None, verify_each: bool = True, qat=None,
            device: str | torch.device | None = None, work_dir: str | Path | None = None,
            offload_cache: bool = False, dtype: torch.dtype = torch.float32,
            weights=None, overwrite_dump: bool = False) -> "CompiledModel":
    """Trace `model` (a transformers causal LM, or a path / name in any form of
    frontends.models.model_source: checkpoint dir, .gguf file, "smollm2"; or an ONNX model) and run
    the pipeline.
    With QuantConfig.enable_qat, train first (calibration_data is the training text; `qat` the
    calibration.qat.QATOptions). dump_dir holding files sagequant did not write is refused unless
    overwrite_dump=True.

    device ("cpu", "cuda", "auto": the GPU when present) calibrates layer-wise on that device:
    the model is traced on the meta device, and one decoder block at a time is onloaded (from
    the checkpoint directory's safetensors, read lazily, or from the module's CPU weights),
    calibrated, quantized, recorded in work_dir and freed; a run started again with the same
    arguments and work_dir resumes after the last finished block (passes/layerwise.py).
    `weights` replaces the checkpoint's safetensors as the source of tensors (any object with
    load(checkpoint_name) -> tensor, e.g. a remote store); the directory then only needs config.json."""
    cfg = config or QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(cfg).__name__}")
    if device is not None:
        if print_ir_after or dump_dir or stop_after:
            raise ConfigError("print_ir_after / dump_dir / stop_after apply to the whole-model pipeline, "
                              "not to a layer-wise compile (device=)")
        return _compile_layerwise(model, cfg, calibration_data, tokenizer, device, work_dir,
                                  offload_cache, dtype, weights)
    if _is_onnx(model):
        if print_ir_after or dump_dir or stop_after:
            raise ConfigError("print_ir_after / dump_dir / stop_after apply to the torch pipeline; an "
                              "ONNX input model lists its steps in pass_history")
        from .frontends.onnx import compile_onnx
        batches = None if calibration_data is None else as_token_batches(
            calibration_data, tokenizer, cfg.calibration_samples, cfg.calibration_seq_len)
        return compile_onnx(model, cfg, batches)
    if isinstance(model, (str, Path)):
        from .frontends.models import load_model
        model = load_model(model)
    if cfg.enable_qat or qat is not None:
        return _compile_qat(model, cfg, calibration_data, tokenizer, qat,
                            bool(print_ir_after or dump_dir or stop_after))
    if cfg.draft_mode:
        # Two compiled paths from one config: the verify model (the config's own scheme) and a
        # lighter draft (runtime.speculative.draft_and_verify_configs), used by SpeculativeDecoder.
        from .runtime.speculative import draft_and_verify_configs
        draft_cfg, verify_cfg = draft_and_verify_configs(cfg)
        options = dict(print_ir_after=print_ir_after, dump_dir=dump_dir, stop_after=stop_after,
                       verify_each=verify_each, overwrite_dump=overwrite_dump)
        verify = compile(model, verify_cfg, calibration_data, tokenizer, **options)
        verify.draft = compile(model, draft_cfg, calibration_data, tokenizer, **options)
        return verify
    batches = held_back = None
    if calibration_data is not None:
        # Text is cut into calibration_samples windows plus the guard's held-back ones.
        extra = cfg.guard_samples if cfg.guard != "off" else 0
        all_batches = as_token_batches(calibration_data, tokenizer, cfg.calibration_samples + extra,
                                       cfg.calibration_seq_len)
        check_token_range(all_batches, getattr(getattr(model, "config", None), "vocab_size", None))
        batches, held_back = split_held_back(all_batches, cfg)
    kv_plan = build_kv_plan(cfg)
    num_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(num_layers, int):   # fail before the pipeline runs, naming the valid layers
        kv_plan.validate_layers(num_layers)
    pipeline = build_pipeline(cfg, PTQ, held_back=held_back is not None, reference=True)
    if cfg.guard != "off" and pipeline.omitted_reason("guard"):
        warnings.warn(f"sagequant accuracy guard not run: {pipeline.omitted_reason('guard')}; pass "
                      "calibration_data= or set QuantConfig.guard='off' to say it is intended", stacklevel=2)
    instruments = []  # before the trace: unknown pass names or a refused dump dir fail fast
    if print_ir_after:
        instruments.append(PrintIRAfter(print_ir_after))
    if dump_dir:
        instruments.append(DumpIR(dump_dir, overwrite=overwrite_dump))
    pm = pipeline.manager(instruments, verify_each=verify_each, stop_after=stop_after)
    graph = trace_model(model)
    ctx = PassContext(cfg, batches, reference_model=model, held_back_batches=held_back)
    graph = pm.run(graph, ctx)
    compiled = CompiledModel(graph, cfg, kv_plan, pm.history, pipeline)
    compiled.source_model = model
    return compiled


def quantization_aware_training(model: torch.nn.Module, config: QuantConfig, train_data,
                                tokenizer=None, options: QATOptions | None = None):
    """Trace `model`, train its FakeQuant graph per `options`, and compile the result like PTQ.
    Returns a CompiledModel whose pass history holds a `qat_train` entry (loss curve, time)."""
    from .calibration.qat import QATOptions, training_windows
    opts = options if options is not None else QATOptions()
    if not isinstance(opts, QATOptions):
        raise ConfigError(f"options must be QATOptions, got {type(opts).__name__}")
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"config must be a QuantConfig, got {type(config).__name__}")
    cfg = config if config.enable_qat else config.replace(enable_qat=True)  # validates the scheme
    windows = training_windows(train_data, tokenizer, opts)
    needs_calibration = cfg.activation_format is not None or cfg.calibration not in ("minmax", "percentile")
    calib = list(windows[:cfg.calibration_samples].split(1)) if needs_calibration else None
    pipeline = build_pipeline(cfg, QAT)
    pm = pipeline.manager()
    training = QATTraining(windows, model if opts.loss == "distill" else None, opts)
    graph = pm.run(trace_model(model), PassContext(cfg, calib, training=training))
    compiled = CompiledModel(graph, cfg, build_kv_plan(cfg), pm.history, pipeline)
    compiled.source_model = model
    return compiled


def _compile_layerwise(model, cfg: QuantConfig, calibration_data, tokenizer, device, work_dir,
                       offload_cache: bool, dtype: torch.dtype, weights) -> "CompiledModel":
    import tempfile

    from .calibration.onload import (CheckpointWeights, StateWeights, empty_model, resolve_device,
                                     tied_aliases)
    from .calibration.plan import Shape, check_fits, machine_capacity, plan_layerwise
    from .progress import log
    from .passes.layerwise import LayerwiseRun, check_layerwise_config
    check_layerwise_config(cfg)
    dev = resolve_device(device)
    if calibration_data is None:
        raise ConfigError("a layer-wise compile (device=) needs calibration_data")
    batches = as_token_batches(calibration_data, tokenizer, cfg.calibration_samples, cfg.calibration_seq_len)
    if isinstance(model, (str, Path)):
        skeleton = empty_model(model, dtype)
        source = weights if weights is not None else CheckpointWeights(model, tied_aliases(skeleton))
        origin = str(Path(model).absolute())
    elif isinstance(model, torch.nn.Module):
        state = {k: v.detach() for k, v in model.state_dict(keep_vars=False).items()}
        skeleton = model
        source = StateWeights(state, tied_aliases(model))
        origin = type(model).__name__
    else:
        raise ConfigError(f"compile(device=...) takes a checkpoint directory or a torch.nn.Module, "
                          f"got {type(model).__name__}")
    check_token_range(batches, getattr(skeleton.config, "vocab_size", None))
    num_layers = getattr(skeleton.config, "num_hidden_layers", None)
    kv_plan = build_kv_plan(cfg)
    if isinstance(num_layers, int):
        kv_plan.validate_layers(num_layers)
    # Identical blocks are exported once (two, then copied): tracing time does not grow with depth.
    graph = trace_reusing_blocks(_meta_copy(model) if isinstance(model, torch.nn.Module) else skeleton)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="sagequant-layerwise-"))
    plan = plan_layerwise(Shape.from_config(skeleton.config.to_dict()), cfg, dev, dtype, offload_cache,
                          source.total_bytes() if isinstance(source, CheckpointWeights) else 0)
    for line in plan.lines():
        log(line)
    check_fits(plan, *machine_capacity(dev, work))
    pipeline = build_pipeline(cfg, LAYERWISE)
    pm = pipeline.manager()
    run = LayerwiseRun(source, dev, dtype, work, offload_cache, {"model": origin}, plan.to_dict())
    graph = pm.run(graph, PassContext(cfg, batches, layerwise=run))
    return CompiledModel(graph, cfg, kv_plan, pm.history, pipeline)


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The module's structure with its parameters on the meta device (buffers kept), to trace
    without touching (or copying) the weights."""
    import copy
    params = dict(model.named_parameters(remove_duplicate=False))
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for p in params.values()}
    return copy.deepcopy(model, memo)


def _is_onnx(model) -> bool:
    """An ONNX input model: a path ending in .onnx or an onnx.ModelProto."""
    if isinstance(model, (str, Path)):
        return str(model).endswith(".onnx")
    if isinstance(model, torch.nn.Module):
        return False
    import onnx
    return isinstance(model, onnx.ModelProto)


class CompiledModel:
    def __init__(self, graph: QuantGraph, config: QuantConfig, kv_plan: KVQuantPlan,
                 pass_history: list[dict], pipeline: Pipeline | None = None):
        self.graph = graph
        self.config = config
        self.kv_plan = kv_plan
        self.pass_history = pass_history
        self.pipeline = pipeline  # what the compile ran (None: an artifact from before it was recorded)
        self.source_model: torch.nn.Module | None = None  # the float model, when compiled here
        self.draft: CompiledModel | None = None  # draft_mode: the lighter draft path

    def __call__(self, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        ids = kwargs.pop("input_ids", input_ids)
        if kwargs:
            raise TypeError(f"CompiledModel takes input_ids only, got {sorted(kwargs)}")
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an integer tensor [batch, seq] (or [seq])")
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        vocab = self.graph.model_info.get("vocab_size")
        if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise CalibrationDataError(f"input_ids: token id {bad} is outside the vocabulary "
                                       f"(vocab_size {vocab}, ids 0..{vocab - 1})")
        with torch.inference_mode():
            return self.graph(ids.long())

    def generate(self, input_ids, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_p: float = 1.0, stop_token_ids=(), pad_token_id: int = 0,
                 **engine_options) -> torch.Tensor:
        """Prompt rows [batch, seq] (or [seq]) followed by their generated tokens, decoded with
        the (quantized) KV cache by a GenerationEngine; rows that stop early are padded with
        pad_token_id. engine_options go to GenerationEngine (max_batch, max_seq_len, ...)."""
        from .runtime import GenerationEngine
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids)
        rows = (ids.unsqueeze(0) if ids.dim() == 1 else ids).tolist()
        engine_options.setdefault("max_batch", max(1, len(rows)))
        engine = GenerationEngine(self, **engine_options)
        rids = [engine.add_request(r, max_new_tokens, temperature, top_p, stop_token_ids) for r in rows]
        out = {rid: list(row) for rid, row in zip(rids, rows)}
        while engine.has_work():
            for event in engine.step():
                out[event.request_id].append(event.token_id)
        width = max(len(v) for v in out.values())
        return torch.tensor([out[r] + [pad_token_id] * (width - len(out[r])) for r in rids])

    # ---- what the compiler decided -------------------------------------------------------------
    def _annotations(self):
        return [self.graph.annotation(n) for n in self.graph.annotated()]

    @property
    def kernel_bindings(self) -> dict[str, dict]:
        return {a.layer: a.kernel.to_dict() for a in self._annotations() if a.kernel}

    @property
    def scheduler_ir(self) -> list[dict]:
        return scheduler_ir(self.graph)

    @property
    def calibration_records(self) -> dict[str, dict]:
        return {a.layer: {k: r.to_dict() for k, r in a.calibration.items()}
                for a in self._annotations() if a.calibration}

    def weight_bytes(self) -> dict:
        """Bytes of linear weights: as compiled vs the same linears in fp16 and fp32."""
        quantized = float_kept = params_q = params_f = 0
        for node in self.graph.annotated():
            ann = self.graph.annotation(node)
            if ann.scheduler is not None:
                quantized += ann.scheduler.weight_bytes
                params_q += ann.kernel.attrs["in_features"] * ann.kernel.attrs["out_features"]
            elif not ann.quantized and getattr(node.args[1], "op", None) == "get_attr":
                w = self.graph.attr(node.args[1])
                float_kept += w.numel() * 2  # kept layers counted at fp16, the deployment dtype
                params_f += w.numel()
        fp16_all = 2 * (params_q + params_f)
        return {"quantized_layers_bytes": quantized, "quantized_layers_fp16_bytes": 2 * params_q,
                "quantized_layers_ratio_vs_fp16": quantized / max(1, 2 * params_q),
                "all_linear_bytes": quantized + float_kept, "all_linear_fp16_bytes": fp16_all,
                "all_linear_ratio_vs_fp16": (quantized + float_kept) / max(1, fp16_all),
                "bits_per_weight": 8 * quantized / max(1, params_q)}

    def report(self) -> dict:
        anns = self._annotations()
        kernels: dict[str, int] = {}
        for a in anns:
            if a.kernel:
                kernels[f"{a.kernel.backend}:{a.kernel.kernel}"] = kernels.get(
                    f"{a.kernel.backend}:{a.kernel.kernel}", 0) + 1
        kept = {a.layer: a.skip_reason for a in anns if not a.quantized}
        return {
            "scheme": self.config.scheme,
            "backend": self.config.backend,
            "priority": self.config.priority,
            "model": {k: v for k, v in self.graph.model_info.items() if k != "hf_config"},
            "linear_layers": len(anns),
            "quantized_layers": sum(a.quantized for a in anns),
            "kept_in_high_precision": kept,
            "fallbacks": sorted({a.layer for a in anns if a.kernel and a.kernel.fallback_from}),
            "kernels": kernels,
            "weight_bytes": self.weight_bytes(),
            "passes": self.pass_history,
            "kv_plan": self.kv_plan.to_dict(),
            "config": self.config.to_dict(),
            "accuracy_guard": self._pass_stats("guard"),
            "mixed_precision": self._pass_stats("mixed_precision"),
        }

    def error_report(self, input_ids: torch.Tensor, reference: torch.nn.Module | None = None) -> list[dict]:
        """Per quantized layer: SQNR / relative MSE of its output vs the float model, worst first."""
        from .evaluation.error_report import layer_errors
        reference = reference if reference is not None else self.source_model
        if reference is None:
            raise ConfigError("error_report needs the float model: pass reference= (a loaded artifact "
                             "does not carry its float weights)")
        ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
        return layer_errors(self.graph, reference, [ids])

    def _pass_stats(self, name: str) -> dict | None:
        """The statistics of pass `name`, or why the pipeline left it out."""
        stats = next((p.get("stats") for p in self.pass_history if p["pass"] == name), None)
        why = self.pipeline.omitted_reason(name) if self.pipeline is not None else None
        return {"skipped": why} if stats is None and why else stats

    # ---- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write the artifact directory atomically. An existing directory is replaced only when it
        is empty or a previous sagequant artifact; one holding other files is refused unless
        overwrite=True, and then only sagequant's files in it are replaced."""
        meta = {"config": self.config.to_dict(), "kv_plan": self.kv_plan.to_dict(),
                "model_info": self.graph.model_info, "pass_history": self.pass_history,
                "pipeline": self.pipeline.to_dict() if self.pipeline is not None else None,
                "scheduler_ir": self.scheduler_ir, "report": _jsonable(self.report())}
        return write_artifact(directory, graph_to_json(self.graph.gm), self.graph.state(), meta,
                              overwrite=overwrite)

    def export_scheduler_ir(self, path: str | Path, overwrite: bool = False) -> None:
        with output_file(path, overwrite, what="scheduler IR") as tmp:
            tmp.write_text(json.dumps(self.scheduler_ir, indent=1))

    def export(self, path: str | Path, format: str = "onnx", weight_format: str = "qdq",
               **options) -> Path:
        """Write the compiled model as ONNX (weight_format "qdq" | "matmulnbits") or as TensorRT
        explicit-quantization ONNX (format="tensorrt", engine_path=... builds an engine where
        TensorRT and a GPU are present). See sagequant.backends.export."""
        from .backends.export import export
        return export(self, path, format=format, weight_format=weight_format, **options)


def load(directory: str | Path) -> CompiledModel:
    """A saved artifact back, bit-exactly. Loading runs no code from the artifact: the graph is
    rebuilt from a closed vocabulary and every metadata field is checked (SECURITY.md); anything
    else is an ArtifactError naming the file, node and field."""
    graph_json, tensors, meta = read_artifact(directory)
    return compiled_from_parts(graph_json, tensors, meta, f"artifact {str(directory)!r}")


def compiled_from_parts(graph_json: dict, tensors: dict, meta: dict, where: str) -> CompiledModel:
    """The CompiledModel of an artifact's checked files (read_artifact's result)."""
    configs = {}
    for name, build in (("config", QuantConfig.from_dict), ("kv_plan", KVQuantPlan.from_dict)):
        try:
            configs[name] = build(meta[name])
        except (ConfigError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where} has invalid metadata: meta.json field {name!r}: {e}") from None
    try:
        gm = graph_from_json(graph_json, tensors)
    except GraphSerializationError as e:
        raise ArtifactError(f"{where} cannot be loaded by this build: {e}") from None
    try:
        pipeline = Pipeline.from_dict(meta["pipeline"]) if meta.get("pipeline") else None
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{where} has invalid metadata: meta.json field 'pipeline': "
                            f"{type(e).__name__}: {e}") from None
    graph = QuantGraph(gm, meta["model_info"])
    try:
        graph.verify()
    except GraphVerificationError as e:
        raise ArtifactError(f"{where}: graph.json does not form a valid graph: {e}") from None
    return CompiledModel(graph, configs["config"], configs["kv_plan"], meta["pass_history"], pipeline)


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


# ---- the seed's facade -----------------------------------------------------------------------

class QuantizationProtocol:
    """The seed's interface: calibrate -> artifact path, load_quantized, select_kernel, report."""

    def __init__(self, config: QuantConfig):
        self.config = config
        self.method = config.calibration
        self.compiled: CompiledModel | None = None

    def calibrate(self, model_path, dataset_path, output_dir=None, tokenizer=None) -> Path:
        from .frontends.models import resolve_model
        model, tok = resolve_model(model_path)
        texts = load_texts(dataset_path)
        self.compiled = compile(model, self.config, calibration_data=texts, tokenizer=tokenizer or tok)
        out = Path(output_dir) if output_dir else Path(f"{Path(str(model_path)).name}-sagequant-"
                                                       f"{self.config.scheme.lower()}")
        return self.compiled.save(out)

    def load_quantized(self, artifact_path) -> CompiledModel:
        self.compiled = load(artifact_path)
        return self.compiled

    def select_kernel(self, in_features: int = 4096) -> KernelSpec:
        """The kernel the config's default scheme lowers to for a layer with in_features inputs."""
        cfg = self.config
        settings = LayerSettings(cfg.scheme, cfg.weight_format, cfg.activation_format,
                                 cfg.group_size, cfg.per_channel, cfg.symmetric, cfg.clip_ratio)
        kernel, _ = REGISTRY.select(cfg.scheme, cfg.backend, cfg.priority,
                                    weight_spec_for(settings, cfg.scale_precision), in_features,
                                    layer="<select_kernel>", fallback=cfg.fallback)
        return kernel

    def report(self) -> dict:
        if self.compiled is None:
            raise ConfigError("nothing compiled or loaded yet: call calibrate() or load_quantized()")
        return self.compiled.report()


class QuantizationManager:
    """Chooses the protocol by config.calibration, as the seed describes: every method runs
    through the same compiler, so the protocol is the compiler configured for that method."""

    def __init__(self, config: QuantConfig):
        self.config = config
        self.protocol = QuantizationProtocol(config)

    def __getattr__(self, name):
        return getattr(self.protocol, name)


__all__ = ["compile", "load", "quantization_aware_training", "CompiledModel", "QuantizationManager", "QuantizationProtocol",
           "META_KEY"]
