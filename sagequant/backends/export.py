"""Export a CompiledModel: ONNX (QDQ or MatMulNBits), TensorRT explicit-quantization ONNX and
compressed-tensors checkpoints, plus the ONNX Runtime helpers the parity checks use.

    cm.export("m.onnx", format="onnx", weight_format="qdq" | "matmulnbits")
    cm.export("m.trt.onnx", format="tensorrt", engine_path="m.plan")  # engine: needs TensorRT + GPU
    cm.export("m-ct/", format="compressed-tensors", tokenizer=tok)    # a directory vLLM loads

The graph is captured once (backends/onnxruntime/capture.py) with each quantized linear as a
placeholder, then the chosen emitter rewrites the placeholders; everything else in the model
(embedding, norms, attention, a float lm_head) is what torch.onnx writes for the lowered graph.
Files are written atomically (temporary name, then rename) through safe_write, which refuses to
replace what sagequant did not write unless overwrite=True.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..safe_write import check_output_dir, check_output_file, output_file
from .onnxruntime.qlinear import ExportError

FORMATS = ("onnx", "tensorrt", "compressed-tensors")
WEIGHT_FORMATS = ("qdq", "matmulnbits")
_EXTERNAL_DATA_BYTES = 1 << 30  # protobuf files stop at 2 GiB; weights move beside the file sooner


def export(compiled, path: str | Path, format: str = "onnx", weight_format: str = "qdq", *,
           accuracy_level: int = 0, engine_path: str | Path | None = None, captured=None,
           tokenizer=None, overwrite: bool = False) -> Path:
    """Write `compiled` to `path`; returns the path. Raises ExportError naming the layer, scheme and
    constraint when the format cannot express the model. `captured`: a `capture(compiled.graph)`
    result to reuse (capturing is the slow step; every ONNX format is emitted from the same capture).
    format="compressed-tensors" writes a directory (tokenizer files too when `tokenizer` is given).
    An existing file (or a directory holding files sagequant did not write) is replaced only with
    overwrite=True; check_output() says so before any work is done."""
    check_args(format, weight_format, engine_path)
    check_output(path, format, engine_path, overwrite)
    if format == "compressed-tensors":
        from .compressed_tensors.checkpoint import write_checkpoint
        return write_checkpoint(compiled, path, tokenizer=tokenizer, overwrite=overwrite)
    if tokenizer is not None:
        raise ExportError("tokenizer= is for format='compressed-tensors'; ONNX exports take input_ids")
    model = to_onnx(compiled, format, weight_format, accuracy_level=accuracy_level, captured=captured)
    out = _save(model, Path(path), overwrite)
    if engine_path is not None:
        from .tensorrt.explicit_quant import build_engine
        build_engine(out, engine_path, overwrite=overwrite)
    return out


def check_output(path, format: str, engine_path=None, overwrite: bool = False) -> None:
    """Refuse (before the slow capture) an output path whose files sagequant would lose."""
    if format == "compressed-tensors":
        check_output_dir(path, overwrite, what=f"{format} checkpoint")
        return
    check_output_file(path, overwrite, what=f"{format} export", companions=(".data",))
    if engine_path is not None:
        check_output_file(engine_path, overwrite, what="TensorRT engine")


def to_onnx(compiled, format: str = "onnx", weight_format: str = "qdq", accuracy_level: int = 0,
            captured=None):
    """The exported onnx.ModelProto, not written anywhere."""
    check_args(format, weight_format)
    if format == "compressed-tensors":
        raise ExportError("format='compressed-tensors' is a checkpoint directory, not an ONNX model; "
                          "use export(compiled, directory, format='compressed-tensors')")
    from .onnxruntime.capture import capture
    check, emit = emitter(format, weight_format, accuracy_level)
    check_exportable(compiled, check)
    return emit_placeholders(captured if captured is not None else capture(compiled.graph), emit,
                             compiled.config, format, weight_format)


def emitter(format: str, weight_format: str, accuracy_level: int = 0):
    """(per-layer check, emit function) of one ONNX output form."""
    if format == "tensorrt":
        from .tensorrt.explicit_quant import check_tensorrt, emit_tensorrt
        return check_tensorrt, emit_tensorrt
    if weight_format == "matmulnbits":
        from .onnxruntime.matmulnbits import check_matmulnbits, make_emit_matmulnbits
        return check_matmulnbits, make_emit_matmulnbits(accuracy_level)
    from .onnxruntime.qdq import check_qdq, emit_qdq
    return check_qdq, emit_qdq


def emit_placeholders(placeholder_model, emit, config, format: str, weight_format: str):
    """Rewrite a model holding sagequant::QLinear placeholders (captured from a QuantGraph, or
    built by the ONNX frontend) into the target form; TensorRT output is checked against its rules."""
    from .onnxruntime.emit import rewrite
    meta = {"sagequant.scheme": config.scheme, "sagequant.format": format,
            "sagequant.weight_format": weight_format,
            "sagequant.config": json.dumps(config.to_dict(), default=str)}
    model = rewrite(placeholder_model, emit, meta)
    if format == "tensorrt":
        from .tensorrt.explicit_quant import check_rules
        violations = check_rules(model)
        if violations:  # the emitter promises these rules; a violation is our bug, say which
            raise ExportError("internal: the TensorRT export breaks its Q/DQ rules: " + "; ".join(violations[:5]))
    return model


def check_exportable(compiled, check) -> None:
    """Run an emitter's per-layer check on every quantized layer before anything is captured."""
    from .onnxruntime.qlinear import info_from_annotation
    for node in compiled.graph.annotated():
        ann = compiled.graph.annotation(node)
        if ann.quantized and ann.kernel is not None:
            check(info_from_annotation(ann))


