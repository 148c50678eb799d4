"""The shape rules of the package, checked on every run: modules and functions a reader can hold in mind, an
import graph without cycles or reaches into another package's private names, and no lab notebook (dates, speed
figures) in the source: measured figures live in docs/benchmarks."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "slm_export"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods[".".join(parts)] = path
    return mods


def test_no_module_over_400_lines() -> None:
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_function_over_60_lines() -> None:
    long = []
    for mod, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                size = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if size > MAX_FUNCTION_LINES:
                    long.append(f"{mod}.{node.name}: {size}")
    assert not long, long


def _imports(mod: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken) for every import in the file, function-level ones included."""
    out = []
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names in _imports(mod, path):
            if not target.startswith("slm_export"):
                continue
            for name in names or [""]:
                full = f"{target}.{name}" if name and f"{target}.{name}" in mods else target
                while full not in mods and "." in full:
                    full = full.rsplit(".", 1)[0]
                if full in mods and full != mod:
                    graph[mod].add(full)
    return graph


def test_import_graph_has_no_cycle() -> None:
    graph = _graph()
    # A package's __init__ re-exporting its own modules is not a cycle between parts: drop package -> own child.
    for mod in graph:
        graph[mod] = {t for t in graph[mod] if not t.startswith(mod + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])
    assert not cycles, cycles[:5]


def _package_of(mod: str) -> str:
    parts = mod.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else "slm_export"


@pytest.mark.parametrize("where", ["slm_export", "scripts"])
def test_no_private_name_imported_across_packages(where: str) -> None:
    files = _modules() if where == "slm_export" else {f"scripts.{p.stem}": p for p in (ROOT / "scripts").glob("*.py")}
    bad = []
    for mod, path in files.items():
        for target, names in _imports(mod, path):
            if not target.startswith("slm_export"):
                continue
            for name in names:
                if name.startswith("_") and (where == "scripts" or _package_of(target) != _package_of(mod)):
                    bad.append(f"{mod}: from {target} import {name}")
    assert not bad, bad


DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
SPEED = re.compile(r"\d[\d.,]*\s*(tok/s|tokens/s|tokens per second)")


def test_no_dates_or_speed_figures_in_the_package() -> None:
    found = []
    for path in sorted([*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.toml")]):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if DATE.search(line) or SPEED.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, found
