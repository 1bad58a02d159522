"""The one annotation a node carries, under node.meta["sagequant"], and the records inside it.

`annotate` writes the QuantSpecs; later passes only read them and add their own records
(calibration, kernel binding, scheduler fields), the way PT2E quantizers annotate then generic
passes act.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .quant_spec import QuantSpec

META_KEY = "sagequant"


@dataclass(frozen=True)
class CalibrationRecord:
    """What calibration saw of one tensor (the seed's fields) and the range it chose."""

    tensor: str                 # e.g. "input" of a linear, or "weight"
    observer: str               # minmax | percentile
    min: float
    max: float
    absmax: float
    clip: float                 # the absolute range the scale is derived from
    scale: float | None = None  # per-tensor scale when one was chosen (static activations)
    zero_point: int | None = None
    percentile: float | None = None
    num_samples: int = 0        # batches observed
    num_values: int = 0         # elements observed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationRecord":
        return cls(**d)


@dataclass(frozen=True)
class KernelBinding:
    """The kernel a lowered node runs: name, backend and the attributes the kernel relies on."""

    kernel: str
    backend: str
    scheme: str
    priority: str
    attrs: dict = field(default_factory=dict)
    fallback_from: str | None = None  # the requested backend when config.fallback was used

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "KernelBinding":
        return cls(**d)


@dataclass(frozen=True)
class SchedulerIR:
    """Per lowered node: the seed's `dtype` and `kernel`, plus cost so a scheduler can order work.

    Costs are per token (one row of the activation), so they hold for any batch x sequence.
    """

    dtype: str
    kernel: str
    weight_bytes: int
    bytes_per_token: int
    flops_per_token: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerIR":
        return cls(**d)


@dataclass(frozen=True)
class Rotation:
    """A change of basis the rotate pass folded into a layer: a vector v of one space is
    (v @ matrix) * scale in the other (scale per channel; None: 1)."""

    matrix: torch.Tensor
    scale: torch.Tensor | None = None

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        out = v.to(self.matrix.dtype) @ self.matrix
        return (out if self.scale is None else out * self.scale.to(out.dtype)).to(v.dtype)


@dataclass(frozen=True)
class NodeAnnotation:
    layer: str                                # module path, e.g. model.layers.0.mlp.down_proj
    role: str = "linear"
    scheme: str | None = None                 # e.g. W4A16; None: kept in high precision
    weight_spec: QuantSpec | None = None
    input_spec: QuantSpec | None = None
    clip_ratio: float = 1.0
    skip_reason: str | None = None            # why a layer stays in float (ignore rule, override)
    calibration: dict[str, CalibrationRecord] = field(default_factory=dict)
    kernel: KernelBinding | None = None
    scheduler: SchedulerIR | None = None
    # (scale, zero_point) chosen by a weight-rounding algorithm (GPTQ) for convert to use as is;
    # transient: once convert has run, the codes and scales live in the graph's buffers.
    weight_qparams: tuple | None = field(default=None, repr=False, compare=False)
    # Per-channel factors SmoothQuant / AWQ folds applied to this layer (transient too): the float
    # model's input of the layer is graph_input * input_scale and its output graph_output *
    # output_scale, so the error report compares against the float layer in the graph's space.
    input_scale: torch.Tensor | None = field(default=None, repr=False, compare=False)
    output_scale: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # The rotate pass's change of basis (transient like the scales): the float model's input is
    # input_rotation.apply(graph_input * input_scale); the graph's output is
    # output_rotation.apply(float_output) / output_scale.
    input_rotation: Rotation | None = field(default=None, repr=False, compare=False)
    output_rotation: Rotation | None = field(default=None, repr=False, compare=False)

    @property
    def quantized(self) -> bool:
        return self.weight_spec is not None

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "role": self.role, "scheme": self.scheme,
            "weight_spec": self.weight_spec.to_dict() if self.weight_spec else None,
            "input_spec": self.input_spec.to_dict() if self.input_spec else None,
            "clip_ratio": self.clip_ratio, "skip_reason": self.skip_reason,
            "calibration": {k: v.to_dict() for k, v in self.calibration.items()},
            "kernel": self.kernel.to_dict() if self.kernel else None,
            "scheduler": self.scheduler.to_dict() if self.scheduler else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NodeAnnotation":
        return cls(
            layer=d["layer"], role=d["role"], scheme=d["scheme"],
            weight_spec=QuantSpec.from_dict(d["weight_spec"]) if d["weight_spec"] else None,
            input_spec=QuantSpec.from_dict(d["input_spec"]) if d["input_spec"] else None,
            clip_ratio=d["clip_ratio"], skip_reason=d["skip_reason"],
            calibration={k: CalibrationRecord.from_dict(v) for k, v in d["calibration"].items()},
            kernel=KernelBinding.from_dict(d["kernel"]) if d["kernel"] else None,
            scheduler=SchedulerIR.from_dict(d["scheduler"]) if d["scheduler"] else None,
        )
