"""Named views over lowered nodes: LinearCall / AttentionCall read every layout the lowering
writes and give the same positional arguments back; the step graph carries the compile's KV plan."""
from __future__ import annotations

import pytest

import sagequant as sq
from sagequant.ir.lowered import LinearCall
from sagequant.ir.paged_attention import AttentionCall, paged_attention
from sagequant.runtime.step_graph import step_graph

W8A8 = dict(weight_dtype="int8", activation_dtype="int8", group_size=None, guard="off")


@pytest.mark.parametrize("cfg, layouts", [
    (dict(group_size=32, guard="off"), {"weight-only"}),
    (dict(W8A8, fuse_qdq=False), {"quantizing"}),
    (dict(W8A8, activation_scale="static_per_tensor"), {"prequantized"}),
])
def test_every_lowered_linear_reads_by_name_and_round_trips(tiny, calib_ids, cfg, layouts):
    cm = sq.compile(tiny("llama"), sq.QuantConfig(**cfg), calibration_data=list(calib_ids.split(1)))
    seen = set()
    for node in cm.graph.annotated():
        ann = cm.graph.annotation(node)
        if ann.kernel is None:
            continue
        call = LinearCall.of(node)
        assert call.args() == tuple(node.args)
        assert list(call.shape) == [ann.kernel.attrs["out_features"], ann.kernel.attrs["in_features"]]
        assert call.qweight.op == "get_attr" and call.spec == ann.weight_spec.encode()
        seen.add("prequantized" if call.prequantized else "quantizing" if call.act_spec else "weight-only")
    assert seen == layouts


def test_a_node_of_another_layout_is_refused(tiny):
    cm = sq.compile(tiny("llama"), sq.QuantConfig(group_size=32, guard="off"))
    emb = next(n for n in cm.graph.graph.nodes if n.op == "call_function")
    with pytest.raises(ValueError, match="not a lowered linear"):
        LinearCall.of(emb)


def test_step_graph_carries_the_compiled_kv_plan(tiny):
    cm = sq.compile(tiny("llama"), sq.QuantConfig(group_size=32, guard="off", kv_cache_dtype="int8",
                                                  kv_high_precision_layers=[1]))
    graph = step_graph(cm)
    assert graph.kv_plan is cm.kv_plan
    calls = [AttentionCall.of(n) for n in graph.nodes(paged_attention)]
    assert [c.kv_dtype for c in calls] == ["int8", "none"] and [c.layer for c in calls] == [0, 1]
    assert all(c.args() == tuple(n.args) for c, n in zip(calls, graph.nodes(paged_attention)))
