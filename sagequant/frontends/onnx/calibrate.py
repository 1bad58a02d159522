"""Calibration of an ONNX graph through onnxruntime: every quantized linear's input becomes an
extra graph output, the calibration batches run on the CPU provider, and each tapped tensor feeds
the same observers as the torch side (calibration/observers.py) plus per-channel statistics for
SmoothQuant / AWQ (absmax, mean |x| and an evenly spaced sample of rows)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...calibration.datasets import CalibrationDataError
from ...calibration.observers import FORMAT_AWARE_OBSERVERS, observer_for
from .graph import OnnxInputError


@dataclass
class TensorStats:
    observer: object                       # calibration.observers.Observer
    absmax: np.ndarray | None = None       # [in]
    abs_sum: np.ndarray | None = None      # [in]
    count: int = 0
    rows: list = field(default_factory=list)

    def add(self, x: np.ndarray, keep_rows: int) -> None:
        rows = x.reshape(-1, x.shape[-1]).astype(np.float32)
        self.observer(torch.from_numpy(rows))  # raises naming the tensor on NaN / Inf
        absmax, abs_sum = np.abs(rows).max(0), np.abs(rows).sum(0)
        self.absmax = absmax if self.absmax is None else np.maximum(self.absmax, absmax)
        self.abs_sum = abs_sum if self.abs_sum is None else self.abs_sum + abs_sum
        self.count += rows.shape[0]
        if keep_rows:
            step = max(1, rows.shape[0] // keep_rows)
            self.rows.append(rows[::step][:keep_rows])

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / self.count

    def sample(self, n: int) -> torch.Tensor:
        rows = np.concatenate(self.rows)
        idx = np.linspace(0, rows.shape[0] - 1, min(n, rows.shape[0])).round().astype(int)
        return torch.from_numpy(rows[idx])


def session(model, threads: int | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def run_logits(sess_or_model, input_ids: torch.Tensor) -> torch.Tensor:
    """The first output (logits) of a session, or of a ModelProto run once, on input_ids."""
    sess = session(sess_or_model) if hasattr(sess_or_model, "SerializeToString") else sess_or_model
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    out = sess.run([sess.get_outputs()[0].name], feeds(sess, ids.numpy()))
    return torch.from_numpy(np.asarray(out[0]))


def feeds(session_or_inputs, ids: np.ndarray) -> dict:
    """Inputs of one run: input_ids, plus attention_mask (ones) / position_ids (0..seq-1) when the
    graph takes them; any other input is refused by name."""
    names = [i.name for i in session_or_inputs.get_inputs()]
    out = {}
    for name in names:
        if name == "input_ids":
            out[name] = ids.astype(np.int64)
        elif name == "attention_mask":
            out[name] = np.ones_like(ids, dtype=np.int64)
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        else:
            raise OnnxInputError(f"the ONNX model takes input {name!r}, which sagequant cannot feed; "
                                 "it feeds input_ids, attention_mask and position_ids (export the "
                                 "model without a KV cache: logits from input_ids)")
    if "input_ids" not in out:
        raise OnnxInputError(f"the ONNX model has no input named 'input_ids' (inputs: {names})")
    return out


def collect(model_proto, linears, batches, cfg, keep_rows: int = 0) -> dict[str, TensorStats]:
    """Stats of each linear's input tensor (keyed by tensor name) over the calibration batches."""
    import onnx
    if not batches:
        raise CalibrationDataError("calibration data is empty: no batches to calibrate on")
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model_proto)
    known = {o.name for o in tapped.graph.output}
    names = []
    for lin in linears:
        if lin.x.name not in known:
            tapped.graph.output.append(onnx.helper.make_tensor_value_info(lin.x.name, onnx.TensorProto.FLOAT, None))
            known.add(lin.x.name)
        if lin.x.name not in names:
            names.append(lin.x.name)
    sess = session(tapped)
    kind = cfg.observer_kind
    stats = {}
    for lin in linears:
        if lin.x.name in stats:
            continue
        fmt = lin.act_spec.fmt if getattr(lin, "act_spec", None) is not None else None
        k = kind if (fmt is not None or kind not in FORMAT_AWARE_OBSERVERS) else "minmax"
        stats[lin.x.name] = TensorStats(observer_for(k, f"input of {lin.name}", fmt))
    per_batch = -(-keep_rows // len(batches)) if keep_rows else 0
    for batch in batches:
        values = sess.run(names, feeds(sess, batch.numpy()))
        for name, value in zip(names, values):
            stats[name].add(np.asarray(value), per_batch)
    return stats
