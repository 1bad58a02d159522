"""The placeholder a quantized linear becomes in captured ONNX, and what an emitter reads from it.

`sagequant::QLinear(X, QWeight, Scales, [Zeros], [Bias], [ActScale])` with attributes
`layer`, `spec` (the weight QuantSpec as JSON), `shape` ([out, in]) and `act_spec` (the activation
QuantSpec as JSON, "" for weight-only). QWeight / Scales / Zeros are exactly the buffers of the
lowered graph: codes in our storage (4-bit packed per row, element 2i in the low nibble), scales
[out, n_blocks] in the spec's scale dtype. Emitters never see ONNX Runtime-specific layouts here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...ir.quant_spec import QuantSpec, block_lengths
from ...errors import ExportError

DOMAIN = "sagequant"
OP_TYPE = "QLinear"


@dataclass
class QLinearInfo:
    """One placeholder node, decoded: numpy codes [out, in] plus scales / zero points per block."""

    layer: str
    spec: QuantSpec
    act_spec: QuantSpec | None
    out_features: int
    in_features: int
    codes: np.ndarray              # [N, K] integer codes (int64) or float32 values of fp8 codes
    scales: np.ndarray             # [N, n_blocks] float32 (exact upcast of the stored scales)
    zeros: np.ndarray | None       # [N, n_blocks] int64, asymmetric only
    act_scale: np.ndarray | None   # static activation scale (scalar float32) or None

    @property
    def n_blocks(self) -> int:
        return len(block_lengths(self.in_features, self.spec))

    @property
    def scheme_name(self) -> str:
        weight = self.spec.describe()
        return f"weights {weight}" + (f", activations {self.act_spec.describe()}"
                                      f"{' dynamic' if self.act_spec.dynamic else ' static'}"
                                      if self.act_spec else ", 16-bit activations")

    def error(self, fmt: str, constraint: str, instead: str = "") -> ExportError:
        return ExportError(f"cannot export layer {self.layer} ({self.scheme_name}) as {fmt}: "
                           f"{constraint}" + (f"; {instead}" if instead else ""))


def info_from_annotation(ann) -> QLinearInfo:
    """What an emitter's checks read (layer, specs, shape) from a lowered node's annotation, with
    no tensors: exports are refused before the slow capture, not after it."""
    attrs = ann.kernel.attrs
    return QLinearInfo(layer=ann.layer, spec=ann.weight_spec, act_spec=ann.input_spec,
                       out_features=int(attrs["out_features"]), in_features=int(attrs["in_features"]),
                       codes=None, scales=None, zeros=None, act_scale=None)


def decode(node) -> QLinearInfo:
    """Read a graphsurgeon placeholder node (its weight inputs are Constants) into numpy."""
    spec = QuantSpec.decode(node.attrs["spec"])
    act_text = node.attrs.get("act_spec", "")
    act_spec = QuantSpec.decode(act_text) if act_text else None
    n, k = (int(v) for v in node.attrs["shape"])
    qweight, scales = _const(node, 1), _const(node, 2)
    zeros = _const(node, 3) if _has_input(node, 3) else None
    act_scale = _const(node, 5) if _has_input(node, 5) else None
    fmt = spec.fmt
    data = torch.from_numpy(_torch_compatible(qweight))
    if fmt.kind == "float":
        data = data.view(fmt.storage_dtype)
    # per_tensor codes are one row over the flattened weight (4-bit packing runs across rows)
    last = n * k if spec.granularity == "per_tensor" else k
    rows = fmt.from_storage(data, last)
    codes = rows.float().numpy() if fmt.kind == "float" else rows.numpy().astype(np.int64)
    n_blocks = len(block_lengths(k, spec))
    return QLinearInfo(
        layer=node.attrs.get("layer", node.name), spec=spec, act_spec=act_spec,
        out_features=n, in_features=k, codes=codes.reshape(n, k),
        scales=_per_row(np.asarray(scales, dtype=np.float32), n, n_blocks),
        zeros=None if zeros is None else _per_row(np.asarray(zeros).astype(np.int64), n, n_blocks),
        act_scale=None if act_scale is None else np.asarray(act_scale, dtype=np.float32).reshape(()))


def _per_row(params: np.ndarray, n: int, n_blocks: int) -> np.ndarray:
    """Scales / zero points as [N, n_blocks]; a per_tensor [1, 1] parameter is broadcast."""
    if params.size == 1:
        return np.full((n, n_blocks), params.reshape(()), dtype=params.dtype)
    return np.ascontiguousarray(params.reshape(n, n_blocks))


def _has_input(node, i: int) -> bool:
    return len(node.inputs) > i and node.inputs[i] is not None and node.inputs[i].name != ""


def _const(node, i: int) -> np.ndarray:
    import onnx_graphsurgeon as gs
    from onnx import numpy_helper
    from onnx_graphsurgeon.ir.tensor import LazyValues
    t = node.inputs[i]
    if not isinstance(t, gs.Constant):
        raise ExportError(f"layer {node.attrs.get('layer', node.name)}: input {i} ({t.name}) of "
                          "the quantized linear is not a constant initializer")
    if isinstance(t._values, LazyValues):  # read the proto: graphsurgeon would upcast fp8 values
        return numpy_helper.to_array(t._values.tensor)
    return t.values


def _torch_compatible(a: np.ndarray) -> np.ndarray:
    """fp8 storage arrives as ml_dtypes arrays; torch reads their bytes as uint8."""
    if a.dtype.kind == "V" or a.dtype.name.startswith("float8"):
        return np.array(a.view(np.uint8))
    return np.array(a)  # a writable copy: torch refuses read-only numpy buffers
