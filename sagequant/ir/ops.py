"""Named ops the canonical and quantized IR use, as torch custom ops so graphs stay runnable.

`canonicalize` collapses the ATen spelling of RMSNorm into `sagequant::rms_norm`; `convert`
writes `sagequant::dequantize_weight` in front of each quantized linear's weight input (the Q/DQ
form); `lower` then replaces dequantize + linear with a kernel op from the registry.
"""
from __future__ import annotations

import math

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


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x @ H_p / √p over the last dim (p a power of two): log2(p) butterfly stages, no p×p matrix."""
    p = x.shape[-1]
    if p & (p - 1):
        raise ValueError(f"a fast Walsh-Hadamard transform needs a power-of-two width, got {p}")
    y = x.reshape(-1, p)
    h = 1
    while h < p:
        y = y.view(-1, p // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(p)).to(x.dtype)


def apply_online(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """x @ (block ⊗ H_p / √p) over x's last dim n = m · p (block m×m): the online rotation."""
    m = block.shape[0]
    n = x.shape[-1]
    if n % m:
        raise ValueError(f"online rotation: width {n} is not a multiple of the block order {m}")
    work = torch.promote_types(x.dtype, torch.float32)
    y = walsh_hadamard(x.to(work).reshape(*x.shape[:-1], m, n // m))
    return torch.matmul(block.to(work).t(), y).reshape(x.shape).to(x.dtype)



@torch.library.custom_op("sagequant::online_rotate", mutates_args=())
def online_rotate(x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """The rotate pass's online rotation in front of a linear (e.g. down_proj): x @ (block ⊗ H_p /
    √p); the linear's weight is rotated alike (W·R), so (x R)(W R)ᵀ = x Wᵀ."""
    return apply_online(x, block)


@online_rotate.register_fake
def _online_rotate_fake(x, block):
    return torch.empty_like(x)
