"""FakeQuant for quantization-aware training: the QuantSpec's quantize-dequantize with
straight-through gradients, optional LSQ-style learnable scales, and observers that can be frozen.

Forward is exactly `dequantize(quantize(x, spec, scale, zero_point))` (the format object's own
rounding and saturation), evaluated without packing. Backward:
  d out / d x = 1 inside the clip range (the code before saturation lies in [qmin, qmax]), else 0
  d out / d s = q - v inside, (code - zero_point) outside   (LSQ; v = x / s, q = the rounded v)
scaled by LSQ's 1 / sqrt(elements per scale * qmax) so every scale learns at a comparable pace.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ir.quant_spec import SCALE_DTYPES, QuantSpec, compute_qparams


def _as_rows(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return x.reshape(1, -1) if spec.granularity == "per_tensor" else x.reshape(-1, x.shape[-1])


def _blocked(rows: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """[R, K] -> [R, n_blocks, g], the ragged last group zero-padded, so per-block scales
    broadcast over the last dim (no per-element scale tensor, contiguous block reductions)."""
    k = rows.shape[-1]
    g = spec.group_size if spec.granularity == "per_group" else k
    n_blocks = -(-k // g)
    if n_blocks * g != k:
        rows = F.pad(rows, (0, n_blocks * g - k))
    return rows.reshape(rows.shape[0], n_blocks, g)


def _unblocked(blocks: torch.Tensor, k: int) -> torch.Tensor:
    return blocks.reshape(blocks.shape[0], -1)[:, :k]


def _clip_bounds(spec: QuantSpec) -> tuple[float, float]:
    fmt = spec.fmt
    return (-fmt.qmax, fmt.qmax) if fmt.kind == "float" else (fmt.qmin, fmt.qmax)


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, spec: QuantSpec, lsq_factor: float):
        rows = _as_rows(x, spec).to(torch.float32)
        blocks = _blocked(rows, spec)
        s = scale.float().expand(blocks.shape[0], blocks.shape[1]).unsqueeze(-1)
        zp = None if zero_point is None else zero_point.float().expand_as(s[..., 0]).unsqueeze(-1)
        v = blocks / s if zp is None else blocks / s + zp
        q = spec.fmt.round_trip(v)
        lo, hi = _clip_bounds(spec)
        inside = (v >= lo) & (v <= hi)
        if zp is not None:
            q, v = q - zp, v - zp
        ctx.spec, ctx.lsq_factor = spec, lsq_factor
        ctx.scale_shape, ctx.x_shape = scale.shape, x.shape
        # dq/ds per element; kept only when the scale learns.
        ds = torch.where(inside, q - v, q) if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(inside, ds)
        return _unblocked(q * s, rows.shape[-1]).reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        inside, ds = ctx.saved_tensors
        g_rows = _as_rows(grad, ctx.spec).float()
        g_blocks = _blocked(g_rows, ctx.spec)
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            masked = g_blocks.masked_fill(~inside, 0.0)
            grad_x = _unblocked(masked, g_rows.shape[-1]).reshape(ctx.x_shape).to(grad.dtype)
        if ds is not None:
            blocks = (g_blocks * ds).sum(-1)  # padded elements have ds == 0
            if ctx.scale_shape[0] == 1:
                blocks = blocks.sum(0, keepdim=True)
            grad_scale = (blocks * ctx.lsq_factor).reshape(ctx.scale_shape)
        return grad_x, grad_scale, None, None, None


def fake_quantize(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor,
                  zero_point: torch.Tensor | None = None, lsq_factor: float = 1.0) -> torch.Tensor:
    """Differentiable quantize-dequantize of x with the given scale ([rows or 1, n_blocks])."""
    return _FakeQuantSTE.apply(x, scale, zero_point, spec, lsq_factor)


def _round_to_scale_dtype(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The scale as it will be stored (fp16 / fp32 / bf16), gradient passed straight through."""
    stored = scale.detach().to(SCALE_DTYPES[spec.scale_dtype]).float()
    return scale + (stored - scale.detach())


