"""The package's layers: imports point downward only, no cycles, no private names across
modules, and function-level imports of pipeline modules only where a layer is spanned.

    core < lake < features < models < evaluation < serving, registry, monitoring
         < nightly, monitor, cli

A module may import its own sub-package and any lower layer; ``serving``, ``registry`` and
``monitoring`` share a level and none of them imports another.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
LAYERS = {
    "core": 0,
    "lake": 1,
    "features": 2,
    "models": 3,
    "evaluation": 4,
    "serving": 5,
    "registry": 5,
    "monitoring": 5,
}
TOP = 6  # pipeline/__init__.py, nightly.py, monitor.py, cli.py and the pyfunc_model shim


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return LAYERS[parts[1]], parts[1]
    return TOP, module


def _imports(path: Path) -> list[tuple[str, list[str], bool, int]]:
    """(module, imported names, at function level, line) of every ``pipeline`` import."""
    tree = ast.parse(path.read_text())
    nested = {
        id(node)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(fn)
        if node is not fn
    }
    out = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and not node.level
            and node.module.split(".")[0] == "pipeline"
        ):
            out.append((node.module, [a.name for a in node.names], id(node) in nested, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pipeline":
                    out.append((alias.name, [], id(node) in nested, node.lineno))
    return out


def _target(module: str, names: list[str]) -> list[str]:
    """The modules an import statement loads (``from pipeline.x import y`` may name a
    submodule y)."""
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs or [module]


EDGES = {
    name: [
        (target, names, nested, line)
        for module, names, nested, line in _imports(path)
        for target in _target(module, names)
    ]
    for name, path in MODULES.items()
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_downward(module):
    level, package = _layer(module)
    for target, _, _, line in EDGES[module]:
        if target == "pipeline":
            continue
        their_level, their_package = _layer(target)
        same_package = package == their_package and level < TOP
        assert same_package or their_level < level, (
            f"{module}:{line} imports {target} (layer {their_package}, level {their_level} "
            f"is not below {package}, level {level})"
        )


def test_packages_sharing_a_level_do_not_import_each_other():
    """serving, registry and monitoring sit side by side: none imports another, at the top of
    a module or inside a function (``test_imports_point_downward`` implies it; this says it)."""
    offenders = [
        f"{module}:{line} imports {target}"
        for module, edges in EDGES.items()
        for target, _, _, line in edges
        if target != "pipeline"
        and _layer(module)[1] != _layer(target)[1]
        and _layer(module)[0] == _layer(target)[0] < TOP
    ]
    assert not offenders, offenders
    assert {p for p, level in LAYERS.items() if level == LAYERS["serving"]} == {
        "serving",
        "registry",
        "monitoring",
    }


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_from_other_modules(module):
    for target, names, _, line in EDGES[module]:
        private = [n for n in names if n.startswith("_") and f"{target}.{n}" not in MODULES]
        assert target == module or not private, f"{module}:{line} imports {private} of {target}"


def test_no_import_cycles():
    graph = {m: {t for t, *_ in edges if t in MODULES and t != m} for m, edges in EDGES.items()}
    # packages import their own __init__ implicitly; ignore edges to package __init__ files
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_function_level_imports_of_pipeline_only_where_layers_meet():
    """Inside functions, pipeline modules are imported only by the modules that span layers
    (nightly, monitor, cli), or to load a heavy library late, said by a ``# lazy`` comment;
    elsewhere imports sit at the top, where they show the dependencies."""
    spanning = {"pipeline.nightly", "pipeline.monitor", "pipeline.impact", "pipeline.cli"}
    offenders = [
        f"{module}:{line} imports {target}"
        for module, edges in EDGES.items()
        if module not in spanning
        for target, _, nested, line in edges
        if nested and "# lazy" not in MODULES[module].read_text().splitlines()[line - 1]
    ]
    assert not offenders, offenders
