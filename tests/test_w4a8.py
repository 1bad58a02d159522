"""W4A8 (int4 weights, int8 or fp8 activations): config normalisation, the CPU reference kernel
against an independent float64 computation, a compile through the registry with save / load,
and the clear error for a backend without a W4A8 kernel."""
import pytest
import torch

import sagequant as sq
from sagequant.config import ConfigError
from sagequant.ir.quant_spec import QuantSpec, quantize
from sagequant.lowering.registry import KernelNotFoundError


def test_w4a8_schemes_and_contradictions():
    assert sq.QuantConfig(weight_dtype="int4", activation_dtype="int8").scheme == "W4A8-INT8"
    assert sq.QuantConfig(weight_dtype="int4", activation_dtype="fp8").scheme == "W4A8-FP8"
    assert sq.QuantConfig(weight_dtype="int4", activation_dtype="int8", symmetric=False).weight_format == "uint4"
    with pytest.raises(ConfigError, match="W4A8-INT8 / W4A8-FP8"):
        sq.QuantConfig(weight_dtype="nf4", activation_dtype="int8")
    with pytest.raises(ConfigError, match="w4a16 means 16-bit activations"):
        sq.QuantConfig(weight_dtype="w4a16", activation_dtype="int8")


def test_w4a8_reference_kernel_matches_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 80, generator=g) * torch.linspace(0.1, 4.0, 80)
    w = torch.randn(16, 80, generator=g)
    spec = QuantSpec("int4", "per_group", 32, True, "fp32")  # groups 32, 32, 16 (ragged)
    act = QuantSpec("int8", "per_token", None, True, "fp32", dynamic=True)
    qt = quantize(w, spec)
    out = torch.ops.sagequant.w8a8_linear_ref(x, qt.data, qt.scale, None, None, spec.encode(), [16, 80],
                                              act.encode(), None)
    # Independent reference: per-group absmax / 7.5 for the weight (codes -8..7, +absmax rounds to
    # 7), per-token absmax / 127 for the activation, codes from fp32 division as the formats round;
    # the GEMM of the dequantized operands in float64.
    deq = torch.empty(16, 80, dtype=torch.float64)
    for lo in range(0, 80, 32):
        blk = w[:, lo:lo + 32]
        s = blk.abs().amax(1, keepdim=True) / 7.5
        deq[:, lo:lo + 32] = (torch.round(blk / s).clamp(-8, 7) * s.double()).double()
    xs = x.abs().amax(1, keepdim=True) / 127
    xq = torch.round(x / xs).clamp(-128, 127).double() * xs.double()
    torch.testing.assert_close(out.double(), xq @ deq.t(), rtol=1e-5, atol=1e-5)


def test_w4a8_compiles_on_the_cpu_reference_and_round_trips(compiled, tiny, eval_ids, tmp_path):
    qm = compiled("llama", weight_dtype="int4", activation_dtype="int8", group_size=32)
    anns = [qm.graph.annotation(n) for n in qm.graph.annotated()]
    quantized = [a for a in anns if a.quantized]
    assert len(quantized) == 14 and {a.kernel.kernel for a in quantized} == {"cpu_w4a8_ref"}
    assert {(a.weight_spec.describe(), a.input_spec.describe()) for a in quantized} == {
        ("int4/g32/sym/fp32", "int8/per_token/sym/fp32")}  # fp32 weight scales, the default
    assert all(a.input_spec.dynamic for a in quantized)
    with torch.no_grad():
        ref = tiny("llama")(eval_ids).logits
    w4a16 = compiled("llama", weight_dtype="int4", group_size=32)
    err16 = (w4a16(eval_ids) - ref).norm() / ref.norm()
    # The same int4 weights; the int8 activations move the output, by far less than the weights do.
    act_only = (qm(eval_ids) - w4a16(eval_ids)).norm() / ref.norm()
    assert 0 < act_only < err16 / 3 and err16 < 0.5, (act_only, err16)
    qm.save(tmp_path / "a")
    assert torch.equal(sq.load(tmp_path / "a")(eval_ids), qm(eval_ids))


def test_w4a8_on_cuda_names_the_backends_that_have_it(tiny, calib_ids):
    cfg = sq.QuantConfig(weight_dtype="int4", activation_dtype="int8", backend="cuda")
    with pytest.raises(KernelNotFoundError, match="W4A8-INT8 kernels exist for: cpu:cpu_w4a8_ref"):
        sq.compile(tiny("llama"), cfg, calibration_data=calib_ids)
