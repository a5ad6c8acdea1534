"""The package's shape: no import cycle, no module over 600 lines, no function over 80 lines.

Static (ast over ``specfed_flwr/``), so it costs nothing and catches a cycle even where a lazy
import inside a function hides it at import time. Every exception is listed with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "specfed_flwr"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

#: module (relative to specfed_flwr/) -> why it may exceed MAX_MODULE_LINES
LONG_MODULES: dict[str, str] = {}

#: "module:function" -> why it may exceed MAX_FUNCTION_LINES
LONG_FUNCTIONS: dict[str, str] = {}

#: import edges a lazy import inside a function may keep, with why (none: fix the cycle instead)
ALLOWED_CYCLE_EDGES: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom | ast.Import, known: set[str]) -> set[str]:
    """The package modules an import statement loads (``from . import x`` counts ``x`` when it is one)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".") if module else []
            base = base if is_package else base[:-1]
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            if not (node.module or "").startswith("specfed_flwr"):
                return set()
            prefix = node.module.removeprefix("specfed_flwr").lstrip(".")
        names = [prefix] + [f"{prefix}.{a.name}".lstrip(".") for a in node.names]
    out = set()
    for name in names:
        name = name.removeprefix("specfed_flwr").lstrip(".") if name.startswith("specfed_flwr") else name
        if name in known:
            out.add(name)
    return out


def _type_only(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks: annotations only, never run."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports when it runs (lazy imports inside functions
    included; ``if TYPE_CHECKING:`` imports left out, as they never execute)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        tree = ast.parse(path.read_text())
        skip = _type_only(tree)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
                deps |= _resolve(name, path.name == "__init__.py", node, known)
        graph[name] = {d for d in deps if d not in (name, "")}  # "": the package's own __init__
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    for (a, b) in ALLOWED_CYCLE_EDGES:
        graph.get(a, set()).discard(b)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    graph = import_graph()
    assert "coordinator" in graph.get("inprocess", set())
    assert "faults" in graph["wire_base"]  # relative imports are resolved
    assert {"wire_base", "wire_fixed", "wire_variable"} <= graph["wire"]


def _long_functions(path: Path) -> list[tuple[str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = node.end_lineno - start + 1
            if length > MAX_FUNCTION_LINES:
                out.append((node.name, length))
    return out


def test_no_module_is_over_600_lines_unless_listed():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and rel not in LONG_MODULES:
            too_long.append(f"{rel}: {lines} lines")
    assert not too_long, too_long
    stale = [m for m in LONG_MODULES if not (PACKAGE / m).exists()
             or len((PACKAGE / m).read_text().splitlines()) <= MAX_MODULE_LINES]
    assert not stale, f"listed as long but no longer are (drop them from LONG_MODULES): {stale}"


def test_no_function_is_over_80_lines_unless_listed():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for name, length in _long_functions(path):
            if f"{rel}:{name}" not in LONG_FUNCTIONS and f"{rel}:*" not in LONG_FUNCTIONS:
                too_long.append(f"{rel}:{name}: {length} lines")
    assert not too_long, too_long
