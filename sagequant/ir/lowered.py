"""Named views over lowered nodes, so no reader indexes kernel arguments by position.

A lowered quantized linear (passes/lower.py, passes/fuse_norm_qdq.py) calls its kernel with one
of three argument layouts:
  weight-only     (x, qweight, scales, zeros, bias, spec, shape)
  quantizing      (x, qweight, scales, zeros, bias, spec, shape, act_spec, act_scale): the kernel
                  quantizes its float input x with act_spec (act_scale: the static scale, or None)
  prequantized    (codes, x_scale, qweight, scales, zeros, bias, spec, shape, act_spec, out_dtype):
                  the input arrives quantized by a shared quantizer (fuse_norm_qdq)
LinearCall is that layout by name; `args()` gives the positional form back to build a node.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx


@dataclass(frozen=True)
class LinearCall:
    x: Any                      # the float input; prequantized: the activation codes
    qweight: Any
    scales: Any
    zeros: Any
    bias: Any
    spec: str                   # QuantSpec.encode() of the weight
    shape: list                 # [out_features, in_features]
    act_spec: str | None = None  # quantizing / prequantized: the activation QuantSpec text
    act_scale: Any = None       # quantizing: the static activation scale (None: dynamic)
    x_scale: Any = None         # prequantized: the shared quantizer's scale
    out_dtype: Any = None       # prequantized: the output dtype
    prequantized: bool = False

    @classmethod
    def of(cls, node: fx.Node) -> LinearCall:
        a = node.args
        if len(a) == 7:
            return cls(*a)
        if len(a) == 9:
            return cls(*a[:7], act_spec=a[7], act_scale=a[8])
        if len(a) == 10:
            codes, x_scale, qweight, scales, zeros, bias, spec, shape, act_spec, out_dtype = a
            return cls(codes, qweight, scales, zeros, bias, spec, shape, act_spec,
                       x_scale=x_scale, out_dtype=out_dtype, prequantized=True)
        raise ValueError(f"node {node.name} ({node.target}) has {len(a)} arguments: not a lowered "
                         "linear (7 weight-only, 9 quantizing, 10 prequantized)")

    @property
    def weights(self) -> tuple:
        return self.qweight, self.scales, self.zeros

    def args(self) -> tuple:
        weight = (self.qweight, self.scales, self.zeros, self.bias, self.spec, self.shape)
        if self.prequantized:
            return (self.x, self.x_scale, *weight, self.act_spec, self.out_dtype)
        if self.act_spec is not None:
            return (self.x, *weight, self.act_spec, self.act_scale)
        return (self.x, *weight)
