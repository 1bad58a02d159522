"""Activation quantization as its own graph node, for `fuse_norm_qdq`: the quantized tensor and its
scale are computed once and read by every GEMM that consumes them, instead of each W8A8 kernel
quantizing the same float tensor again.

  quantize_activation(x, act_spec, act_scale)            -> (codes, scale)
  rms_norm_quantize(x, w, eps, offset, act_spec, act_scale) -> (codes, scale)   RMSNorm + Q, one node
codes: x's shape in the format's storage dtype (int8 / float8); scale: [tokens, 1] fp32 per token
(dynamic) or the static [1, 1] scale. The numerics are QuantSpec's (ir/quant_spec.py), so a
kernel reading (codes, scale) computes bit for bit what one quantizing x itself does.
"""
from __future__ import annotations

import torch

from .ops import rms_norm
from .quant_spec import QuantizedTensor, QuantSpec, dequantize, quantize


def _quantize(x: torch.Tensor, act_spec: str, act_scale: torch.Tensor | None):
    qt = quantize(x, QuantSpec.decode(act_spec), scale=act_scale, what="activation")
    return qt.data.reshape(x.shape), qt.scale.to(torch.float32, copy=True)  # never alias act_scale


def _fake(x: torch.Tensor, act_spec: str, act_scale):
    spec = QuantSpec.decode(act_spec)
    codes = x.new_empty(x.shape, dtype=spec.fmt.storage_dtype)
    if act_scale is not None or not spec.dynamic:
        return codes, x.new_empty((1, 1), dtype=torch.float32)
    rows = x.numel() // x.shape[-1] if x.dim() else 1
    return codes, x.new_empty((rows, 1), dtype=torch.float32)


@torch.library.custom_op("sagequant::quantize_activation", mutates_args=())
def quantize_activation(x: torch.Tensor, act_spec: str,
                        act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize(x, act_spec, act_scale)


@quantize_activation.register_fake
def _quantize_activation_fake(x, act_spec, act_scale):
    return _fake(x, act_spec, act_scale)


@torch.library.custom_op("sagequant::rms_norm_quantize", mutates_args=())
def rms_norm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float,
                      act_spec: str, act_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _quantize(rms_norm(x, weight, eps, weight_offset), act_spec, act_scale)


@rms_norm_quantize.register_fake
def _rms_norm_quantize_fake(x, weight, eps, weight_offset, act_spec, act_scale):
    return _fake(x, act_spec, act_scale)


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, act_spec: str,
                          dtype: torch.dtype) -> torch.Tensor:
    """The float values of (codes, scale) from quantize_activation / rms_norm_quantize."""
    spec = QuantSpec.decode(act_spec)
    rows = codes.reshape(1, -1) if spec.granularity == "per_tensor" else codes.reshape(-1, codes.shape[-1])
    qt = QuantizedTensor(rows, scale, None, tuple(codes.shape), spec)
    return dequantize(qt, dtype)
