"""Catalogue, fuzz: random mutations of a real graph.json (seeded, bounded number of examples).
Whatever the mutation, loading either gives a model back or raises ArtifactError; nothing else
escapes, and no payload among the mutated values ever runs."""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import sagequant as sq
from sagequant.api import compiled_from_parts
from sagequant.artifact import read_artifact


@pytest.fixture(scope="module")
def parts(artifact):
    return read_artifact(artifact)


MARKER = "/tmp/sagequant-fuzz-payload-ran"
WORDS = ["input_ids", "position_ids", "output", "linear", "__class__", "__import__", "os.system",
         "aten.add.Tensor", "sagequant.weight_only_linear_ref.default", "operator.getitem", "lambda",
         "model.lm_head.weight", "float32", "cpu", "call_method", "get_attr", "placeholder",
         f"x=(__import__('os').system('touch {MARKER}'))", "a\nb", "", "1e999", "strided"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(WORDS),
                    st.text(max_size=12))
tags = st.sampled_from(["node", "tuple", "dtype", "device", "layout", "memory_format", "py", "op", "code"])
json_values = st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                     st.dictionaries(st.one_of(tags, st.sampled_from(WORDS)), inner, max_size=2)),
    max_leaves=8)
FIELDS = ["name", "op", "target", "args", "kwargs", "annotation"]


def _mutate(graph: dict, data) -> dict:
    g = copy.deepcopy(graph)
    nodes = g["nodes"]
    i = data.draw(st.integers(0, len(nodes) - 1), label="node")
    kind = data.draw(st.sampled_from(["set", "delete", "duplicate", "swap", "arg", "top"]), label="kind")
    if kind == "set":
        nodes[i][data.draw(st.sampled_from(FIELDS))] = data.draw(json_values)
    elif kind == "delete":
        nodes[i].pop(data.draw(st.sampled_from(FIELDS)), None)
    elif kind == "duplicate":
        nodes.insert(data.draw(st.integers(0, len(nodes))), copy.deepcopy(nodes[i]))
    elif kind == "swap":
        j = data.draw(st.integers(0, len(nodes) - 1))
        nodes[i], nodes[j] = nodes[j], nodes[i]
    elif kind == "arg":
        args = nodes[i].get("args")
        if isinstance(args, list) and args:
            args[data.draw(st.integers(0, len(args) - 1))] = data.draw(json_values)
        else:
            nodes[i]["args"] = [data.draw(json_values)]
    else:
        g[data.draw(st.sampled_from(["format", "nodes", "extra"]))] = data.draw(json_values)
    return json.loads(json.dumps(g))  # only what a JSON file can hold


@seed(20261206)
@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_graph_is_loaded_or_refused_never_run(parts, data):
    graph, tensors, meta = parts
    mutated = _mutate(graph, data)
    try:
        compiled_from_parts(mutated, dict(tensors), copy.deepcopy(meta), "fuzzed artifact")
    except sq.ArtifactError:
        pass
    import os
    assert not os.path.exists(MARKER)
