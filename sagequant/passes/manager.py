"""Pass infrastructure: a Pass is a named function graph -> PassResult; the PassManager runs an
ordered list of them with instruments around each (print IR, dump numbered IR files, time,
verify), and can stop after a named pass. Debugging lives in instruments, not in the passes."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from ..config import ConfigError, QuantConfig
from ..ir.graph import QuantGraph
from ..safe_write import IncrementalDir


@dataclass
class PassResult:
    graph: QuantGraph
    modified: bool
    stats: dict = field(default_factory=dict)  # what the pass changed, in numbers


@dataclass
class PassContext:
    """What passes share besides the graph: the config, the calibration batches, and for the
    accuracy guard the float model and the sequences held back from calibration."""

    config: QuantConfig
    calibration_batches: list | None = None
    ran: list[str] = field(default_factory=list)
    reference_model: object | None = None  # the float torch.nn.Module compiled from
    held_back_batches: list | None = None
    training: object | None = None  # QAT: qat_train.QATTraining (windows, teacher, options)
    layerwise: object | None = None  # layer-wise compile: layerwise.LayerwiseRun (weights, device, ...)


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[QuantGraph, PassContext], PassResult]
    summary: str
    requires: tuple[str, ...] = ()  # passes that must have run earlier in the pipeline
    provides: tuple[str, ...] = ()  # passes whose work this one does too (layerwise: convert, ...)

    def __call__(self, graph: QuantGraph, ctx: PassContext) -> PassResult:
        missing = [r for r in self.requires if r not in ctx.ran]
        if missing:
            raise RuntimeError(f"pass {self.name} requires {missing} to run first; ran so far: {ctx.ran}")
        return self.fn(graph, ctx)


# Every pass by name, registered in one place (passes/__init__.py) from the passes' definitions.
PASSES: dict[str, Pass] = {}


def define_pass(name: str, summary: str, requires: tuple[str, ...] = (), provides: tuple[str, ...] = ()):
    """Decorator: a function (graph, ctx) -> PassResult carries its pass metadata as
    `fn.definition`; defining a pass registers nothing."""
    def wrap(fn):
        fn.definition = Pass(name, fn, summary, requires, provides)
        return fn
    return wrap


def register_passes(*fns) -> None:
    for fn in fns:
        p = fn.definition
        if p.name in PASSES:
            raise ValueError(f"pass {p.name!r} is already registered")
        PASSES[p.name] = p


class Instrument:
    """Hooks around each pass (TVM PassInstrument / MLIR PassInstrumentation style)."""

    def should_run(self, p: Pass, ctx: PassContext) -> bool:
        return True

    def before_pass(self, p: Pass, graph: QuantGraph, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, result: PassResult, ctx: PassContext) -> None: ...


class PrintIRAfter(Instrument):
    """Print the IR after the named passes ("all" for every pass), only when the pass changed it."""

    def __init__(self, names: list[str] | str, stream: TextIO | None = None, annotated_only=False):
        self.names = [names] if isinstance(names, str) and names != "all" else names
        self.stream = stream or sys.stdout
        self.annotated_only = annotated_only

    def check_names(self, pipeline: list[str]) -> None:
        unknown = [] if self.names == "all" else [n for n in self.names if n not in pipeline]
        if unknown:
            raise ConfigError(f"print_ir_after: {', '.join(map(repr, unknown))} is not a pass of this "
                              f"pipeline; passes: {', '.join(pipeline)} (or 'all')")

    def after_pass(self, p, result, ctx):
        if (self.names == "all" or p.name in self.names) and result.modified:
            print(f"// ----- IR after {p.name} -----", file=self.stream)
            print(result.graph.format(annotated_only=self.annotated_only), file=self.stream)


class DumpIR(Instrument):
    """Write numbered IR files (001_canonicalize.txt, ...) so a diff shows what each pass did."""

    def __init__(self, directory: str | Path, overwrite: bool = False):
        self.out = IncrementalDir(directory, overwrite, what="IR dump")
        self.dir = self.out.dir
        self.index = 0

    def after_pass(self, p, result, ctx):
        self.index += 1
        self.out.write_text(f"{self.index:03d}_{p.name}.txt", result.graph.format() + "\n")


class Timing(Instrument):
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._start = 0.0

    def before_pass(self, p, graph, ctx):
        self._start = time.perf_counter()

    def after_pass(self, p, result, ctx):
        self.seconds[p.name] = self.seconds.get(p.name, 0.0) + time.perf_counter() - self._start


class PassManager:
    def __init__(self, passes: list[str | Pass], instruments: list[Instrument] | None = None,
                 verify_each: bool = True, stop_after: str | None = None):
        self.passes = [PASSES[p] if isinstance(p, str) else p for p in _known(passes)]
        names = [p.name for p in self.passes]
        if stop_after is not None and stop_after not in names:
            raise ConfigError(f"stop_after={stop_after!r} is not a pass of this pipeline; "
                              f"passes: {', '.join(names)}")
        self.instruments = list(instruments or [])
        for instrument in self.instruments:
            if isinstance(instrument, PrintIRAfter):
                instrument.check_names(names)
        self.verify_each = verify_each
        self.stop_after = stop_after
        self.timing = Timing()
        self.history: list[dict] = []

    def run(self, graph: QuantGraph, ctx: PassContext) -> QuantGraph:
        instruments = [self.timing, *self.instruments]
        for p in self.passes:
            if not all(i.should_run(p, ctx) for i in instruments):
                self.history.append({"pass": p.name, "skipped": True})
                continue
            for i in instruments:
                i.before_pass(p, graph, ctx)
            try:
                result = p(graph, ctx)
                if self.verify_each:
                    result.graph.verify()
            except Exception as e:
                # Keep the original error type; add where in the pipeline it happened.
                e.add_note(f"[sagequant] in pass '{p.name}' (after: {', '.join(ctx.ran) or 'none'})")
                raise
            ctx.ran += [p.name, *p.provides]
            for i in instruments:
                i.after_pass(p, result, ctx)
            self.history.append({"pass": p.name, "modified": result.modified,
                                 "seconds": round(self.timing.seconds[p.name], 4), "stats": result.stats})
            graph = result.graph
            if p.name == self.stop_after:
                break
        return graph


def _known(passes):
    for p in passes:
        if isinstance(p, str) and p not in PASSES:
            raise ConfigError(f"unknown pass {p!r}; known passes: {', '.join(PASSES)}")
        yield p
