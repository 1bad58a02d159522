"""benchmarks/weight_only_prefill.py: the layer sums and the candidate list of its H100 table
(its --smoke run, ~1 min in Triton's interpreter, is the end-to-end check of the script)."""
import pytest


@pytest.fixture(scope="module")
def bench(benchmark_module):
    return benchmark_module("weight_only_prefill")


def _row(shape, m, quant, bf16):
    return {"shape": shape, "format": "int4/g128/sym/fp32", "m": m, "registry_us": quant,
            "bf16_us": bf16, "paths": []}


def test_layer_totals_sum_the_linears_and_skip_an_incomplete_m(bench):
    rows = [_row("qkv", 512, 60.0, 36.0), _row("down", 512, 140.0, 80.0),
            _row("qkv", 2048, 150.0, 130.0)]  # down at 2048 missing (budget): no total
    assert bench.layer_totals(rows) == [{"format": "int4/g128/sym/fp32", "m": 512,
                                         "quant_us": 200.0, "bf16_us": 116.0, "x_bf16": 1.724}]


def test_tiled_variants_join_the_candidates_from_their_min_m(bench):
    from sagequant.backends.cuda import layout
    spec = bench.formats()["int4_g128"]
    small = bench.plans_at(128, 4096, 4096, spec, 128, 132)
    assert all(label == "candidate" for label, _ in small)
    big = bench.plans_at(bench.TILED_VARIANTS_MIN_M, 4096, 4096, spec, 128, 132)
    extra = {label for label, _ in big} - {"candidate"}
    assert extra == {f"tiled_{v}" for v in bench.TILED_VARIANTS}
    first = big[0][1]
    assert first == layout.choose(bench.TILED_VARIANTS_MIN_M, 4096, 4096, bits=4, group=128,
                                  fmt="int4")  # the thresholds' own path leads