class FakeQuantize(torch.nn.Module):
    """Quantize-dequantize of one tensor per its QuantSpec.

    Static specs hold a scale (and zero point) initialised from PTQ's choice (RTN of the weight,
    GPTQ's grid, the calibrated activation range). While `observing`, training forwards re-derive the
    scale from the tensor seen (weights: exactly, so it tracks the weight being trained;
    activations: a moving average). `freeze()` stops that. `learn_scale=True` makes the scale a
    Parameter trained by LSQ gradients instead (no observer). Dynamic specs compute per-token
    scales from each input, as the deployed kernel does.
    """

    def __init__(self, spec: QuantSpec, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                 learn_scale: bool = False, averaging: float = 1.0, clip_ratio: float = 1.0,
                 what: str = "tensor"):
        super().__init__()
        if spec.dynamic and learn_scale:
            raise ValueError(f"{what}: a dynamic {spec.describe()} spec computes its scales per "
                             "input at run time; there is no scale to learn")
        if not spec.dynamic and scale is None:
            raise ValueError(f"{what}: a static {spec.describe()} spec needs an initial scale")
        self.spec, self.what, self.clip_ratio, self.averaging = spec, what, clip_ratio, averaging
        if spec.dynamic:
            self.scale = None
        elif learn_scale:
            self.scale = torch.nn.Parameter(scale.detach().float().clone())
        else:
            self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", None if zero_point is None else zero_point.detach().float())
        self.observing = not learn_scale and not spec.dynamic

    @property
    def learns_scale(self) -> bool:
        return isinstance(self.scale, torch.nn.Parameter)

    def freeze(self) -> None:
        """Stop the observer: the scale keeps its current value."""
        self.observing = False

    def _usable_scale(self) -> torch.Tensor:
        # abs keeps a learned scale positive; tiny keeps it a valid divisor in every scale dtype.
        return self.scale.abs().clamp(min=torch.finfo(torch.float16).tiny)

    def stored_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale in the spec's scale dtype, integer zero point): what convert stores, the same
        grid this module's forward uses."""
        scale = self._usable_scale().detach().to(SCALE_DTYPES[self.spec.scale_dtype])
        zp = None if self.zero_point is None else self.zero_point.to(torch.int32)
        return scale, zp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            scale, zp = compute_qparams(x.detach(), self.spec, self.clip_ratio, self.what)
            return fake_quantize(x, self.spec, scale.float(), zp)
        if self.observing and self.training:
            self._observe(x.detach())
        per_scale = x.numel() / self.scale.numel()
        lsq = 1.0 / math.sqrt(per_scale * self.spec.fmt.qmax) if self.learns_scale else 1.0
        scale = _round_to_scale_dtype(self._usable_scale(), self.spec)
        return fake_quantize(x, self.spec, scale, self.zero_point, lsq)

    def _observe(self, x: torch.Tensor) -> None:
        scale, zp = compute_qparams(x, self.spec, self.clip_ratio, self.what)
        a = self.averaging
        self.scale.copy_(scale.float() if a == 1.0 else (1 - a) * self.scale + a * scale.float())
        if zp is not None:
            self.zero_point.copy_(zp.float())


class FakeQuantLinear(torch.nn.Linear):
    """A quantized linear during QAT: F.linear(fq_input(x), fq_weight(W), b). An nn.Linear, so
    peft can put LoRA adapters on it (FakeQuantLoraLinear fake-quantizes W + the adapters' delta,
    the weight that merging produces)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, weight_fq: FakeQuantize,
                 input_fq: FakeQuantize | None):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None,
                         device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.weight_fq = weight_fq
        self.input_fq = input_fq

    def fake_quant_linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.input_fq is not None:
            x = self.input_fq(x)
        return F.linear(x, self.weight_fq(weight), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fake_quant_linear(x, self.weight)


def lora_layer_class():
    """peft's LoRA layer for FakeQuantLinear (imported lazily: peft is only needed for LoRA)."""
    from peft.tuners.lora import Linear as LoraLinear

    class FakeQuantLoraLinear(LoraLinear):
        """Fake-quantizes the merged weight W + sum(scaling * B A), so the adapters learn what the
        exported (merged, then quantized) weight will be; merging is peft's own."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            base = self.get_base_layer()
            if self.disable_adapters or self.merged:
                return base(x)
            weight = base.weight
            for name in self.active_adapters:
                if name in self.lora_A:
                    weight = weight + self.get_delta_weight(name)
            return base.fake_quant_linear(x, weight)

    return FakeQuantLoraLinear
