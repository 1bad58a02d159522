"""Catalogue, artifacts II: graph.json outside the closed vocabulary, and code-injection payloads
in every string field of graph.json and meta.json. Each tamper re-hashes the manifest (checksums
pass, as for a real attacker), then asserts an ArtifactError naming the node or field, and that
the marker file the payload would create does not exist. Fields whose value is free text (shown
in reports only) must load with the payload kept as inert data; that is asserted too."""
from __future__ import annotations

import json

import pytest
import torch

import sagequant as sq
from bad_input_tools import annotated, node, payloads, tamper
from sagequant.ir.graph import QuantGraph


def _first_string_arg(graph):
    return next(n for n in graph["nodes"] if any(isinstance(a, str) for a in n["args"]))


def _set(path):
    """edit(graph, value): put `value` at a path of callables/keys into the graph JSON."""
    def edit(graph, value):
        *parents, last = path
        obj = graph
        for step in parents:
            obj = step(obj) if callable(step) else obj[step]
        if callable(last):
            last(obj, value)
        else:
            obj[last] = value
    return edit


def _str_arg(n, value):
    i = next(i for i, a in enumerate(n["args"]) if isinstance(a, str))
    n["args"][i] = value


def _kwargs_key(n, value):
    n["kwargs"] = {value: 1, **n["kwargs"]}


def _as_method(n, value):
    n.update(op="call_method", target=value)


def _tagged(tag):
    def put(n, value):
        n["args"] = [*n["args"], {tag: value}]
    return put


def _calibration_key(ann, value):
    ann["calibration"][value] = ann["calibration"].pop("input")


def _attrs_key(kernel, value):
    kernel["attrs"][value] = 1


def _call(graph):
    return annotated(graph)


def _placeholder(graph):
    return node(graph, "placeholder")


# field -> (where the payload goes, the words the refusal names). Every string-valued field of a
# saved graph, each kind of target, and the string-typed tags.
GRAPH_STRING_FIELDS = {
    "name": ([_call, "name"], "'name'"),
    "op": ([_call, "op"], "'op'"),
    "placeholder target": ([_placeholder, "target"], "'target'"),
    "placeholder name": ([_placeholder, "name"], "'name'"),
    "get_attr target": ([lambda g: node(g, "get_attr"), "target"], "'target'"),
    "call_function op": ([_call, "target", "op"], "'target.op'"),
    "call_function py": ([_call, "target", lambda t, v: t.clear() or t.update(py=v)], "'target.py'"),
    "call_method target": ([_call, _as_method], "'target'"),
    "output target": ([lambda g: g["nodes"][-1], "target"], "'target'"),
    "string constant argument": ([_first_string_arg, _str_arg], "args["),
    "kwargs key": ([_call, _kwargs_key], "'kwargs key'"),
    "dtype tag": ([_call, _tagged("dtype")], ".dtype"),
    "device tag": ([_call, _tagged("device")], ".device"),
    "layout tag": ([_call, _tagged("layout")], ".layout"),
    "memory_format tag": ([_call, _tagged("memory_format")], ".memory_format"),
    "node reference": ([_call, _tagged("node")], ".node"),
    "annotation.layer": ([_call, "annotation", "layer"], "'annotation.layer'"),
    "annotation.role": ([_call, "annotation", "role"], "'annotation.role'"),
    "annotation.scheme": ([_call, "annotation", "scheme"], "'annotation.scheme'"),
    "weight_spec.format": ([_call, "annotation", "weight_spec", "format"], "weight_spec.format"),
    "weight_spec.granularity": ([_call, "annotation", "weight_spec", "granularity"], "granularity"),
    "weight_spec.scale_dtype": ([_call, "annotation", "weight_spec", "scale_dtype"], "scale_dtype"),
    "calibration key": ([_call, "annotation", _calibration_key], "'annotation.calibration key'"),
    "calibration.tensor": ([_call, "annotation", "calibration", "input", "tensor"], "input.tensor"),
    "calibration.observer": ([_call, "annotation", "calibration", "input", "observer"], "input.observer"),
    "kernel.kernel": ([_call, "annotation", "kernel", "kernel"], "'annotation.kernel.kernel'"),
    "kernel.backend": ([_call, "annotation", "kernel", "backend"], "kernel.backend"),
    "kernel.scheme": ([_call, "annotation", "kernel", "scheme"], "kernel.scheme"),
    "kernel.priority": ([_call, "annotation", "kernel", "priority"], "kernel.priority"),
    "kernel.fallback_from": ([_call, "annotation", "kernel", "fallback_from"], "kernel.fallback_from"),
    "kernel.attrs key": ([_call, "annotation", "kernel", _attrs_key], "kernel.attrs key"),
    "scheduler.dtype": ([_call, "annotation", "scheduler", "dtype"], "scheduler.dtype"),
    "scheduler.kernel": ([_call, "annotation", "scheduler", "kernel"], "scheduler.kernel"),
    "graph format": (["format"], "'format'"),
}


