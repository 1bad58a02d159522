"""What benchmarks/cuda_kernels.py checks and times: the prepared weights of one layer shape and
every kernel variant (ours through the registered torch ops or a forced path, bf16 and peers),
each with the float64 reference it must match."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

GROUP = 128


def weight_specs(QuantSpec) -> dict:
    return {
        "int4": QuantSpec("int4", "per_group", GROUP, True, "fp16"),
        "uint4": QuantSpec("uint4", "per_group", GROUP, False, "fp16"),
        "int8": QuantSpec("int8", "per_channel", None, True, "fp16"),
        "int8g": QuantSpec("int8", "per_group", GROUP, True, "fp16"),
        "fp8": QuantSpec("fp8_e4m3", "per_channel", None, True, "fp16"),
    }


def act_specs(QuantSpec) -> dict:
    return {
        "fp8_dyn": QuantSpec("fp8_e4m3", "per_token", None, True, "fp32", dynamic=True),
        "fp8_static": QuantSpec("fp8_e4m3", "per_tensor", None, True, "fp32"),
        "int8_dyn": QuantSpec("int8", "per_token", None, True, "fp32", dynamic=True),
    }


@dataclass
class Layer:
    """One layer shape's weights on the GPU: float, bf16, and each quantized format."""

    name: str
    n: int
    k: int
    w: torch.Tensor                     # float32 master weight
    w16: torch.Tensor                   # bf16 baseline weight
    q: dict = field(default_factory=dict)   # fmt -> QuantizedTensor
    deq: dict = field(default_factory=dict)  # fmt -> float64 dequantized weight (lazily)
    tinygemm: tuple | None = None       # (packed int4, scales_and_zeros) or None
    tinygemm_error: str | None = None


def prepare(sq, name: str, n: int, k: int, seed: int) -> Layer:
    from sagequant.backends.cuda import layout
    from sagequant.ir.quant_spec import QuantSpec, quantize
    import cuda_bench_lib as lib
    gen = torch.Generator(device=lib.DEVICE).manual_seed(seed)
    w = torch.randn(n, k, device=lib.DEVICE, generator=gen) * 0.02
    layer = Layer(name, n, k, w, w.to(torch.bfloat16))
    for fmt, spec in weight_specs(QuantSpec).items():
        layer.q[fmt] = quantize(w, spec, what=f"{name} weight")
    qt = layer.q["int4"]
    why = layout.tinygemm_rejects(qt.spec, n, k)
    if why is None and hasattr(torch, "_convert_weight_to_int4pack"):
        try:
            packed, sz = layout.to_tinygemm(qt.data, qt.scale, None, qt.spec)
            layer.tinygemm = (torch._convert_weight_to_int4pack(packed, layout.TINYGEMM_INNER_K_TILES), sz)
        except Exception as err:  # a peer that fails is reported, not fatal
            layer.tinygemm_error = f"{type(err).__name__}: {err}"[:300]
    else:
        layer.tinygemm_error = why or "torch has no _convert_weight_to_int4pack"
    return layer


def dequantized(layer: Layer, fmt: str) -> torch.Tensor:
    from sagequant.ir.quant_spec import dequantize
    if fmt not in layer.deq:
        layer.deq[fmt] = dequantize(layer.q[fmt], torch.float64)
    return layer.deq[fmt]


def reference(layer: Layer, kind: str, fmt: str, x: torch.Tensor, bias, static_scale) -> torch.Tensor:
    """float64 oracle: weight-only = x @ dequant(W)^T; W8A8 = dequant(quant(x)) @ dequant(W)^T."""
    from sagequant.ir.quant_spec import QuantSpec, dequantize, quantize
    b = 0 if bias is None else bias.double()
    if kind == "bf16":
        return x.double() @ layer.w16.double().t() + b
    if kind == "wo":
        return x.double() @ dequantized(layer, fmt).t() + b
    spec = act_specs(QuantSpec)[kind]
    xq = quantize(x, spec, scale=static_scale if kind.endswith("static") else None, what="x")
    return dequantize(xq, torch.float64) @ dequantized(layer, fmt).t() + b


@dataclass
class Variant:
    name: str
    fmt: str            # which prepared weight it reads ("bf16", "int4", ..., "tinygemm")
    ref: str            # "bf16" | "wo" | "fp8_dyn" | "fp8_static" | "int8_dyn"
    call: Callable      # (x, weight_args, m, ctx) -> out
    max_m: int = 1 << 30
    min_m: int = 1
    needs_k16: bool = False  # torch._scaled_mm: K and N multiples of 16
    registered: bool = False  # runs through a registry row's torch op


def weight_args(layer: Layer, fmt: str) -> tuple:
    """The tensors a variant reads, cloned per copy when rotating to defeat the L2."""
    if fmt == "bf16":
        return (layer.w16,)
    if fmt == "tinygemm":
        if layer.tinygemm is None:
            raise RuntimeError(f"tinygemm unavailable: {layer.tinygemm_error}")
        return layer.tinygemm
    qt = layer.q[fmt]
    return (qt.data, qt.scale, qt.zero_point)


