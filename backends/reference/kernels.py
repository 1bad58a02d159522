"""CPU reference kernels: the numerical oracle. Weight-only linear = dequantize the stored codes
with the format's own numerics, then a float GEMM in the activation dtype."""
from __future__ import annotations

import torch

from ...config import SCHEMES
from ...ir.quant_spec import QuantizedTensor, QuantSpec, dequantize
from ...lowering.registry import REGISTRY, KernelSpec

PRIORITIES = ("latency", "throughput", "memory")
WEIGHT_ONLY_SCHEMES = tuple(s for s in SCHEMES if s.endswith("A16"))


@torch.library.custom_op("sagequant::weight_only_linear_ref", mutates_args=())
def weight_only_linear_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor | None, bias: torch.Tensor | None, spec: str,
                           shape: list[int]) -> torch.Tensor:
    qt = QuantizedTensor(qweight, scales, zeros, tuple(shape), QuantSpec.decode(spec))
    return torch.nn.functional.linear(x, dequantize(qt, x.dtype), bias)


@weight_only_linear_ref.register_fake
def _fake(x, qweight, scales, zeros, bias, spec, shape):
    return x.new_empty((*x.shape[:-1], shape[0]))


CPU_WEIGHT_ONLY = REGISTRY.register(KernelSpec(
    name="cpu_weight_only_ref",
    backend="cpu",
    schemes=WEIGHT_ONLY_SCHEMES,
    priorities=PRIORITIES,
    op=torch.ops.sagequant.weight_only_linear_ref.default,
    description="dequantize (int8/int4/fp8/nf4, any group incl. ragged) then float GEMM",
))
