"""convert + lower + schedule: packed storage, RTN numerics against a float64 reference, kernel
bindings, scheduler IR, end-to-end logits, and explicit kernel selection / fallback."""
import copy
import math

import pytest
import torch

import sagequant as sq
from sagequant.ir.quant_spec import QuantSpec
from sagequant.lowering.registry import REGISTRY, KernelNotFoundError
from sagequant.passes import PassContext, PassManager


# Custom ops are looked up (or compared by name) when used, never cached at import: a second import
# of the package re-registers them as new OpOverloads (see the note in conftest.py).
def DQ(*args):
    return torch.ops.sagequant.dequantize_weight.default(*args)


def is_dq(node) -> bool:
    return node.op == "call_function" and str(node.target) == "sagequant.dequantize_weight.default"


LINEAR = torch.ops.aten.linear.default
G = 32


# ------------------------------------------------------------------ float64 references
def ref_rtn(w: torch.Tensor, group: int | None, bits: int = 4, symmetric: bool = True,
            scale_dtype: torch.dtype = torch.float32):
    """Round-to-nearest(-even) with `scale_dtype` scales per group (None: per output channel); the
    scale and code arithmetic in float32 as the implementation documents, checked in float64.
    Returns (codes, scales, zero points or None, dequantized weight)."""
    w = w.detach().double()
    k = w.shape[1]
    bounds = [(s, min(s + (group or k), k)) for s in range(0, k, group or k)]
    codes, scales, zeros, deq = [], [], [], torch.empty_like(w)
    for lo_i, hi_i in bounds:
        blk = w[:, lo_i:hi_i].float()
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            top = 7.5 if bits == 4 else qmax  # int4 maps absmax onto 7.5: all 16 levels
            absmax = blk.abs().amax(1, keepdim=True)
            s = torch.where(absmax > 0, absmax / top, torch.ones_like(absmax)).to(scale_dtype).float()
            # (ties at ±7.5 decide -8 vs -7)
            q = torch.round(blk / s).clamp(-qmax - 1, qmax)
            zp = torch.zeros_like(s)
        else:
            qmax = 2 ** bits - 1
            lo, hi = blk.amin(1, keepdim=True).clamp(max=0), blk.amax(1, keepdim=True).clamp(min=0)
            exact = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi))
            s = exact.to(scale_dtype)
            # Asymmetric scales round *up* to the next representable one so [lo, hi] fits the codes.
            s = torch.where(s.float() < exact, torch.nextafter(s, torch.full_like(s, 65504.0)), s).float()
            zp = torch.round(-lo / s).clamp(0, qmax)
            q = torch.round(blk / s + zp).clamp(0, qmax)
        codes.append(q.double())
        scales.append(s.double())
        zeros.append(zp.double())
        deq[:, lo_i:hi_i] = ((q - zp) * s).double()
    return torch.cat(codes, 1), torch.cat(scales, 1), None if symmetric else torch.cat(zeros, 1), deq


def unpack_int4(packed: torch.Tensor, k: int, signed: bool) -> torch.Tensor:
    """Independent nibble unpacking: element 2i is the low nibble of byte i, 2i+1 the high one."""
    out = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=torch.int64)
    out[:, 0::2] = (packed & 0xF).long()
    out[:, 1::2] = (packed >> 4).long()
    out = out[:, :k]
    return torch.where(out >= 8, out - 16, out) if signed else out


def weight_of(module) -> torch.Tensor:
    """[out, in] weight of an nn.Linear or a transformers Conv1D ([in, out])."""
    return module.weight if isinstance(module, torch.nn.Linear) else module.weight.t()


def dequantized_reference_model(model, cfg_layers: dict[str, torch.Tensor]):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, deq in cfg_layers.items():
            mod = ref.get_submodule(name)
            mod.weight.copy_(deq if isinstance(mod, torch.nn.Linear) else deq.t())
    return ref.double()


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def converted(traced, cfg, arch="llama", **kw):
    model, graph = traced(arch, **kw)
    graph = PassManager(["canonicalize", "annotate", "insert_observers", "calibrate", "convert"]).run(
        graph, PassContext(cfg))
    return model, graph