@pytest.mark.parametrize("field", list(GRAPH_STRING_FIELDS))
def test_code_payload_in_graph_string_field_is_refused(art, refused, marker, field):
    path, words = GRAPH_STRING_FIELDS[field]
    payload = payloads(marker)[len(field) % 5]
    tamper(art, "graph.json", lambda g: _set(path)(g, payload))
    refused("graph.json", words)


# Free text: kept as data, never code. Loading, running, printing the IR and the report, and the
# HTML report must all leave the marker absent.
GRAPH_FREE_TEXT = {
    "annotation.skip_reason": [_call, "annotation", "skip_reason"],
    "kernel.attrs string value": [_call, "annotation", "kernel", "attrs", "format"],
}


@pytest.mark.parametrize("field", list(GRAPH_FREE_TEXT))
def test_code_payload_in_free_text_graph_field_stays_data(art, marker, eval_ids, tmp_path, field):
    payload = payloads(marker)[0]
    tamper(art, "graph.json", lambda g: _set(GRAPH_FREE_TEXT[field])(g, payload))
    cm = sq.load(art)
    cm(eval_ids)
    cm.graph.format()
    json.dumps(cm.report(), default=str)
    from sagequant.evaluation.html_report import write_html_report
    write_html_report(cm, tmp_path / "report", None, None)
    kept = [cm.graph.annotation(n) for n in cm.graph.annotated()]
    assert any(payload in (a.skip_reason, a.kernel.attrs.get("format")) for a in kept)  # as data
    assert not marker.exists()


# ---- structure outside the vocabulary -------------------------------------------------------------

def _swap_output(graph):
    graph["nodes"][-1], graph["nodes"][-2] = graph["nodes"][-2], graph["nodes"][-1]


def _deep(n):
    value = 1
    for _ in range(40):
        value = [value]
    n["args"] = [*n["args"], value]


STRUCTURE = {
    "format 2": (lambda g: g.update(format=2), "'format' is 2"),
    "unknown top-level field": (lambda g: g.update(code="x"), "'code'"),
    "no nodes": (lambda g: g.update(nodes=[]), "'nodes'"),
    "node not an object": (lambda g: g["nodes"].insert(1, "x"), "node #1"),
    "unknown node field": (lambda g: _call(g).update(exec="1"), "'exec'"),
    "op call_module": (lambda g: _call(g).update(op="call_module"), "'op' is 'call_module'"),
    "name a keyword": (lambda g: _call(g).update(name="lambda"), "'name'"),
    "name a dunder": (lambda g: _call(g).update(name="__class__"), "'name'"),
    "name repeated": (lambda g: _call(g).update(name=g["nodes"][0]["name"]), "repeats"),
    "name fx would rename": (lambda g: _call(g).update(name="torch"), "renamed"),
    "undeclared input": (lambda g: _placeholder(g).update(name="attention_mask", target="attention_mask"),
                         "declared model input"),
    "placeholder default": (lambda g: _placeholder(g).update(args=["x"]), "'args' must be empty"),
    "get_attr of a dunder path": (lambda g: node(g, "get_attr").update(target="model.__class__"), "'target'"),
    "get_attr of a missing tensor": (lambda g: node(g, "get_attr").update(target="model.secret"),
                                     "names no tensor"),
    "method not allowed": (lambda g: _as_method(_call(g), "numpy"), "not an allowed tensor method"),
    "python target not allowed": (lambda g: _call(g).update(target={"py": "os.system"}), "allow-list"),
    "op namespace not allowed": (lambda g: _call(g).update(target={"op": "builtins.eval.default"}),
                                 "namespace 'builtins'"),
    "op name a dunder": (lambda g: _call(g).update(target={"op": "aten.__class__.default"}), "target.op name"),
    "op not registered": (lambda g: _call(g).update(target={"op": "sagequant.marlin_w4a16.default"}),
                          "not registered"),
    "two-key target": (lambda g: _call(g).update(target={"op": "aten.add.Tensor", "py": "operator.add"}),
                       "'target'"),
    "unknown argument tag": (lambda g: _call(g)["args"].append({"code": "1"}), "tag 'code'"),
    "two-key argument": (lambda g: _call(g)["args"].append({"node": "input_ids", "tuple": []}), "exactly one key"),
    "forward reference": (lambda g: g["nodes"][1].update(args=[{"node": g["nodes"][-2]["name"]}]),
                          "not an earlier node"),
    "output not last": (_swap_output, "output"),
    "nesting too deep": (lambda g: _deep(_call(g)), "deeper than 16"),
    "integer out of range": (lambda g: _call(g)["args"].append(2 ** 70), "int64"),
    "argument of a foreign type": (lambda g: _call(g)["args"].append({"tuple": 5}), "must be a list"),
    "annotation unknown field": (lambda g: _call(g)["annotation"].update(code="1"), "annotation.code"),
    "annotation field missing": (lambda g: _call(g)["annotation"].pop("kernel"), "annotation.kernel"),
    "annotation on a get_attr": (lambda g: node(g, "get_attr").update(annotation=_call(g)["annotation"]),
                                 "only call_function"),
    "calibration record of wrong type": (
        lambda g: _call(g)["annotation"]["calibration"]["input"].update(min="0"), "input.min"),
    "calibration record extra field": (
        lambda g: _call(g)["annotation"]["calibration"]["input"].update(eval=1), "input.eval"),
    "contradictory quant spec": (lambda g: _call(g)["annotation"]["weight_spec"].update(group_size=None),
                                 "invalid quantization spec"),
    "clip ratio as text": (lambda g: _call(g)["annotation"].update(clip_ratio="1"), "clip_ratio"),
}


