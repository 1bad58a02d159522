"""The package's import graph keeps its architecture: imports point down the layers only, and no
two modules import each other, directly or around a circle.

Layers, bottom to top (an area may import only areas of lower layers; areas of one layer are
peers and import neither each other):

  errors, progress        the error family; progress displays and the quiet switch
  config, safe_write      the validated settings; the one writer of output paths (never
                          replaces files sagequant did not write)
  ir                      QuantGraph, specs and formats, ops, serialization (closed vocabulary)
  artifact                the artifact files (checks meta.json with ir's closed vocabulary)
  calibration, lowering   pure numerics over the IR: observers and algorithms; the kernel
                          registry and lowering helpers (unfuse)
  evaluation              measures: per-layer error, perplexity, the HTML report
  passes                  one file per pass and the pipeline driver
  backends                kernels and emitters (reference, cuda, onnxruntime, tensorrt, ...)
  runtime, frontends      generation engine; input forms (model resolution, ONNX input), which
                          drive the passes and emit through a backend
  api                     compile / CompiledModel / load
  serving, sagequant      the OpenAI-compatible server; the package's public re-exports
  tools                   the CLI only
  __main__                `python -m sagequant`

Both module-level and function-level imports count: a lazy import is still a dependency.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sagequant"

LAYERS = [
    ("errors", "progress"),
    ("config", "safe_write"),
    ("ir",),
    ("artifact",),
    ("calibration", "lowering"),
    ("evaluation",),
    ("passes",),
    ("backends",),
    ("runtime", "frontends"),
    ("api",),
    ("serving", "<package>"),
    ("tools",),
    ("__main__",),
]
LAYER_OF = {area: i for i, areas in enumerate(LAYERS) for area in areas}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported sagequant module: first line}, every import statement in the file."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    top = root.name

    def resolve(name: str) -> str:
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, dict[str, int]] = {}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = graph.setdefault(mod, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in files else source
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t == top or t.startswith(top + "."):
                    edges.setdefault(resolve(t), node.lineno)
        edges.pop(mod, None)
    return graph


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "<package>"


def layer_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for mod, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            a, b = area(mod), area(target)
            if a == b:
                continue
            if a not in LAYER_OF or b not in LAYER_OF:
                bad.append(f"{mod}:{line} -> {target}: area {a if a not in LAYER_OF else b!r} has "
                           "no layer; add it to LAYERS")
            elif LAYER_OF[b] >= LAYER_OF[a]:
                bad.append(f"{mod}:{line} -> {target}: {a} (layer {LAYER_OF[a]}) may not import "
                           f"{b} (layer {LAYER_OF[b]})")
    return bad


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_imports_point_down_the_layers():
    graph = import_graph()
    assert len(graph) > 100 and sum(map(len, graph.values())) > 300  # the walk saw the package
    assert layer_violations(graph) == []


def test_no_import_cycles():
    assert import_cycles(import_graph()) == []


def test_checks_catch_planted_violations(tmp_path):
    pkg = tmp_path / "sagequant"
    for rel, text in {
        "__init__.py": "from . import api\n",
        "api.py": "from .passes import manager\n",
        "ir/__init__.py": "",
        "ir/graph.py": "def f():\n    from ..passes.manager import Pass\n",   # lazy, upward
        "passes/__init__.py": "",
        "passes/manager.py": "from ..ir import graph\nfrom . import lower\n",
        "passes/lower.py": "from .manager import Pass\nfrom sagequant.tools import cli\n",
        "tools/__init__.py": "",
        "tools/cli.py": "import sagequant.api\n",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert graph["sagequant.ir.graph"] == {"sagequant.passes.manager": 2}
    assert graph["sagequant.passes.lower"] == {"sagequant.passes.manager": 1, "sagequant.tools.cli": 2}
    bad = layer_violations(graph)
    assert [b.split(":")[0] for b in bad] == ["sagequant.ir.graph", "sagequant.passes.lower"]
    assert f"ir (layer {LAYER_OF['ir']}) may not import passes (layer {LAYER_OF['passes']})" in bad[0]
    assert import_cycles(graph) == [
        ["sagequant.api", "sagequant.ir.graph", "sagequant.passes.lower", "sagequant.passes.manager",
         "sagequant.tools.cli"]]


@pytest.mark.parametrize("module", ["sagequant.newarea.x"])
def test_an_unplaced_area_is_reported(module):
    assert "has no layer" in layer_violations({module: {"sagequant.ir": 1}})[0]
