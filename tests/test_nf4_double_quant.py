"""NF4 with QLoRA-style double quantization: the per-block scales stored as uint8 codes (blocks of
256, fp32 scale + zero point), dequantized by a second dequantize_weight node in the graph."""
import pytest
import torch

import sagequant as sq
from sagequant.config import ConfigError
from sagequant.ir.quant_spec import dequantize, double_quantize_scales

DQ = torch.ops.sagequant.dequantize_weight.default


def test_double_quantized_scales_match_a_float64_affine_reference():
    torch.manual_seed(0)
    scales = (torch.rand(37, 9) * 0.2 + 0.001).half()  # 333 scales: one full block + a ragged one
    q = double_quantize_scales(scales)
    assert q.data.dtype == torch.uint8 and q.scale.shape == (1, 2) and q.zero_point.shape == (1, 2)
    flat = scales.double().reshape(-1)
    for b, (lo, hi) in enumerate([(0, 256), (256, 333)]):
        block = flat[lo:hi]
        step = (block.max() - min(block.min(), 0.0)) / 255
        ref = torch.clamp(torch.round(block / step) + torch.round(-min(block.min(), 0.0) / step), 0, 255)
        assert float(q.scale[0, b]) == pytest.approx(float(step), rel=1e-6)
        got = dequantize(q, torch.float64).reshape(-1)[lo:hi]
        assert (got - block).abs().max() <= float(step) / 2 + 1e-9
        assert torch.equal(q.data.reshape(-1)[lo:hi].long(), ref.long())


def test_nf4_double_quant_graph_bytes_and_round_trip(fresh_tiny, calib_ids, eval_ids, tmp_path):
    model = fresh_tiny("llama")
    plain = sq.compile(model, sq.QuantConfig(weight_dtype="nf4", group_size=64))
    cm = sq.compile(model, sq.QuantConfig(weight_dtype="nf4", group_size=64, nf4_double_quant=True))
    dq = [n for n in cm.graph.graph.nodes if n.target == DQ]
    kernels = [n for n in cm.graph.annotated() if cm.graph.annotation(n).kernel is not None]
    assert len(dq) == len(kernels) == 14  # one scale-dequantize per linear; weight DQ lowered away
    for node in kernels:
        scale_arg = node.args[2]
        assert scale_arg.target == torch.ops.aten.reshape.default and scale_arg.args[0].target == DQ
    attrs = dict(cm.graph.gm.named_buffers())
    assert any(k.endswith("scales_q") and v.dtype == torch.uint8 for k, v in attrs.items())
    assert not any(k.endswith(".scales") for k in attrs)
    # Per linear: fp16 scales (2 bytes per 64 weights) become 1 byte + fp32 pairs per 256 scales.
    saved = plain.weight_bytes()["quantized_layers_bytes"] - cm.weight_bytes()["quantized_layers_bytes"]
    assert saved > 0
    assert cm.weight_bytes()["bits_per_weight"] < plain.weight_bytes()["bits_per_weight"] - 0.1
    ref = model(eval_ids).logits
    rel_plain = float((plain(eval_ids) - ref).norm() / ref.norm())
    rel_dq = float((cm(eval_ids) - ref).norm() / ref.norm())
    assert rel_dq < 1.2 * rel_plain + 1e-3
    cm.save(tmp_path / "art")
    assert torch.equal(sq.load(tmp_path / "art")(eval_ids), cm(eval_ids))


def test_double_quant_needs_nf4():
    with pytest.raises(ConfigError, match="nf4_double_quant=True needs weight_dtype='nf4'"):
        sq.QuantConfig(weight_dtype="int4", nf4_double_quant=True)
    with pytest.raises(ConfigError, match="nf4_double_quant"):
        sq.QuantConfig(weight_dtype="nf4", nf4_double_quant="yes")
