"""The import layering of fasttune, checked from the source text alone (pure ``ast``, nothing imported).

A *unit* is a top-level module (``fasttune.config``, ``fasttune.cli``, ...) or a top-level subpackage
with all of its modules (``fasttune.data`` = ``fasttune/data/**``); ``fasttune/__init__.py`` is the
unit ``fasttune``, ``fasttune/__main__.py`` the unit ``__main__``. LAYERS names units without the
``fasttune.`` prefix, lowest first: core (errors, files, config and recipe values, hub, run folders),
stations (the steps of a run and their reports), entry (CLI, ``python -m``, the package's re-export of
FastLanguageModel, bench). Rules, one test each: (1) every unit found is in exactly one layer, so a
new top-level module is placed deliberately (listed units that do not exist yet are fine); (2) no
import points up: core -> core, stations -> stations/core, entry -> anything; (3) units import each
other without cycles; (4) so do the modules of one unit (a package ``__init__`` importing its own
submodule is an edge from the package to it). Every import counts: module level, in functions, under
``if TYPE_CHECKING:``, in try/except; ``import fasttune.x.y``, ``from fasttune.x import y`` and
relative ``from .z import w``. ``from fasttune.data import rows`` is an edge to the module
``fasttune.data.rows`` if it exists, else to ``fasttune.data``. ``importlib`` calls are not seen.
"""
import ast
from collections import defaultdict, deque
from functools import cache
from pathlib import Path

import pytest

LAYERS = {
    "core": ("errors", "atomic_io", "coercion", "value_rules", "recipes", "config", "families",
             "tasks", "output_paths", "disk", "hub", "run_folder", "gguf_types", "architectures"),
    "stations": ("machine", "binding", "prepare", "dry_run", "inspect_data", "doctor", "report", "data", "model",
                 "train", "export", "hooks", "inference", "memory"),
    "entry": ("cli", "__main__", "fasttune", "side_by_side", "unsloth_api"),  # "fasttune" = the package's own __init__.py
}
PACKAGE = Path(__file__).resolve().parents[1] / "fasttune"