def layer_of(ctx: dict) -> tuple:
    """(N, K, weight QuantSpec) of the call: ctx holds the Layer and the variant's format."""
    layer = ctx["layer"]
    return layer.n, layer.k, layer.q[ctx["fmt"]].spec


def build_variants() -> dict:
    """Every variant by name, in timing priority order (registered kernels and bf16 first).
    A call is (x, weight_args, m, ctx); ctx: layer, fmt, bias, static_scale, fp8_x, plan."""
    from sagequant.backends.cuda import layout, triton_w8a8, triton_weight_only
    from sagequant.ir.quant_spec import QuantSpec
    ops = torch.ops.sagequant
    acts = act_specs(QuantSpec)

    def wo_op(x, a, m, ctx):
        n, k, spec = layer_of(ctx)
        return ops.cuda_weight_only_linear(x, a[0], a[1], a[2], ctx.get("bias"), spec.encode(), [n, k])

    def forced(path):
        def call(x, a, m, ctx):
            n, k, spec = layer_of(ctx)
            plan = ctx.get("plan") or layout.plan_for(
                path, m, n, k, bits=spec.fmt.bits, group=layout.kernel_group(spec, k))
            return triton_weight_only.weight_only_linear(x, a[0], a[1], a[2], ctx.get("bias"), spec,
                                                         [n, k], plan=plan)
        return call

    def w8a8(op, act):
        def call(x, a, m, ctx):
            n, k, spec = layer_of(ctx)
            static = act.endswith("static")
            return op(x, a[0], a[1], None, ctx.get("bias"), spec.encode(), [n, k],
                      acts[act].encode(), ctx["static_scale"] if static else None)
        return call

    def fp8_torch_quant(x, a, m, ctx):  # the unfused peer: activation quantization in torch ops
        amax = x.abs().amax(dim=-1, keepdim=True).float()
        s = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).clamp(min=1.1754943508222875e-38)
        xq = (x.float() / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        return triton_w8a8.fp8_linear(xq, s, a[0], a[1], None, x.dtype)

    def fp8_mm_only(x, a, m, ctx):  # activation already quantized: the GEMM alone
        xq, xs = ctx["fp8_x"]
        return triton_w8a8.fp8_linear(xq, xs, a[0], a[1], None, x.dtype)

    def int8_int_mm(x, a, m, ctx):
        xq, xs = triton_w8a8.quantize_activation(x, "int8")
        return triton_w8a8.int8_linear_int_mm(xq, xs, a[0], a[1], None, x.dtype)

    def tinygemm(x, a, m, ctx):
        return torch._weight_int4pack_mm(x, a[0], GROUP, a[1])

    V = [
        Variant("bf16", "bf16", "bf16", lambda x, a, m, ctx: F.linear(
            x, a[0] if a[0].dtype == x.dtype else a[0].to(x.dtype), ctx.get("bias"))),
        Variant("w4a16", "int4", "wo", wo_op, registered=True),
        Variant("w8a8-fp8", "fp8", "fp8_dyn", w8a8(ops.cuda_w8a8_fp8_linear, "fp8_dyn"),
                needs_k16=True, registered=True),
        Variant("w8a16", "int8", "wo", wo_op, registered=True),
        Variant("w8a8-int8", "int8", "int8_dyn", w8a8(ops.cuda_w8a8_int8_linear, "int8_dyn"),
                registered=True),
        Variant("tinygemm", "tinygemm", "wo", tinygemm),
        Variant("fp8-mm-only", "fp8", "fp8_dyn", fp8_mm_only, needs_k16=True),
        Variant("w4a16:gemv", "int4", "wo", forced("gemv"), max_m=16),
        Variant("w4a16:splitk", "int4", "wo", forced("splitk"), max_m=64),
        Variant("w4a16:tiled", "int4", "wo", forced("tiled"), min_m=8),
        Variant("w4a16:dequant_mm", "int4", "wo", forced("dequant_mm"), min_m=64),
        Variant("w4a16-asym", "uint4", "wo", wo_op, registered=True),
        Variant("fp8-w8a16", "fp8", "wo", wo_op, registered=True),
        Variant("w8a16-g128", "int8g", "wo", wo_op, registered=True),
        Variant("w8a8-fp8-static", "fp8", "fp8_static", w8a8(ops.cuda_w8a8_fp8_linear, "fp8_static"),
                needs_k16=True, registered=True),
        Variant("w8a8-fp8-torchq", "fp8", "fp8_dyn", fp8_torch_quant, needs_k16=True),
        Variant("w8a8-int8:int_mm", "int8", "int8_dyn", int8_int_mm, min_m=1),
    ]
    return {v.name: v for v in V}