# ------------------------------------------------------------------------------ convert
@pytest.mark.parametrize("symmetric", [True, False])
def test_convert_storage_and_numerics(traced, helpers, symmetric):
    cfg = sq.QuantConfig(group_size=G, symmetric=symmetric)
    model, graph = converted(traced, cfg, **helpers.RAGGED)
    state = dict(graph.gm.named_parameters()) | dict(graph.gm.named_buffers())
    linears = [n for n in graph.annotated() if n.target == LINEAR]
    assert len(linears) == 15 and graph.op_counts()[
        "sagequant.dequantize_weight.default"] == 14
    shapes_seen = set()
    for node in linears:
        ann = graph.annotation(node)
        w = weight_of(model.get_submodule(ann.layer))
        out_f, in_f = w.shape
        if not ann.quantized:
            assert ann.layer == "lm_head" and node.args[1].op == "get_attr"
            continue
        dq = node.args[1]
        assert is_dq(dq)
        qweight, scales, zeros, spec, shape, dtype = dq.args
        assert shape == [out_f, in_f] and dtype == torch.float32
        prefix = "model." + ann.layer
        assert f"{prefix}.weight" not in state  # the float weight is gone
        assert qweight.target == f"{prefix}.qweight" and scales.target == f"{prefix}.scales"
        qw, sc = graph.attr(qweight), graph.attr(scales)
        assert qw.dtype == torch.uint8 and tuple(qw.shape) == (out_f, math.ceil(in_f / 2))
        assert sc.dtype == torch.float32 and tuple(sc.shape) == (out_f, math.ceil(in_f / G))
        codes, ref_s, ref_z, ref_deq = ref_rtn(w, G, symmetric=symmetric)
        assert torch.equal(unpack_int4(qw, in_f, signed=symmetric), codes.long()), ann.layer
        assert torch.equal(sc.double(), ref_s), ann.layer
        if symmetric:
            assert zeros is None
        else:
            assert torch.equal(graph.attr(zeros).double(), ref_z), ann.layer
        deq = DQ(*[graph.attr(a) if a is not None else None for a in (qweight, scales, zeros)],
                 spec, shape, dtype)
        assert torch.equal(deq.double(), ref_deq), ann.layer
        shapes_seen.add(in_f)
    assert shapes_seen == {80, 64, 99}  # ragged (80, 99), whole (64) and odd (99) rows covered
    assert "model.lm_head.weight" in state


def test_int8_per_channel_storage(traced):
    cfg = sq.QuantConfig(weight_dtype="int8", group_size=None)
    model, graph = converted(traced, cfg)
    for node in [n for n in graph.graph.nodes if n.op == "call_function" and is_dq(n)]:
        layer = graph.annotation(next(iter(node.users))).layer
        w = weight_of(model.get_submodule(layer))
        qw, sc = graph.attr(node.args[0]), graph.attr(node.args[1])
        codes, ref_s, _, ref_deq = ref_rtn(w, None, bits=8)
        assert qw.dtype == torch.int8 and qw.shape == w.shape and sc.shape == (w.shape[0], 1)
        assert torch.equal(qw.long(), codes.long()) and torch.equal(sc.double(), ref_s)
        deq = DQ(graph.attr(node.args[0]), graph.attr(node.args[1]), None, *node.args[3:])
        assert torch.equal(deq.double(), ref_deq)