def check_args(format: str, weight_format: str, engine_path=None) -> None:
    if format not in FORMATS:
        raise ExportError(f"export format={format!r} is not supported; valid: {', '.join(FORMATS)}")
    if weight_format not in WEIGHT_FORMATS:
        raise ExportError(f"weight_format={weight_format!r} is not supported; valid: "
                          f"{', '.join(WEIGHT_FORMATS)} (format='onnx' only)")
    if format == "compressed-tensors" and weight_format != "qdq":
        raise ExportError("weight_format is for format='onnx'; compressed-tensors picks its own "
                          "(pack-quantized, int-quantized, float-quantized) from the scheme")
    if format == "tensorrt" and weight_format != "qdq":
        raise ExportError("format='tensorrt' writes Q/DQ only; weight_format='matmulnbits' is an "
                          "ONNX Runtime contrib op TensorRT does not read")
    if engine_path is not None and format != "tensorrt":
        raise ExportError("engine_path is for format='tensorrt'")


def _save(model, path: Path, overwrite: bool = False) -> Path:
    import onnx
    external = model.ByteSize() > _EXTERNAL_DATA_BYTES
    with output_file(path, overwrite, what="ONNX export", companions=(".data",)) as tmp:
        if external:  # the data file is named for the final path: the model refers to it by name
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
    return path


# ---- running exports in ONNX Runtime -------------------------------------------------------------

def onnxruntime_session(path_or_model, exact: bool = True, threads: int | None = None):
    """A CPU InferenceSession. exact=True pins ONNX Runtime's DQ+MatMul -> MatMulNBits fusion to
    accuracy level 0 (float accumulation, what the torch path computes); its default, level 4,
    quantizes activations to int8 inside the fused kernel."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    src = path_or_model if isinstance(path_or_model, (str, Path)) else path_or_model.SerializeToString()
    return ort.InferenceSession(str(src) if isinstance(src, Path) else src, so,
                                providers=["CPUExecutionProvider"])


def run_logits(session, input_ids: torch.Tensor) -> torch.Tensor:
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    (logits,) = session.run(["logits"], {"input_ids": ids.long().numpy()})
    return torch.from_numpy(np.asarray(logits))


def parity(compiled, session, input_ids: torch.Tensor) -> dict:
    """Logits of the torch path vs the ONNX Runtime session on the same ids."""
    return _compare(compiled(input_ids).float(), run_logits(session, input_ids).float())


def checkpoint_parity(compiled, directory: str | Path, input_ids: torch.Tensor) -> dict:
    """Logits of the torch path vs the compressed-tensors checkpoint loaded by transformers."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                 local_files_only=True).eval()
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    with torch.no_grad():
        got = model(ids.long()).logits.float()
    return _compare(compiled(ids).float(), got)


def _compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    diff = (got - ref).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float(diff.max() / ref.abs().max().clamp(min=1e-12)),
            "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
