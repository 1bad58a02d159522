"""ONNX Runtime's com.microsoft::MatMulNBits for weight-only 4- and 8-bit linears.

MatMulNBits(A [.., K], B uint8 [N, k_blocks, block_size * bits / 8], scales [N * k_blocks],
            [zero_points uint8 packed]) with attributes K, N, bits, block_size, accuracy_level.
  - codes are unsigned: value = (code - zero_point) * scale; without zero_points the zero point is
    2^(bits-1) (8 for 4-bit), so our signed int4 code c is stored as c + 8 (int8: c + 128);
  - block_size must be a power of two >= 16; per-channel weights become one block per row of
    the next power of two >= K;
  - B always holds whole blocks: k_blocks = ceil(K / block_size). When K is not a multiple of
    block_size (a ragged last group, e.g. SmolLM2's 576 = 4 x 128 + 64) the last block of B is
    padded with zero-valued codes (code = that block's zero point), while K stays the true K:
    the kernel reads A's K columns only, and the padding would dequantize to exactly 0 anyway;
  - 4-bit packing inside a block: element 2i in the low nibble of byte i (ours too, per row);
    4-bit zero points: two blocks per byte, low nibble first, each row padded to whole bytes;
  - accuracy_level 0 (default here) dequantizes to A's float type and accumulates in float —
    what the torch path computes; level 4 quantizes A to int8 inside the kernel (faster, less
    exact). ONNX Runtime's own DQ+MatMul -> MatMulNBits fusion uses the session option
    `session.qdq_matmulnbits_accuracy_level`, which defaults to 4.
"""
from __future__ import annotations

import numpy as np

from .emit import act_dtype, add_bias, constant, layer
from .qlinear import ExportError, QLinearInfo

FORMAT = "ONNX Runtime MatMulNBits"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


def block_size_for(info: QLinearInfo) -> int:
    spec = info.spec
    if spec.granularity == "per_group":
        g = spec.group_size
        if g < 16 or g & (g - 1):
            raise info.error(FORMAT, f"MatMulNBits needs block_size to be a power of two >= 16, "
                             f"group_size is {g}", "use weight_format='qdq' (any group size) or "
                             "compile with group_size 16, 32, 64, 128, ...")
        return g
    return max(16, 1 << (info.in_features - 1).bit_length())


def pack_weight(info: QLinearInfo, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """-> (B uint8 [N, k_blocks, block*bits/8], scales [N*k_blocks] float32, zero_points uint8 | None)."""
    n, k = info.out_features, info.in_features
    k_blocks = -(-k // block)
    if info.spec.granularity == "per_group":
        scales, zeros = info.scales, info.zeros  # [N, k_blocks] already
    else:  # one block per row covering all of K
        scales = info.scales[:, :1]
        zeros = None if info.zeros is None else info.zeros[:, :1]
    if zeros is None:
        offset = 1 << (bits - 1)
        codes = info.codes + offset
        pad = np.full((n, k_blocks), offset, dtype=np.int64)
    else:
        codes = info.codes
        pad = zeros
    padded = np.repeat(pad, block, axis=1)[:, : k_blocks * block].astype(np.uint8)
    padded[:, :k] = codes.astype(np.uint8)
    if bits == 4:
        packed = padded[:, 0::2] | (padded[:, 1::2] << 4)
    else:
        packed = padded
    b = np.ascontiguousarray(packed.reshape(n, k_blocks, block * bits // 8)).astype(np.uint8)
    zp = None
    if zeros is not None:
        z = zeros.astype(np.uint8)
        if bits == 4:
            if z.shape[1] % 2:
                z = np.pad(z, ((0, 0), (0, 1)))
            z = z[:, 0::2] | (z[:, 1::2] << 4)
        zp = np.ascontiguousarray(z).reshape(-1)
    return b, np.ascontiguousarray(scales, dtype=np.float32).reshape(-1), zp


def check_matmulnbits(info: QLinearInfo) -> tuple[int, int]:
    """(bits, block_size) of the layer's MatMulNBits, or an ExportError naming the constraint."""
    fmt = info.spec.format
    if info.act_spec is not None:
        raise info.error(FORMAT, "MatMulNBits is weight-only; this layer quantizes its activations",
                         "export W8A8 schemes with weight_format='qdq'")
    if fmt not in ("int4", "uint4", "int8", "uint8"):
        raise info.error(FORMAT, f"MatMulNBits takes 4- or 8-bit integer weights, not {fmt}",
                         "use weight_format='qdq' for fp8 weights; NF4 has no ONNX form")
    return (4 if fmt in ("int4", "uint4") else 8), block_size_for(info)


def make_emit_matmulnbits(accuracy_level: int = 0):
    if accuracy_level not in ACCURACY_LEVELS:
        raise ExportError(f"MatMulNBits accuracy_level={accuracy_level!r}; valid: {ACCURACY_LEVELS} "
                          "(0: float accumulation as in torch; 4: int8 activations inside the kernel)")

    def emit(graph, node, info: QLinearInfo):
        bits, block = check_matmulnbits(info)
        dtype = act_dtype(node)
        b, scales, zp = pack_weight(info, bits, block)
        p = info.layer
        inputs = [node.inputs[0], constant(f"{p}.weight_packed", b),
                  constant(f"{p}.weight_scales", scales.astype(dtype))]
        if zp is not None:
            inputs.append(constant(f"{p}.weight_zero_points", zp))
        y = layer(graph, "MatMulNBits", inputs, f"{p}/matmulnbits",
                  {"K": info.in_features, "N": info.out_features, "bits": bits, "block_size": block,
                   "accuracy_level": accuracy_level}, dtype=dtype, domain="com.microsoft")
        return add_bias(graph, y, node, info, dtype)
    return emit
