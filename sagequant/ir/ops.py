"""Named ops the canonical and quantized IR use, as torch custom ops so graphs stay runnable.

`canonicalize` collapses the ATen spelling of RMSNorm into `sagequant::rms_norm`; `convert`
writes `sagequant::dequantize_weight` in front of each quantized linear's weight input (the Q/DQ
form); `lower` then replaces dequantize + linear with a kernel op from the registry.
"""
from __future__ import annotations

import torch

from .quant_spec import QuantizedTensor, QuantSpec, dequantize, quantize


@torch.library.custom_op("sagequant::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    """RMSNorm computed in fp32 then cast back, as HF models do; weight_offset=1 is Gemma's (1 + w)."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    scale = weight.float() + weight_offset if weight_offset else weight
    return normed * scale


@rms_norm.register_fake
def _rms_norm_fake(x, weight, eps, weight_offset):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps, weight_offset = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps, ctx.weight_offset = eps, weight_offset


def _rms_norm_backward(ctx, grad):
    """Analytic RMSNorm gradient (QAT trains through the canonical graph): with r = rsqrt(mean(x^2)
    + eps), xhat = x r and g = grad * scale, dx = r (g - xhat mean(g xhat)); dweight = sum grad xhat."""
    x, weight = ctx.saved_tensors
    xf = x.float()
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
    xhat = xf * r
    scale = weight.float() + ctx.weight_offset
    g = grad.float() * scale
    dx = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    dweight = (grad.float() * xhat.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dweight.to(weight.dtype), None, None


rms_norm.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


@torch.library.custom_op("sagequant::dequantize_weight", mutates_args=())
def dequantize_weight(data: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      spec: str, shape: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    qt = QuantizedTensor(data, scale, zero_point, tuple(shape), QuantSpec.decode(spec))
    return dequantize(qt, out_dtype)


@dequantize_weight.register_fake
def _dequantize_weight_fake(data, scale, zero_point, spec, shape, out_dtype):
    return data.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("sagequant::fake_quantize_activation", mutates_args=())
def fake_quantize_activation(x: torch.Tensor, spec: str, scale: torch.Tensor | None) -> torch.Tensor:
    """Q/DQ of an activation: per-token scales computed from x (dynamic), or a calibrated static scale."""
    q = QuantSpec.decode(spec)
    return dequantize(quantize(x, q, scale=scale, what="activation"), x.dtype)


@fake_quantize_activation.register_fake
def _fake_quantize_activation_fake(x, spec, scale):
    return torch.empty_like(x)
