"""The package's layers (docs/architecture.md): every module imports only from its own layer or
below, function-level imports included, and the import graph has no cycle. A function-level
import of a d2r module is never needed to dodge a cycle, so none is allowed; they are for the
optional dependencies."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top; a module's layer is that of its longest listed prefix.
LAYERS = [
    ["d2r.config", "d2r.registry", "d2r.files", "d2r.distributed", "d2r.version", "d2r.plugins"],
    [
        "d2r.data",
        "d2r.models",
        "d2r.losses",
        "d2r.attacks",
        "d2r.logs",
        "d2r.progress",
        "d2r.guard",
        "d2r.ema",
        "d2r.speed",
        "d2r.curves",
        "d2r.tables",
        "d2r.experiments",
        "d2r.measure",
        "d2r.flops",
        "d2r.stats",
    ],
    ["d2r.methods"],
    ["d2r.checkpoint", "d2r.weights"],
    ["d2r.runs"],
    ["d2r.trainer", "d2r.train_command"],
    ["d2r.evaluate", "d2r.evalstore", "d2r.sanity"],
    ["d2r.report", "d2r.figures", "d2r.export", "d2r.hubs"],
    ["d2r.sweep", "d2r.plan"],
    ["d2r.api"],
    ["d2r.cli", "d2r.__main__", "d2r"],
]


def module_names() -> dict[str, Path]:
    names = {}
    for path in (SRC / "d2r").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def layer_of(module: str) -> int:
    best, found = -1, None
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            hit = module == prefix or module.startswith(prefix + ".")
            if hit and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} is in no layer: add it to LAYERS and the docs"
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports(module: str, path: Path, known: set[str]) -> list[tuple[str, bool]]:
    """(imported d2r module, at function level?) for every import outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    nested = {
        id(n)
        for f in ast.walk(tree)
        if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        for n in ast.walk(f)
    }
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + [base] * bool(base))
            # `from d2r import data` imports the module d2r.data, not the package d2r
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        found += [(t, id(node) in nested) for t in targets if t in known and t != module]
    return found


def graph() -> dict[str, list[tuple[str, bool]]]:
    names = module_names()
    return {m: imports(m, p, set(names)) for m, p in names.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_import_graph_has_no_cycle():
    edges = {m: {t for t, _ in targets} for m, targets in graph().items()}
    found = cycles(edges)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_imports_only_its_own_layer_or_below():
    wrong = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in graph().items()
        for t, _ in targets
        if layer_of(t) > layer_of(m)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_function_level_import_of_d2r():
    nested = sorted({f"{m} -> {t}" for m, targets in graph().items() for t, n in targets if n})
    assert not nested, "function-level imports of d2r modules (import at the top):\n" + "\n".join(
        nested
    )


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from d2r.a import x\nfrom d2r.b import y\n", []),
        ("from d2r.a import x\n", [["d2r.a", "d2r.b"]]),
    ],
)
def test_the_cycle_finder_finds_a_cycle(source, expected, tmp_path):
    # d2r.b imports d2r.a; d2r.a imports d2r.b only in the second case
    edges = {"d2r.b": {"d2r.a"}, "d2r.a": {"d2r.b"} if expected else set()}
    assert cycles(edges) == expected


def test_the_parser_sees_function_level_and_relative_imports(tmp_path):
    package = tmp_path / "d2r" / "sub"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    path = package / "mod.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import other\n"
        "if TYPE_CHECKING:\n    from d2r import api\n"
        "def f():\n    from d2r.cli import main\n"
    )
    known = {"d2r", "d2r.sub", "d2r.sub.mod", "d2r.sub.other", "d2r.api", "d2r.cli"}
    assert sorted(imports("d2r.sub.mod", path, known)) == [
        ("d2r.cli", True),
        ("d2r.sub.other", False),
    ]