# ------------------------------------------------------------------------ lower/schedule
def test_lower_binds_every_quantized_linear(tiny, helpers, compiled):
    model = tiny("llama", **helpers.RAGGED)
    cm = compiled("llama", helpers.RAGGED, group_size=G)
    counts = cm.graph.op_counts()
    assert "sagequant.dequantize_weight.default" not in counts
    assert counts["sagequant.weight_only_linear_ref.default"] == 14
    assert counts["aten.linear.default"] == 1  # lm_head stays a float linear
    bindings, sched = cm.kernel_bindings, {s["layer"]: s for s in cm.scheduler_ir}
    assert len(bindings) == 14 and len(sched) == 14
    for node in cm.graph.annotated():
        ann = cm.graph.annotation(node)
        if not ann.quantized:
            assert node.target == LINEAR and ann.kernel is None and ann.scheduler is None
            continue
        assert str(node.target) == "sagequant.weight_only_linear_ref.default"
        out_f, in_f = weight_of(model.get_submodule(ann.layer)).shape
        k = ann.kernel
        assert (k.kernel, k.backend, k.scheme, k.priority, k.fallback_from) == (
            "cpu_weight_only_ref", "cpu", "W4A16", "latency", None)
        expected = {"format": "int4", "group_size": G, "ragged_last_group": in_f % G != 0,
                    "packed": True, "in_features": in_f, "activation_bytes": 4, "out_features": out_f}
        assert {key: k.attrs.get(key) for key in expected} == expected
        s = sched[ann.layer]
        assert s["node"] == node.name
        assert (s["dtype"], s["kernel"]) == ("int4", "cpu_weight_only_ref")
        assert s["flops_per_token"] == 2 * in_f * out_f
        assert s["weight_bytes"] == out_f * math.ceil(in_f / 2) + 4 * out_f * math.ceil(in_f / G)
        assert s["bytes_per_token"] == 4 * (in_f + out_f)
        assert bindings[ann.layer] == k.to_dict()
    wb = cm.report()["weight_bytes"]
    assert wb["quantized_layers_bytes"] == sum(s["weight_bytes"] for s in sched.values())
    assert cm.report()["kernels"] == {"cpu:cpu_weight_only_ref": 14}


@pytest.mark.parametrize("arch, kw, symmetric", [
    ("llama", "ragged", True), ("llama", "ragged", False), ("gpt2", None, True), ("gemma3", None, True)])
