"""PassManager: ordering, stop_after, instruments (print, dump, timing, should_run), verify_each,
requires, and errors that name the pass and the passes before it."""
import io
import warnings

import pytest

import sagequant as sq
from sagequant.ir.graph import GraphVerificationError
from sagequant.passes import (PASSES, DumpIR, Instrument, Pass, PassContext, PassManager, PassResult,
                              PrintIRAfter, Timing)
from sagequant.passes.pipeline import PTQ, PTQ_PASSES, build_pipeline

# What compile() runs for the tests' config without held-back data: the algorithm passes, mixed
# precision and the guard are not selected.
PIPELINE = build_pipeline(sq.QuantConfig(group_size=32), PTQ).names


def run(traced, passes, *, batches=None, cfg=None, **pm_kwargs):
    _, graph = traced("llama")
    pm = PassManager(passes, **pm_kwargs)
    ctx = PassContext(cfg or sq.QuantConfig(group_size=32), batches)
    return pm, ctx, pm.run(graph, ctx)


def _break_graph(graph, ctx):
    """A buggy pass: reads an attribute that does not exist."""
    out = next(n for n in graph.graph.nodes if n.op == "output")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx warns about the dangling get_attr; verify must catch it
        with graph.graph.inserting_before(out):
            graph.graph.get_attr("no_such.weight")
    return PassResult(graph, True)


BREAK = Pass("break_graph", _break_graph, "inserts a get_attr to a missing attribute")


CORE = ["canonicalize", "annotate", "insert_observers", "calibrate", "convert", "lower", "schedule"]


def test_pipeline_is_registered_in_order():
    # Algorithm passes (smoothquant, awq, gptq, ...) may sit between these; the core order holds.
    assert [p for p in PTQ_PASSES if p in CORE] == CORE
    assert PTQ_PASSES[0] == "canonicalize" and PTQ_PASSES.index("guard") > PTQ_PASSES.index("lower")
    assert len(set(PTQ_PASSES)) == len(PTQ_PASSES)
    assert set(PTQ_PASSES) <= set(PASSES)
    assert PIPELINE == CORE + ["fuse_norm_qdq"]
    for name in PTQ_PASSES:
        assert PASSES[name].name == name and PASSES[name].summary


def test_full_pipeline_ran_and_history(traced, calib_ids):
    pm, ctx, graph = run(traced, PIPELINE, batches=list(calib_ids.split(1)))
    assert ctx.ran == PIPELINE
    assert [h["pass"] for h in pm.history] == PIPELINE
    assert all(h["modified"] is True for h in pm.history if h["pass"] in CORE)
    assert set(pm.timing.seconds) == set(PIPELINE)
    assert all(s >= 0 for s in pm.timing.seconds.values())
    for h in pm.history:
        assert h["seconds"] == round(pm.timing.seconds[h["pass"]], 4)
    assert "sagequant.weight_only_linear_ref.default" in graph.op_counts()


@pytest.mark.parametrize("stop", ["canonicalize", "annotate", "convert"])
def test_stop_after(traced, stop):
    pm, ctx, graph = run(traced, PIPELINE, stop_after=stop)
    expected = PIPELINE[:PIPELINE.index(stop) + 1]
    assert ctx.ran == expected
    assert [h["pass"] for h in pm.history] == expected
    assert set(pm.timing.seconds) == set(expected)
    counts = graph.op_counts()
    assert "sagequant.weight_only_linear_ref.default" not in counts  # lower never ran
    assert ("sagequant.dequantize_weight.default" in counts) == (stop == "convert")
    assert bool(graph.annotated()) == (stop != "canonicalize")


def test_compile_stop_after(tiny):
    cm = sq.compile(tiny("llama"), sq.QuantConfig(group_size=32), stop_after="annotate")
    assert [p["pass"] for p in cm.report()["passes"]] == ["canonicalize", "annotate"]
    assert cm.kernel_bindings == {} and cm.scheduler_ir == []
    assert len(cm.graph.annotated()) == 15


