"""The layout the code keeps: tests share helpers through tests/helpers.py and conftest.py (never by importing a
test file); the report reads logs without importing the monitor; the names they share live in a leaf module; the
DeltaMonitor class stays a facade."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code (lazy imports in functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_no_test_file_imports_another():
    offenders = {
        path.name: sorted(m for m in imported_modules(path) if m.split(".")[0].startswith("test_"))
        for path in (ROOT / "tests").glob("*.py")
    }
    assert not {name: mods for name, mods in offenders.items() if mods}


def test_the_report_and_the_picture_do_not_import_the_monitor():
    for name in ("report.py", "picture.py"):
        mods = imported_modules(ROOT / "torchbp" / name)
        assert not [m for m in mods if m.startswith(("torchbp.monitor", ".monitor"))], (name, sorted(mods))


def test_the_shared_names_are_a_leaf_module():
    mods = imported_modules(ROOT / "torchbp" / "names.py")
    assert not [m for m in mods if m.split(".")[0] in ("torch", "torchbp", "numpy") or m.startswith(".")], mods


def test_the_delta_monitor_class_is_a_facade_under_300_lines():
    tree = ast.parse((ROOT / "torchbp" / "monitor" / "__init__.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DeltaMonitor"]
    assert cls.end_lineno - cls.lineno + 1 < 300
