"""Standard-ONNX emission (opset 21): every quantized linear as Q/DQ around a MatMul.

  weight-only (W4A16, W8A16, FP8-W8A16):
      DequantizeLinear(codes [K, N] int4|uint4|int8|uint8|fp8, scale, [zero point];
                       per group: axis 0, block_size g, scale [ceil(K/g), N] — a ragged last
                       group is legal in ONNX and ONNX Runtime; per channel: axis 1, scale [N])
      -> MatMul(X, W) [-> Add bias]
  W8A8, static activation scale:
      X -> QuantizeLinear(scale, zero 0) -> DequantizeLinear -> MatMul(., DQ(W)) [-> Add bias]
  W8A8 INT8, dynamic per-token, per-channel or per-tensor int8 weights (an integer GEMM):
      codes = Clip(Round(X / s)), s = absmax(row) / 127, stored Cast<uint8>(codes + 128)
      MatMulInteger(codes_u8, W int8 [K, N], a_zero_point 128) -> Cast float -> * s
      -> * weight scale [N] [-> Add bias]
  W8A8 dynamic otherwise (grouped weights, FP8): the same per-token codes multiplied back by s
      (fake quantization in float) -> MatMul(., DQ(W)).
NF4 has no ONNX type: refused.
"""
from __future__ import annotations

import numpy as np

from .emit import (activation_per_token, activation_qdq_static, act_dtype, add_bias, constant, layer,
                   storage_dtype, weight_dequantize)
from .qlinear import QLinearInfo

FORMAT = "ONNX QDQ (opset 21)"


def check_qdq(info: QLinearInfo) -> None:
    if info.spec.format == "nf4":
        raise info.error(FORMAT, "NF4 is a code book format and ONNX has no NF4 tensor type",
                         "exportable: int4/uint4 (W4A16), int8/uint8 (W8A16, W8A8-INT8), fp8 "
                         "(FP8-W8A16, W8A8-FP8)")
    if storage_dtype(info.spec.format) is None:
        raise info.error(FORMAT, f"weight format {info.spec.format} has no ONNX tensor type")


def emit_qdq(graph, node, info: QLinearInfo):
    check_qdq(info)
    dtype = act_dtype(node)
    x = node.inputs[0]
    act = info.act_spec
    if act is not None and act.dynamic and _integer_gemm(info):
        return _dynamic_int8_gemm(graph, node, info, dtype)
    if act is not None:
        if act.dynamic:
            codes, scale = activation_per_token(graph, x, info, dtype)
            x = layer(graph, "Mul", [codes, scale], f"{info.layer}/input_fq", dtype=dtype)
        else:
            x = activation_qdq_static(graph, x, info, dtype)
    w = weight_dequantize(graph, info, dtype, "KN", FORMAT)
    y = layer(graph, "MatMul", [x, w], f"{info.layer}/matmul", dtype=dtype)
    return add_bias(graph, y, node, info, dtype)


def _integer_gemm(info: QLinearInfo) -> bool:
    return (info.act_spec.format == "int8" and info.spec.format == "int8"
            and info.spec.granularity in ("per_channel", "per_tensor"))


def _dynamic_int8_gemm(graph, node, info: QLinearInfo, dtype):
    from onnx import TensorProto
    p = info.layer
    codes, scale = activation_per_token(graph, node.inputs[0], info, dtype)
    # ONNX Runtime's fast MatMulInteger path is uint8 x int8: store code + 128 with zero point 128
    # (the GEMM subtracts it back, exactly); int8 x int8 runs ~100x slower on its CPU provider.
    shifted = layer(graph, "Add", [codes, constant(f"{p}.input_offset", np.asarray(128, dtype=dtype))],
                    f"{p}/input_offset", dtype=dtype)
    q = layer(graph, "Cast", [shifted], f"{p}/input_q", {"to": TensorProto.UINT8}, dtype=np.uint8)
    w = constant(f"{p}.weight_quantized", info.codes.T.astype(np.int8))
    a_zero = constant(f"{p}.input_zero_point", np.asarray(128, dtype=np.uint8))
    acc = layer(graph, "MatMulInteger", [q, w, a_zero], f"{p}/matmul_integer", dtype=np.int32)
    y = layer(graph, "Cast", [acc], f"{p}/acc_float", {"to": TensorProto.FLOAT}, dtype=np.float32)
    w_scale = info.scales[:, 0] if info.spec.granularity == "per_channel" else info.scales[:1, 0]
    y = layer(graph, "Mul", [y, constant(f"{p}.weight_scale", w_scale.astype(np.float32))],
              f"{p}/weight_rescale", dtype=np.float32)
    if np.dtype(dtype) != np.float32:
        y = layer(graph, "Cast", [y], f"{p}/to_act", {"to": TensorProto.FLOAT16 if np.dtype(dtype) == np.float16
                                                      else TensorProto.BFLOAT16}, dtype=dtype)
    y = layer(graph, "Mul", [y, scale], f"{p}/input_rescale", dtype=dtype)
    return add_bias(graph, y, node, info, dtype)