def test_compiled_logits_match_float64_dequantized_model(tiny, helpers, compiled, eval_ids,
                                                         arch, kw, symmetric):
    model_kw = helpers.RAGGED if kw else {}
    model = tiny(arch, **model_kw)
    cm = compiled(arch, model_kw, group_size=G, symmetric=symmetric)
    deq = {}
    for node in cm.graph.annotated():
        layer = cm.graph.annotation(node).layer
        if cm.graph.annotation(node).quantized:
            deq[layer] = ref_rtn(weight_of(model.get_submodule(layer)), G, symmetric=symmetric)[3]
    ref = dequantized_reference_model(model, deq)
    with torch.no_grad():
        expected = ref(eval_ids).logits
        float_logits = model(eval_ids).logits
    got = cm(eval_ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert rel_err(got, expected) < 1e-4
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert rel_err(float_logits, expected) > 1e-3  # quantization did change the model


def test_w8a16_much_closer_to_float_than_w4a16(tiny, compiled, eval_ids):
    with torch.no_grad():
        ref = tiny("llama")(eval_ids).logits
    w4 = compiled("llama", group_size=G)
    w8 = compiled("llama", weight_dtype="int8", group_size=None)
    assert w8.report()["scheme"] == "W8A16"
    e4, e8 = rel_err(w4(eval_ids), ref), rel_err(w8(eval_ids), ref)
    assert 0 < e8 < e4 / 4, (e4, e8)


# ---------------------------------------------------------------------- kernel selection
def test_cuda_without_fallback_lists_registered_keys(tiny, calib_ids):
    cfg = sq.QuantConfig(group_size=G, backend="cuda")
    with pytest.raises(KernelNotFoundError) as info:
        sq.compile(tiny("llama"), cfg, calibration_data=calib_ids)
    msg = str(info.value)
    assert "scheme=W4A16, backend=cuda, priority=latency" in msg
    if not REGISTRY.candidates("W4A16", "cuda", "latency"):
        assert "registered keys:" in msg
        for key in REGISTRY.keys():
            assert f"({', '.join(key)})" in msg
        assert "(W4A16, cpu, latency)" in msg
    else:  # a cuda kernel exists but cannot run here: it must say why
        assert "cuda:" in msg and "QuantConfig.fallback" in msg
    assert any("'lower'" in n for n in info.value.__notes__)


def test_cuda_with_cpu_fallback(tiny, compiled, calib_ids, eval_ids):
    model = tiny("llama")
    w4 = QuantSpec("int4", "per_group", G, True, "fp16")
    if any(s.rejects(w4, 64) is None for s in REGISTRY.candidates("W4A16", "cuda", "latency")):
        pytest.skip("a CUDA W4A16 kernel is usable here: no fallback happens")
    cpu = compiled("llama", group_size=G)
    fb = sq.compile(model, sq.QuantConfig(group_size=G, backend="cuda", fallback="cpu"),
                    calibration_data=calib_ids)
    rep = fb.report()
    quantized = sorted(n for n in fb.kernel_bindings)
    assert len(quantized) == 14
    assert rep["fallbacks"] == quantized and cpu.report()["fallbacks"] == []
    assert rep["backend"] == "cuda"
    for b in fb.kernel_bindings.values():
        assert b["backend"] == "cpu" and b["fallback_from"] == "cuda"
    assert torch.equal(fb(eval_ids), cpu(eval_ids))


W8A8 = [("int8", "int8", "W8A8-INT8"), ("fp8", "fp8", "W8A8-FP8"), ("w8a8", "w8a8", "W8A8-INT8")]


@pytest.mark.parametrize("wd, ad, scheme", W8A8)
def test_w8a8_on_cpu(tiny, calib_ids, wd, ad, scheme):
    cfg = sq.QuantConfig(weight_dtype=wd, activation_dtype=ad, group_size=None)
    assert cfg.scheme == scheme
    if REGISTRY.candidates(scheme, "cpu", cfg.priority):
        # A CPU W8A8 kernel is registered: the scheme must bind to it, not fall back silently.
        cm = sq.compile(tiny("llama"), cfg, calibration_data=calib_ids)
        assert {b["scheme"] for b in cm.kernel_bindings.values()} == {scheme}
        assert {b["backend"] for b in cm.kernel_bindings.values()} == {"cpu"}
        return
    with pytest.raises(KernelNotFoundError) as info:
        sq.compile(tiny("llama"), cfg, calibration_data=calib_ids)
    assert f"scheme={scheme}" in str(info.value) and "backend=cpu" in str(info.value)


@pytest.mark.parametrize("wd, ad, scheme", W8A8[:2])
def test_scheme_without_kernel_is_named(tiny, calib_ids, wd, ad, scheme):
    backend = next((b for b in ("kunlun", "mlu", "ascend", "rocm", "tensorrt", "onnxruntime", "cuda")
                    if not REGISTRY.candidates(scheme, b, "latency")), None)
    if backend is None:
        pytest.skip(f"every backend registers a {scheme} kernel")
    cfg = sq.QuantConfig(weight_dtype=wd, activation_dtype=ad, group_size=None, backend=backend)
    with pytest.raises(KernelNotFoundError) as info:
        sq.compile(tiny("llama"), cfg, calibration_data=calib_ids)
    msg = str(info.value)
    assert f"scheme={scheme}, backend={backend}, priority=latency" in msg
    assert "model.layers.0.self_attn.q_proj" in msg  # the first layer it tried
    assert "registered keys:" in msg


def test_compile_leaves_the_eager_model_untouched(fresh_tiny, calib_ids, eval_ids):
    model = fresh_tiny("gpt2")  # Conv1D weights get transposed and the lm_head is tied
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(eval_ids).logits
    cm = sq.compile(model, sq.QuantConfig(group_size=G, ignore=[]), calibration_data=calib_ids)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    with torch.no_grad():
        assert torch.equal(model(eval_ids).logits, logits)
    assert cm.report()["quantized_layers"] == 9  # lm_head too: nothing ignored
    assert rel_err(cm(eval_ids), logits) < 0.2


def test_lower_requires_convert(traced):
    _, graph = traced("llama")
    pm = PassManager(["canonicalize", "annotate", "lower"])
    with pytest.raises(RuntimeError, match=r"lower requires \['convert'\]"):
        pm.run(graph, PassContext(sq.QuantConfig(group_size=G)))