def test_unknown_pass_lists_known_passes():
    with pytest.raises(ValueError) as info:
        PassManager(["canonicalize", "smoothquant_typo"])
    msg = str(info.value)
    assert "'smoothquant_typo'" in msg
    for name in PASSES:
        assert name in msg


def test_unknown_stop_after_lists_pipeline(tiny):
    with pytest.raises(ValueError) as info:
        PassManager(["canonicalize", "annotate"], stop_after="lower")
    msg = str(info.value)
    assert "stop_after='lower'" in msg and "passes: canonicalize, annotate" in msg
    with pytest.raises(ValueError, match="stop_after='nope'.*" + ", ".join(PIPELINE)):
        sq.compile(tiny("llama"), sq.QuantConfig(), stop_after="nope")


def test_print_ir_after_named_pass_only(traced):
    out = io.StringIO()
    run(traced, ["canonicalize", "annotate", "insert_observers"],
        instruments=[PrintIRAfter(["annotate"], stream=out, annotated_only=True)])
    text = out.getvalue()
    assert text.count("// ----- IR after") == 1
    assert "// ----- IR after annotate -----" in text
    assert "IR after canonicalize" not in text and "IR after insert_observers" not in text
    lines = text.strip().splitlines()[1:]
    assert len(lines) == 15  # annotated_only: one line per linear
    assert "model.layers.0.self_attn.q_proj | W4A16 w=int4/g32/sym/fp32" in text
    assert "lm_head | float (QuantConfig.ignore)" in text


def test_print_ir_all_only_when_modified(traced):
    out = io.StringIO()
    canon = PASSES["canonicalize"]
    run(traced, [canon, canon], instruments=[PrintIRAfter("all", stream=out)])
    # The second canonicalize changes nothing, so it prints nothing.
    assert out.getvalue().count("// ----- IR after canonicalize -----") == 1
    assert "sagequant.rms_norm.default" in out.getvalue()


def test_compile_print_ir_after(tiny, capsys):
    sq.compile(tiny("llama"), sq.QuantConfig(group_size=32), print_ir_after="lower")
    text = capsys.readouterr().out
    assert text.count("// ----- IR after") == 1 and "IR after lower" in text
    assert "kernel=cpu:cpu_weight_only_ref" in text


def test_dump_ir_numbered_files(traced, calib_ids, tmp_path):
    d = tmp_path / "ir"
    pm, ctx, graph = run(traced, PIPELINE, batches=list(calib_ids.split(1)), instruments=[DumpIR(d)])
    names = sorted(p.name for p in d.iterdir())
    assert names == [".sagequant-output.json"] + [f"{i + 1:03d}_{p}.txt" for i, p in enumerate(PIPELINE)]
    def dump(name):
        return (d / f"{PIPELINE.index(name) + 1:03d}_{name}.txt").read_text()
    assert dump("schedule") == graph.format() + "\n"
    canon = dump("canonicalize")
    assert "sagequant.rms_norm.default" in canon and "sq_observer" not in canon
    assert "call_module[sq_observer_0]" in dump("insert_observers")
    assert "sq_observer" not in dump("calibrate")
    assert "dequantize_weight" in dump("convert")
    assert "dequantize_weight" not in dump("lower")


def test_compile_dump_dir(tiny, tmp_path):
    sq.compile(tiny("llama"), sq.QuantConfig(group_size=32), dump_dir=tmp_path / "dump")
    dumps = sorted(p.name for p in (tmp_path / "dump").iterdir() if p.name.endswith(".txt"))
    assert dumps[0] == "001_canonicalize.txt" and len(dumps) == len(PIPELINE)
    # A second dump replaces the first one's files (listed in the marker), nothing else.
    (tmp_path / "dump" / "999_stale.txt").write_text("not ours")
    with pytest.raises(sq.ArtifactError, match="999_stale.txt"):
        sq.compile(tiny("llama"), sq.QuantConfig(group_size=32), dump_dir=tmp_path / "dump")
    sq.compile(tiny("llama"), sq.QuantConfig(weight_dtype="int8", group_size=None),
               dump_dir=tmp_path / "dump", overwrite_dump=True)
    after = sorted(p.name for p in (tmp_path / "dump").iterdir() if p.name.endswith(".txt"))
    assert after == sorted(dumps + ["999_stale.txt"])
    assert "W8A16" in (tmp_path / "dump" / "002_annotate.txt").read_text()