@pytest.mark.parametrize("case", list(STRUCTURE))
def test_graph_outside_the_vocabulary_is_refused(art, refused, case):
    edit, words = STRUCTURE[case]
    tamper(art, "graph.json", edit)
    refused("graph.json" if case != "contradictory quant spec" else "graph.json", words)


# ---- meta.json ------------------------------------------------------------------------------------

META_REFUSED = {
    "config.weight_dtype": (lambda m, v: m["config"].update(weight_dtype=v), "'config'"),
    "config.backend": (lambda m, v: m["config"].update(backend=v), "'config'"),
    "config unknown field": (lambda m, v: m["config"].update({v: 1}), "'config'"),
    "kv_plan.dtype": (lambda m, v: m["kv_plan"].update(dtype=v), "'kv_plan'"),
    "model_info.position_ids_node": (lambda m, v: m["model_info"].update(position_ids_node=v),
                                     "model_info.position_ids_node"),
    "tensor_aliases key": (lambda m, v: m["tensor_aliases"].update({v: "model.lm_head.weight"}),
                           "tensor_aliases key"),
    "tensor_aliases value": (lambda m, v: m["tensor_aliases"].update({"model.extra": v}), "tensor_aliases.model.extra"),
    "unknown top-level field": (lambda m, v: m.update({v: 1}), "is not a meta.json field"),
}


@pytest.mark.parametrize("field", list(META_REFUSED))
def test_code_payload_in_meta_string_field_is_refused(art, refused, marker, field):
    edit, words = META_REFUSED[field]
    tamper(art, "meta.json", lambda m: edit(m, payloads(marker)[len(field) % 5]))
    refused("meta.json", words)


META_FREE_TEXT = {
    "model_info.architecture": lambda m, v: m["model_info"].update(architecture=v),
    "model_info.source": lambda m, v: m["model_info"].update(source=v),
    "model_info.hf_config.model_type": lambda m, v: m["model_info"]["hf_config"].update(model_type=v),
    "config.ignore pattern": lambda m, v: m["config"].update(ignore=["lm_head", v]),
    "pass_history pass name": lambda m, v: m["pass_history"][0].update({"pass": v}),
    "report text": lambda m, v: m["report"].update(scheme=v),
    "scheduler_ir kernel": lambda m, v: m["scheduler_ir"][0].update(kernel=v),
}


@pytest.mark.parametrize("field", list(META_FREE_TEXT))
def test_code_payload_in_free_text_meta_field_stays_data(art, marker, eval_ids, field):
    payload = payloads(marker)[1]
    tamper(art, "meta.json", lambda m: META_FREE_TEXT[field](m, payload))
    cm = sq.load(art)
    cm(eval_ids)
    assert payload in json.dumps(cm.report(), default=str) + json.dumps(cm.graph.model_info) \
        or field in ("report text", "scheduler_ir kernel")  # recomputed from the graph on load
    assert not marker.exists()


META_TYPES = {
    "config not an object": (lambda m: m.update(config=[1]), "'config' must be a JSON object"),
    "config missing": (lambda m: m.pop("config"), "'config' is missing"),
    "vocab_size as text": (lambda m: m["model_info"].update(vocab_size="128"), "model_info.vocab_size"),
    "vocab_size zero": (lambda m: m["model_info"].update(vocab_size=0), "model_info.vocab_size"),
    "pass_history not a list": (lambda m: m.update(pass_history={}), "'pass_history'"),
    "pass entry without a name": (lambda m: m["pass_history"].append({"seconds": 1}), "pass_history["),
    "pass seconds as text": (lambda m: m["pass_history"][0].update(seconds="1"), "seconds"),
    "kv_plan block size": (lambda m: m["kv_plan"].update(block_size=7), "'kv_plan'"),
    "NaN smuggled as a number": (lambda m: m["model_info"].update(kv_layers=float("nan")), "meta.json"),
}


@pytest.mark.parametrize("case", list(META_TYPES))
def test_malformed_meta_is_an_artifact_error(art, refused, case):
    edit, words = META_TYPES[case]
    tamper(art, "meta.json", edit)
    refused("meta.json", words)


def test_untampered_artifact_still_round_trips(art, compiled, eval_ids):
    """The checks refuse nothing a real save writes."""
    assert torch.equal(sq.load(art)(eval_ids), compiled("llama", group_size=32)(eval_ids))
    assert isinstance(sq.load(art).graph, QuantGraph)
