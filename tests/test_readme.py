"""The README's equation table points at the lines that implement each equation."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_equation_table_links_point_at_tagged_lines():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    source = (ROOT / "torchbp" / "functional.py").read_text(encoding="utf-8").split("\n")
    links = [int(n) for n in re.findall(r"torchbp/functional\.py#L(\d+)", readme)]
    assert len(links) >= 10, "the README lost its equation table links"
    untagged = [(n, source[n - 1].strip()) for n in links if "# BP" not in source[n - 1]]
    assert not untagged, f"README links to lines without a BP tag: {untagged}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = "python -m pytest -q"
    assert f'python -m pip install -e ".[test]" && {command}' in readme
    assert ci.rstrip().endswith(command)
