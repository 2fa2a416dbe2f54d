"""The house: docs/architecture.md's table of modules and what each imports is the truth, data flows
one way (no import cycle), `ops/` imports nothing else of ours and `models/` only `ops`."""

from __future__ import annotations

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "megamoe_compile"
UNITS_WITH_FILES = ("ops", "passes", "models", "decode")  # a package is one row of the table


def _unit(dotted: str) -> str:
    """The table row a module belongs to: a subpackage, or a top-level module ("" = __init__)."""
    head = dotted.split(".")[0]
    return head if head else "__init__"


def package_imports() -> dict[str, set[str]]:
    """unit -> the other units its files import (relative imports, at any depth of the file)."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        package = parts[:-1]  # the package the file's relative imports start from
        unit = _unit(".".join(parts[:-1] if is_init else parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            base = package[: len(package) - (node.level - 1)]
            targets = [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
            found.setdefault(unit, set()).update(_unit(t) for t in targets)
    return {unit: targets - {unit} for unit, targets in found.items()}


def documented_imports() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## Modules and what they import"):]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        found = re.match(r"`([\w/]+?)(?:\.py|/)`", cells[0]) if len(cells) == 3 else None
        if found:
            rows[found.group(1)] = set() if cells[2] == "-" else {c.strip() for c in cells[2].split(",")}
    return rows


def test_the_architecture_table_says_what_each_module_imports():
    assert documented_imports() == package_imports()


def test_no_import_cycle():
    graph = package_imports()
    state: dict[str, str] = {}

    def visit(unit: str, path: list[str]) -> None:
        if state.get(unit) == "done":
            return
        assert state.get(unit) != "open", f"import cycle: {' -> '.join([*path, unit])}"
        state[unit] = "open"
        for target in sorted(graph.get(unit, ())):
            visit(target, [*path, unit])
        state[unit] = "done"

    for unit in sorted(graph):
        visit(unit, [])


def test_kernels_and_model_knowledge_import_one_way():
    graph = package_imports()
    assert graph.get("ops", set()) == set()
    assert graph["models"] <= {"ops"}
    assert all(unit in ("__init__", "config", "models", "prepare", "layer_state", "experts", "backend", "explain",
                        *UNITS_WITH_FILES) for unit in graph)
