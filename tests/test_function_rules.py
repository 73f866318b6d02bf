"""Short functions with few parameters: options that travel together are one object (e.g.
d2r.evaluate's EvalOptions and EvalData), not a thread of arguments. Every function in
src/d2r takes at most 8 parameters (self/cls not counted; *args and **kwargs count one each)
and spans at most 40 lines (def line to last line), except constructors, the public keyword
APIs below and the CLI's parser builders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "d2r"
MAX_PARAMETERS = 8
MAX_LINES = 40

# Constructors, the public keyword APIs d2r.evaluate and d2r_loss (their keywords are the
# documented interface), and the CLI's parser builders (one add_argument per flag).
EXEMPT = {"__init__", "evaluate", "d2r_loss", "build_parser", "add_command", "add_arguments"}

ALLOWED: set[str] = set()  # none left: a function named here must still break a rule


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + (args.vararg is not None) + (args.kwarg is not None)


def functions(path: Path, module: str):
    """(qualified name, function node) of every function, methods and nested ones included."""
    tree = ast.parse(path.read_text())

    def walk(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}.{child.name}", child
                yield from walk(child, f"{prefix}.{child.name}")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}.{child.name}")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, module)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def offenders(path: Path, module: str) -> list[str]:
    found = []
    for name, node in functions(path, module):
        if node.name in EXEMPT or name in ALLOWED:
            continue
        count, lines = parameters(node), node.end_lineno - node.lineno + 1
        if count > MAX_PARAMETERS:
            found.append(f"{name} ({path.name}:{node.lineno}) takes {count} parameters")
        if lines > MAX_LINES:
            found.append(f"{name} ({path.name}:{node.lineno}) spans {lines} lines")
    return found


def test_no_function_takes_more_than_8_parameters_or_spans_more_than_40_lines():
    found = [o for p in sorted(SRC.rglob("*.py")) for o in offenders(p, module_name(p))]
    assert not found, "group the options in a dataclass, or split the function:\n" + "\n".join(
        found
    )


def test_every_allowed_function_still_offends():
    """An allow-list entry whose function was fixed (or is gone) is removed, not kept."""
    still = set()
    for path in SRC.rglob("*.py"):
        for name, node in functions(path, module_name(path)):
            lines = node.end_lineno - node.lineno + 1
            if name in ALLOWED and (parameters(node) > MAX_PARAMETERS or lines > MAX_LINES):
                still.add(name)
    assert still == ALLOWED, f"remove from ALLOWED: {sorted(ALLOWED - still)}"


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f(a, b, c, d, e, f, g, h):\n    pass\n", []),
        ("def f(a, b, c, d, e, f, g, h, *, i):\n    pass\n", ["takes 9 parameters"]),
        ("def f(a, b, c, d, e, f, g, *args, **kwargs):\n    pass\n", ["takes 9 parameters"]),
        ("class C:\n    def m(self, a, b, c, d, e, f, g, h):\n        pass\n", []),
        ("class C:\n    def __init__(self, " + ", ".join("abcdefghij") + "):\n        pass\n", []),
        ("def f():\n" + "    x = 1\n" * 39, []),
        ("def f():\n" + "    x = 1\n" * 40, ["spans 41 lines"]),
        ("def outer():\n    def inner(a, b, c, d, e, f, g, h, i):\n        pass\n", ["takes 9"]),
    ],
)
def test_the_checker_counts_parameters_and_lines(source, expected, tmp_path):
    path = tmp_path / "d2r" / "mod.py"
    path.parent.mkdir()
    path.write_text(source)
    found = offenders(path, "d2r.mod")
    assert len(found) == len(expected) and all(
        e in o for e, o in zip(expected, found, strict=True)
    ), found
