"""The README and the docs pages: their links resolve, code is linked by name, and the equation table leads
to the tagged line of each equation.

A code link is a Markdown link to a file or folder under ``torchbp/``. When its text is a name in backticks,
e.g. ``[`linear_backward`](torchbp/equations/dense.py)``, that name (the last part of a dotted one) must be defined
in the file (``def name`` / ``class name``), or in one of the folder's ``.py`` files; a link to a line number
(``#L123``) is refused, since lines move. Every other relative link (docs pages, pictures, scripts) must
resolve to a file or folder of the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: README length limit: a first page, depth in docs/.
README_MAX_LINES = 260

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")
_NAME = re.compile(r"^`([A-Za-z_][A-Za-z0-9_.]*)`$")
_LINE_ANCHOR = re.compile(r"#L\d+")
#: In the equation table: a link to an equation function followed by the tag of its line, e.g.
#: [`linear_backward`](torchbp/equations/dense.py) `# BP4` (a file of the torchbp/equations/ package, one per family)
_EQUATION = re.compile(r"\[`(\w+)`\]\((torchbp/equations/\w+\.py)\)\s*`(# BP[^`]*)`")


def pages(root: Path) -> list[Path]:
    """The Markdown files a reader is sent to: README.md, docs/*.md, examples/README.md."""
    found = [root / "README.md", *sorted((root / "docs").glob("*.md")), root / "examples" / "README.md"]
    return [p for p in found if p.is_file()]


def links(page: Path) -> list[tuple[str, str]]:
    """(text, target) of every Markdown link and image on a page, outside fenced code blocks."""
    return _LINK.findall(_FENCE.sub("", page.read_text(encoding="utf-8")))


def defines(path: Path, name: str) -> bool:
    """Whether ``def name`` or ``class name`` appears in the file, or in any .py file under the folder."""
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    pattern = re.compile(rf"^\s*(?:async\s+def|def|class)\s+{re.escape(name)}\b", re.M)
    return any(pattern.search(f.read_text(encoding="utf-8")) for f in files)


def broken_links(root: Path) -> list[str]:
    """One line per link that does not resolve, or whose code name is not defined where it points."""
    broken = []
    for page in pages(root):
        where = page.relative_to(root).as_posix()
        for text, target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a web address, mailto:, or an anchor on the same page
            link = f"{where}: [{text}]({target})"
            if _LINE_ANCHOR.search(target):
                broken.append(f"{link}: links to a line number; link the symbol's file and name it instead")
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            try:
                rel = path.relative_to(root.resolve()).as_posix()
            except ValueError:
                broken.append(f"{link}: points outside the repository")
                continue
            if not path.exists():
                broken.append(f"{link}: {rel} does not exist")
                continue
            name = _NAME.match(text.strip())
            if rel.split("/")[0] == "torchbp" and name and "/" not in name.group(1):
                symbol = name.group(1).split(".")[-1]
                if not defines(path, symbol):
                    broken.append(f"{link}: no `def {symbol}` or `class {symbol}` in {rel}")
    return broken


def _function_body(source: str, name: str) -> str | None:
    """The source of top-level ``def name``: from its line to the next line at column 0 that is not blank."""
    lines = source.split("\n")
    for i, line in enumerate(lines):
        if re.match(rf"def {re.escape(name)}\b", line):
            body = [line]
            for rest in lines[i + 1 :]:
                if rest and not rest[0].isspace() and not rest.startswith(")"):
                    break
                body.append(rest)
            return "\n".join(body)
    return None


def equation_links(root: Path) -> list[tuple[str, str, str]]:
    """(function, file, tag) of every equation-table link of the README."""
    return _EQUATION.findall((root / "README.md").read_text(encoding="utf-8"))


def untagged_equations(root: Path) -> list[str]:
    """One line per (function, file, tag) of the equation table whose function, in that file, has no line carrying
    that tag."""
    wrong = []
    for name, file, tag in equation_links(root):
        path = root / file
        if not path.is_file():
            wrong.append(f"`{name}`: {file} does not exist")
            continue
        body = _function_body(path.read_text(encoding="utf-8"), name)
        if body is None:
            wrong.append(f"`{name}`: no top-level `def {name}` in {file}")
        elif tag not in body:
            wrong.append(f"`{name}`: no line tagged `{tag}` in its body in {file}")
    return wrong


def test_links_resolve_and_name_defined_symbols():
    broken = broken_links(ROOT)
    assert not broken, f"{len(broken)} broken link(s) in the README and docs:\n" + "\n".join(broken)


def test_equation_table_leads_to_each_tagged_line():
    found = equation_links(ROOT)
    tags = {tag for _, _, tag in found}
    assert len(found) >= 9, f"the README's equation table lost its links to torchbp/equations/: {found}"
    for bp in ("# BP1", "# BP2", "# BP3", "# BP4"):
        assert any(t.startswith(bp) or bp[2:] in t for t in tags), f"the equation table has no `{bp}` row: {tags}"
    wrong = untagged_equations(ROOT)
    assert not wrong, "the README's equation table points at lines without their tag:\n" + "\n".join(wrong)


def test_readme_is_a_first_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines, expected at most {README_MAX_LINES}: move depth to docs/"
    )


def test_readme_speaks_of_the_library():
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages(ROOT)).lower()
    words = ("issue 6", "issue 3", "last week", "no gpu was lent", "the seeds", "seed notes", "shared/seeds")
    found = [w for w in words if w in text]
    assert not found, f"the README and docs speak of how the project is made: {found}"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = "python -m pytest -q"
    assert f'python -m pip install -e ".[test]" && {command}' in readme
    assert ci.rstrip().endswith(command)
