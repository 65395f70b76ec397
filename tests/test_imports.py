"""The house has floors: no module imports, directly or through others, a module that imports it.

Every ``import`` in the project's packages counts, including those inside functions (an import inside a
function hides a circle from Python's import machinery, not from a reader). A circle found is reported
with its modules, e.g. ``ref_bert.model -> ref_bert.hf -> ref_bert.model``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("backends", "ref_bert", "gradcheck", "benchmarks")


def module_files() -> dict:
    """Module name -> source file, for every .py file of the project's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(files: dict) -> dict:
    """Module -> the set of project modules it imports anywhere in its source."""
    graph = {}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                # "from pkg import sub" imports the submodule pkg.sub when there is one, else a name of pkg
                subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in files]
                names = subs if len(subs) == len(node.names) else subs + [base]
            for name in names:
                # the innermost project module the name falls in
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def find_cycles(graph: dict) -> list:
    """Strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = find_cycles(import_graph(module_files()))
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph(module_files())
    graph["ref_bert.model"] = set(graph["ref_bert.model"]) | {"ref_bert.checkpoint"}   # checkpoint imports model
    assert ["ref_bert.checkpoint", "ref_bert.model"] in find_cycles(graph)


def test_import_graph_sees_imports_inside_functions(tmp_path):
    graph = import_graph(module_files())
    # ref_bert.cli imports its subcommand modules by name at run time, not by import statements;
    # every statically written import, at module level or inside a function, is an edge.
    assert "ref_bert.hf" in graph["ref_bert.model"]
    assert "ref_bert.model" in graph["ref_bert.checkpoint"]
    assert "backends" in graph["ref_bert.ops.attention"]


@pytest.mark.parametrize("module", ["ref_bert.model", "ref_bert.encoder", "ref_bert.ops", "ref_bert.hf",
                                    "ref_bert.files"])
def test_lower_floors_do_not_import_the_layers_above(module):
    """The model and everything below it know nothing of checkpoints directories, training, golden
    files, verification, the command line or the benchmarks."""
    graph = import_graph(module_files())
    above = {"ref_bert.checkpoint", "ref_bert.golden", "ref_bert.verify", "ref_bert.cli",
             "ref_bert.pretrain", "benchmarks", "gradcheck"}

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for w in graph.get(todo.pop(), ()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    reached = {m for m in reachable(module) if m in above or m.split(".")[0] in above
               or any(m.startswith(a + ".") for a in above)}
    assert not reached, f"{module} reaches {sorted(reached)}"