def test_timing_instrument_and_hook_order(traced):
    events = []

    class Recorder(Instrument):
        def before_pass(self, p, graph, ctx):
            events.append(("before", p.name, list(ctx.ran)))

        def after_pass(self, p, result, ctx):
            events.append(("after", p.name, result.modified))

    timing = Timing()
    run(traced, ["canonicalize", "annotate"], instruments=[timing, Recorder()])
    assert set(timing.seconds) == {"canonicalize", "annotate"}
    assert events == [("before", "canonicalize", []), ("after", "canonicalize", True),
                      ("before", "annotate", ["canonicalize"]), ("after", "annotate", True)]


def test_should_run_skips_and_requires_catches_it(traced):
    class SkipAnnotate(Instrument):
        def should_run(self, p, ctx):
            return p.name != "annotate"

    with pytest.raises(RuntimeError) as info:
        run(traced, ["canonicalize", "annotate", "insert_observers"], instruments=[SkipAnnotate()])
    assert "insert_observers requires ['annotate']" in str(info.value)
    assert "ran so far: ['canonicalize']" in str(info.value)
    pm = PassManager(["canonicalize", "annotate"], instruments=[SkipAnnotate()])
    ctx = PassContext(sq.QuantConfig())
    pm.run(traced("llama")[1], ctx)
    assert ctx.ran == ["canonicalize"]
    assert pm.history[1] == {"pass": "annotate", "skipped": True}


def test_verify_each_catches_broken_graph(traced):
    with pytest.raises(GraphVerificationError) as info:
        run(traced, ["canonicalize", "annotate", BREAK])
    assert "no_such" in str(info.value)
    notes = info.value.__notes__
    assert notes == ["[sagequant] in pass 'break_graph' (after: canonicalize, annotate)"]


def test_verify_each_off_lets_it_through(traced):
    _, ctx, graph = run(traced, ["canonicalize", BREAK], verify_each=False)
    assert ctx.ran == ["canonicalize", "break_graph"]
    with pytest.raises(GraphVerificationError, match="no_such"):
        graph.verify()


def test_first_pass_failure_note_says_none(traced):
    def boom(graph, ctx):
        raise KeyError("kaboom")
    with pytest.raises(KeyError) as info:  # the original error type is kept
        run(traced, [Pass("boom", boom, "raises")])
    assert info.value.__notes__ == ["[sagequant] in pass 'boom' (after: none)"]


def test_requires_enforced_for_custom_pass(traced):
    calls = []

    def fn(graph, ctx):
        calls.append(list(ctx.ran))
        return PassResult(graph, False)

    needs = Pass("needs_annotate", fn, "needs annotate", requires=("canonicalize", "annotate"))
    with pytest.raises(RuntimeError, match=r"needs_annotate requires \['annotate'\]"):
        run(traced, ["canonicalize", needs])
    assert calls == []  # the pass body never ran
    _, ctx, _ = run(traced, ["canonicalize", "annotate", needs])
    assert calls == [["canonicalize", "annotate"]] and ctx.ran[-1] == "needs_annotate"


@pytest.mark.parametrize("name, needs", [("annotate", "canonicalize"), ("insert_observers", "annotate"),
                                         ("calibrate", "insert_observers"), ("convert", "annotate"),
                                         ("lower", "convert"), ("schedule", "lower")])
def test_pipeline_requires(name, needs):
    assert needs in PASSES[name].requires
