"""benchmarks/e2e_generation.py: the guard against timing a CPU reference path, and the ratio and
full-depth arithmetic of its table (its --smoke run is the end-to-end check of the script)."""
import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("e2e_generation")


def test_reference_kernels_are_refused_for_a_cuda_timing(bench, compiled):
    cm = compiled(weight_dtype="int4", group_size=32)
    bound_to_cpu = r"layer .* is bound to cpu:cpu_weight_only_ref.*expected a cuda kernel"
    with pytest.raises(SystemExit, match=bound_to_cpu):
        bench.check_kernels(cm, cm.graph, "W4A16", "cuda")
    got = bench.check_kernels(cm, cm.graph, "W4A16", "cpu")
    assert got["kernels"] == {"cpu:cpu_weight_only_ref": len(cm.kernel_bindings)}
    assert got["graph_ops"]["sagequant.weight_only_linear_ref.default"] == len(cm.kernel_bindings)


def test_unquantized_scheme_is_refused(bench, compiled):
    cm = compiled(ignore=["*"])
    with pytest.raises(SystemExit, match="no linear was quantized"):
        bench.check_kernels(cm, cm.graph, "W4A16", "cpu")


def test_ratios_and_full_depth_estimate(bench):
    rows = [{"scheme": "bf16", "memory": {"linear_bytes": 1000}, "prefill_ms_2048": 30.0,
             "decode_b1": {"tok_s": 100.0, "ms_per_step": 10.0, "gpu_step_ms": 8.0}},
            {"scheme": "W4A16", "memory": {"linear_bytes": 300}, "prefill_ms_2048": 40.0,
             "decode_b1": {"tok_s": 200.0, "ms_per_step": 5.0, "gpu_step_ms": 4.0}},
            {"scheme": "W8A16", "memory": {"linear_bytes": 550}, "prefill_ms_2048": "skipped (time budget)",
             "decode_b1": "skipped (time budget)"}]
    bench.add_ratios(rows, [1])
    bench.full_depth(rows, {1: 2.0}, layers=4, full_layers=32, batches=[1])
    bf16, w4, w8 = rows
    assert w4["linear_bytes_vs_bf16"] == pytest.approx(0.3)
    assert w4["prefill_speedup_2048"] == pytest.approx(0.75)
    assert w4["decode_b1"]["speedup"] == pytest.approx(2.0)
    assert w4["decode_b1"]["gpu_step_speedup"] == pytest.approx(2.0)
    # head 2 ms + per-layer part scaled 4 -> 32 layers + host time (step - replay)
    assert bf16["decode_b1"]["est_full_depth_tok_s"] == pytest.approx(1e3 / (2 + 6 * 8 + 2))
    assert w4["decode_b1"]["est_full_depth_tok_s"] == pytest.approx(1e3 / (2 + 2 * 8 + 1))
    assert w4["decode_b1"]["est_full_depth_speedup"] == pytest.approx(52 / 19)
    assert "prefill_speedup_2048" not in w8 and w8["decode_b1"] == "skipped (time budget)"


def test_cuda_compiled_graph_passes_and_a_swapped_reference_op_is_caught(bench, monkeypatch, tiny):
    """Compiled for backend cuda on a machine made to look like an H100 (nothing runs): the check
    accepts the CUDA bindings, and refuses a graph where one linear calls the reference op."""
    import sagequant
    import torch
    from sagequant.backends.cuda import hardware
    for name in ("cuda_missing", "capability_missing", "triton_missing"):
        monkeypatch.setattr(hardware, name, lambda *a: None)
    cm = sagequant.compile(tiny("llama"), sagequant.QuantConfig(weight_dtype="int4", group_size=32,
                                                                backend="cuda", guard="off"))
    engine = bench.new_engine(cm, 2, 32, torch.device("cpu"), cuda_graphs=False)
    got = bench.check_kernels(cm, engine.graph, "W4A16", "cuda")
    assert got["kernels"] == {"cuda:cuda_w4a16_triton": len(cm.kernel_bindings)}
    assert got["dispatch_by_m"][0]["m_min"] == 1
    node = next(n for n in engine.graph.graph.nodes if "cuda_weight_only_linear" in str(n.target))
    node.target = torch.ops.sagequant.weight_only_linear_ref.default
    with pytest.raises(SystemExit, match="calls reference ops .*refusing to time it"):
        bench.check_kernels(cm, engine.graph, "W4A16", "cuda")


def test_prefill_report_tables(bench):
    """The prefill profile and the measured kernel choices as the engine records them, as tables
    (the GPU run writes them; here from recorded-shape rows)."""
    import prefill_report

    class Engine:
        kernel_choices = [{"spec": "int4/g128/sym/fp16", "shape": [6144, 4096], "layers": 32, "rows": [
            {"m": 32, "chosen": "dequant_mm(chunk_n=all)", "thresholds": "mma4(BM=32)",
             "us": {"mma4(BM=32)": 60.0, "dequant_mm(chunk_n=all)": 50.0}, "bf16_gemm_us": 40.0}]}]

    rows = [{"scheme": "W4A16", "kernel_choices": prefill_report.choices_summary(Engine()),
             "prefill_profile_512": {"wall_ms": 30.0, "kernel_ms": 20.0, "kernels": 900,
                                     "by_category_ms": {"gemm": 15.0, "norm": 1.0}}}]
    assert rows[0]["kernel_choices"][0]["rows"][0] == {
        "m": 32, "chosen": "dequant_mm(chunk_n=all)", "us": 50.0, "thresholds": "mma4(BM=32)",
        "thresholds_us": 60.0, "bf16_gemm_us": 40.0}
    prof, choices = prefill_report.markdown(rows, [512, 2048])
    assert "| W4A16 | 512 | 30 | 20 | 900 | 15 | 1 |" in prof
    assert "| W4A16 | int4/g128/sym/fp16 | 6144x4096 | 32 | 32 | dequant_mm(chunk_n=all) | 50 | mma4(BM=32) | 60 | 40 | 0.8 |" in choices