@cache
def scan(root: Path, pkg: str):
    """Modules under ``root`` (the folder of package ``pkg``) as {dotted name: file}, and every import
    of the package as edges (importing module, imported module, "file.py:LINE")."""
    modules, edges = {}, []
    for path in sorted(root.rglob("*.py")):
        parts = [pkg, *path.relative_to(root).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for src, path in modules.items():
        here = src.split(".") if path.name == "__init__.py" else src.split(".")[:-1]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:  # relative: level 1 is this package, 2 its parent
                base = ".".join((here[: len(here) + 1 - node.level] if node.level else [])
                                + (node.module.split(".") if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            where = f"{path.relative_to(root.parent).as_posix()}:{node.lineno}"
            edges += [(src, t, where) for t in dict.fromkeys(targets) if t == pkg or t.startswith(pkg + ".")]
    return modules, edges


def unit_of(module: str, pkg: str) -> str:
    return module.split(".")[1] if "." in module else pkg


def unplaced_units(root: Path, pkg: str, layers: dict) -> list:
    """Rule 1: every unit found under ``root`` is in exactly one layer."""
    found = {}
    for module, path in scan(root, pkg)[0].items():
        found.setdefault(unit_of(module, pkg), path.relative_to(root.parent).as_posix())
    homes = {unit: [layer for layer, units in layers.items() if unit in units] for unit in found}
    return [f"{found[unit]}: unit {unit} is in {len(homes[unit])} layers {homes[unit]}, needs exactly 1"
            for unit in sorted(found) if len(homes[unit]) != 1]


def upward_imports(root: Path, pkg: str, layers: dict) -> list:
    """Rule 2: an import never goes from a lower layer to a higher one."""
    rank = {unit: (i, layer) for i, (layer, units) in enumerate(layers.items()) for unit in units}
    edges = [(where, dst, unit_of(src, pkg), unit_of(dst, pkg)) for src, dst, where in scan(root, pkg)[1]]
    return [f"{where} imports {dst} (unit {a}, layer {rank[a][1]} -> unit {b}, layer {rank[b][1]})"
            for where, dst, a, b in edges if a in rank and b in rank and rank[a] < rank[b]]


def strongly_connected(graph: dict) -> list:
    """Tarjan's algorithm: the strongly connected components of {node: set of successors}."""
    index, low, stack, found = {}, {}, [], []
    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while v not in component:
                component.add(stack.pop())
            found.append(component)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycles(root: Path, pkg: str, inside_units: bool) -> list:
    """Each strongly connected component of more than one node (units, or modules of the same unit),
    as the shortest cycle through each of its edges, so that every edge that closes a cycle is named,
    each edge with one example file:line."""
    examples, graph, problems = defaultdict(list), {}, []
    for src, dst, where in scan(root, pkg)[1]:
        a, b = (src, dst) if inside_units else (unit_of(src, pkg), unit_of(dst, pkg))
        if a != b and (unit_of(src, pkg) == unit_of(dst, pkg)) == inside_units:
            examples[a, b].append(where)
            graph.setdefault(a, set()).add(b)
    for component in (c for c in strongly_connected(graph) if len(c) > 1):
        found, lines = [], [f"cycle among {', '.join(sorted(component))}:"]
        for a, b in sorted(edge for edge in examples if {*edge} <= component):
            paths, todo = {b: [b]}, deque([b])  # breadth first: the shortest path b ~> a
            while a not in paths:
                v = todo.popleft()
                for w in sorted(graph.get(v, set()) - paths.keys()):
                    paths[w] = paths[v] + [w]
                    todo.append(w)
            cycle = [a] + paths[a][:-1]
            cycle = cycle[cycle.index(min(cycle)):] + cycle[: cycle.index(min(cycle))]
            if cycle not in found:
                found.append(cycle)
                lines.append("  " + " -> ".join(cycle + cycle[:1]))
                for x, y in zip(cycle, cycle[1:] + cycle[:1]):
                    more = f" (+{len(examples[x, y]) - 1} more)" if len(examples[x, y]) > 1 else ""
                    lines.append(f"      {x} -> {y}: {examples[x, y][0]}{more}")
        problems.append("\n".join(lines))
    return problems


def unit_cycles(root: Path, pkg: str, layers: dict) -> list:
    """Rule 3: the graph of units (edges between different units) has no cycle."""
    return cycles(root, pkg, inside_units=False)


def module_cycles(root: Path, pkg: str, layers: dict) -> list:
    """Rule 4: inside each unit, the graph of its modules has no cycle."""
    return cycles(root, pkg, inside_units=True)


def check_fasttune(check, title):  # the real package, with a readable failure
    if problems := check(PACKAGE, "fasttune", LAYERS):
        pytest.fail(f"{title} ({len(problems)}):\n" + "\n".join(problems), pytrace=False)


def test_every_unit_is_in_exactly_one_layer():
    check_fasttune(unplaced_units, "units to place in exactly one layer of LAYERS")


def test_no_import_points_up_a_layer():
    check_fasttune(upward_imports, "imports pointing up a layer")


def test_units_are_acyclic():
    check_fasttune(unit_cycles, "import cycles between units")


def test_modules_inside_a_unit_are_acyclic():
    check_fasttune(module_cycles, "import cycles between modules of one unit")


FAKE_LAYERS = {"core": ("core_a", "x", "y"), "entry": ("entry_b", "sub", "pkg")}


def fake_package(tmp_path: Path, files: dict) -> Path:
    for name, text in {"__init__.py": "", **files}.items():
        (tmp_path / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / name).write_text(text)
    return tmp_path / "pkg"


def test_checkers_catch_upward_imports_cycles_and_unplaced_units(tmp_path):
    root = fake_package(tmp_path, {
        "core_a.py": "def f():\n    import pkg.entry_b\n", "stray.py": "", "x.py": "from .y import thing\n",
        "entry_b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import core_a\n",
        "y.py": "try:\n    from . import x\nexcept ImportError:\n    pass\nthing = 1\n",
        "sub/__init__.py": "from .p import a\n", "sub/p.py": "from pkg.sub import q\na = 1\n",
        "sub/q.py": "def g():\n    from .. import sub\n",
    })
    assert unplaced_units(root, "pkg", {**FAKE_LAYERS, "extra": ("x",)}) == [
        "pkg/stray.py: unit stray is in 0 layers [], needs exactly 1",
        "pkg/x.py: unit x is in 2 layers ['core', 'extra'], needs exactly 1"]
    assert upward_imports(root, "pkg", FAKE_LAYERS) == [
        "pkg/core_a.py:2 imports pkg.entry_b (unit core_a, layer core -> unit entry_b, layer entry)"]
    units = "\n".join(unit_cycles(root, "pkg", FAKE_LAYERS))
    assert "core_a -> entry_b -> core_a" in units and "entry_b -> core_a: pkg/entry_b.py:3" in units
    assert "x -> y -> x" in units and "y -> x: pkg/y.py:2" in units and "x -> y: pkg/x.py:1" in units
    modules = "\n".join(module_cycles(root, "pkg", FAKE_LAYERS))
    assert "pkg.sub -> pkg.sub.p -> pkg.sub.q -> pkg.sub" in modules and "pkg.sub.q -> pkg.sub: pkg/sub/q.py:2" in modules


def test_checkers_pass_a_clean_package(tmp_path):
    root = fake_package(tmp_path, {"core_a.py": "import os\n", "x.py": "from . import core_a\nfrom .core_a import os\n",
                                   "entry_b.py": "def main():\n    import pkg.x\n    from pkg.sub import p\n",
                                   "sub/__init__.py": "from . import p\n", "sub/p.py": "from ..x import core_a\n"})
    for check in (unplaced_units, upward_imports, unit_cycles, module_cycles):
        assert check(root, "pkg", FAKE_LAYERS) == [], check.__name__
