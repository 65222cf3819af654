"""The modules form a ladder: each imports alone, and no import circle exists.

Import circles hide behind import order: ``import skSAE.a`` works only because some
other module happened to import ``skSAE.b`` first. Two checks catch them: every module
is imported alone in a fresh interpreter, and a static reading of every import
statement (module level and inside functions) finds no cycle.
"""

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(importlib.util.find_spec("skSAE").origin).parent
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))


def module_name(stem):
    return "skSAE" if stem == "__init__" else f"skSAE.{stem}"


def imported_modules(source, stems):
    """skSAE modules that ``source`` imports anywhere (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level > 1:
                raise AssertionError(f"relative import beyond the package: {ast.unparse(node)}")
            parts = node.module.split(".") if node.module else []
            if node.level == 0:
                if not parts or parts[0] != "skSAE":
                    continue
                parts = parts[1:]
            if parts:  # from .x import y, from skSAE.x import y
                found.add(module_name(parts[0]))
            else:  # from . import x: a submodule, or a name of the package itself
                for alias in node.names:
                    found.add(module_name(alias.name if alias.name in stems else "__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "skSAE":
                    found.add(module_name(parts[1] if len(parts) > 1 else "__init__"))
    return found


def import_graph(package=PACKAGE):
    stems = {path.stem for path in package.glob("*.py")}
    graph = {}
    for stem in sorted(stems):
        name = module_name(stem)
        source = (package / f"{stem}.py").read_text(encoding="utf-8")
        graph[name] = imported_modules(source, stems) - {name}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for successor in sorted(graph.get(node, ())):
            if state.get(successor) == 1:
                return path[path.index(successor) :] + [successor]
            if successor not in state:
                cycle = visit(successor)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


# The public modules (and the main job). A private module's import runs the package's
# __init__ first, which imports most of them anyway; the static check below reads the
# imports of every module, private ones included.
PUBLIC = [
    module_name(stem)
    for stem in MODULES
    if not stem.startswith("_") or stem in ("__init__", "__main__")
]


@pytest.mark.parametrize("name", PUBLIC)
def test_module_imports_alone_in_a_fresh_interpreter(name):
    # __main__ runs main() only under `python -m skSAE`, not when imported by name.
    code = f"import importlib; importlib.import_module({name!r})"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"import {name} failed alone:\n{result.stderr[-3000:]}"


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_check_sees_imports_inside_functions(tmp_path):
    (tmp_path / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "a.py").write_text("from .b import f\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    graph = import_graph(tmp_path)
    assert graph["skSAE.b"] == {"skSAE.a"}
    assert find_cycle(graph) == ["skSAE.a", "skSAE.b", "skSAE.a"]
    (tmp_path / "b.py").write_text("from . import __version__\n")
    assert find_cycle(import_graph(tmp_path)) == ["skSAE", "skSAE.a", "skSAE.b", "skSAE"]


def test_array_metrics_import_no_torch():
    """The NumPy metrics stay a leaf: no torch in them or in what they import."""
    graph = import_graph()
    seen, todo = set(), ["skSAE._array_metrics"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    for name in sorted(seen):
        stem = "__init__" if name == "skSAE" else name.split(".")[1]
        tree = ast.parse((PACKAGE / f"{stem}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert "torch" not in roots, f"{name} imports torch: {ast.unparse(node)}"
    assert "skSAE" not in seen  # the package face would pull in the estimator


def test_module_map_in_the_docs_matches_the_imports():
    # docs/where_things_are.md is what a newcomer reads first: one row per module with
    # what it may import. It must name every module and exactly its skSAE imports.
    doc = (PACKAGE.parent / "docs" / "where_things_are.md").read_text(encoding="utf-8")
    documented = {}
    for line in doc.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "`module`":
            names = set()
            for part in cells[2].split(","):
                part = part.strip()
                if part.startswith("`"):
                    names.add(part.strip("`"))
            documented[cells[0].strip("`")] = names
    graph = import_graph()
    assert set(documented) == set(MODULES)
    for stem in MODULES:
        actual = {
            name.split(".")[1] if "." in name else "__init__" for name in graph[module_name(stem)]
        }
        assert actual == documented[stem], (
            f"{stem}: imports {sorted(actual)}, the map says {sorted(documented[stem])}"
        )
