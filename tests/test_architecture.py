"""The package's structure: imports go one way, and the layers are pure.

docs/architecture.md describes the modules in the order of `LAYERS`; each
module may import only the modules before it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "stopgrad_lr"
ARCHITECTURE = PACKAGE.parent / "docs" / "architecture.md"
# Bottom to top. `__init__` only re-exports (its imports are lazy) and `cli`
# uses the public names.
LAYERS = [
    "_validation",
    "_patterns",
    "_optimizer_kinds",
    "_ops",
    "_layers",
    "_graph",
    "_analysis",
    "_surgery",
    "_variables",
    "_check",
    "_per_variable",
    "_reparam",
    "_freeze",
    "_multi_optimizer",
    "_rewrite",
    "_callbacks",
    "_schedules",
    "_lr_finder",
    "_plot",
    "__init__",
    "cli",
    "__main__",
]


def package_imports(module: str) -> set[str]:
    """The package modules that `module` imports anywhere."""
    return imports_in((PACKAGE / f"{module}.py").read_text()) - {module}


def imports_in(source: str) -> set[str]:
    """The package modules that `source` imports: at the top, inside
    functions, for type checking only, or by name with importlib."""
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
            if node.module == "stopgrad_lr":
                names = [f"stopgrad_lr.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(r"stopgrad_lr\.\w+", node.value)
        ):
            names = [node.value]  # importlib.import_module("stopgrad_lr._x")
        else:
            continue
        for name in names:
            if name == "stopgrad_lr":
                found.add("__init__")
            elif name.startswith("stopgrad_lr."):
                part = name.split(".")[1]
                # `from stopgrad_lr import summary` goes through __init__.
                found.add(part if (PACKAGE / f"{part}.py").exists() else "__init__")
    return found


def test_every_module_is_placed():
    modules = sorted(path.stem for path in PACKAGE.glob("*.py"))
    assert sorted(LAYERS) == modules


def test_modules_import_only_the_modules_below_them():
    wrong = []
    for position, module in enumerate(LAYERS):
        for imported in package_imports(module):
            if LAYERS.index(imported) > position and module != "__init__":
                wrong.append(f"{module} imports {imported}")
    assert not wrong


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (module -> the modules it imports), or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return [*path, module, imported]
            if imported not in state:
                cycle = visit(imported, [*path, module])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    # Independent of LAYERS: a search over what the files say.
    assert find_cycle({module: package_imports(module) for module in LAYERS}) is None


def test_the_cycle_search_finds_cycles():
    # The cycle this layout removed: _layers -> _optimizers -> _reparam ->
    # _surgery -> _layers.
    graph = {
        "_layers": {"_optimizers"},
        "_optimizers": {"_reparam"},
        "_reparam": {"_surgery"},
        "_surgery": {"_layers"},
    }
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[-1] in cycle[:-1]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    # An import inside a function counts, and one by name.
    lazy = "def f():\n    from stopgrad_lr._check import check_optimizer\n"
    assert imports_in(lazy) == {"_check"}
    assert imports_in("importlib.import_module('stopgrad_lr._plot')") == {"_plot"}
    assert imports_in("from stopgrad_lr import summary") == {"__init__"}


def test_the_architecture_page_lists_the_modules_in_order():
    listed = re.findall(r"^\| `(\w+)` \|", ARCHITECTURE.read_text(), re.M)
    assert listed == [m for m in LAYERS if m not in ("__init__", "__main__")]


def test_the_layers_are_pure():
    # A layer's call does only its arithmetic: no stack walks, no threads,
    # no import of the modules that check optimizers.
    imports = package_imports("_layers")
    assert imports <= {"_ops", "_validation", "_optimizer_kinds"}
    tree = ast.parse((PACKAGE / "_layers.py").read_text())
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not modules & {"inspect", "threading", "sys", "traceback"}
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == "call"
    ]
    # GradientScale's (GradientReversal inherits it), GradientStop's and
    # ParameterScale's: each a single return statement.
    assert len(calls) == 3
    for function in calls:
        statements = [s for s in function.body if not isinstance(s, ast.Expr)]
        assert len(statements) == 1 and isinstance(statements[0], ast.Return)
