"""docs/architecture.md stays the design document the code points to.

- It has exactly the thirteen numbered sections, in order.
- Every ``docs/architecture.md §N`` in the code, the tests, the bench and README.md names a
  section that exists.
- Nothing cites the design note that lives outside the repository ("DESIGN §").
- Its layer table (§2) places every top-level module and package of mlxgrpo/, and lists the
  same layers, in the same order, as tests/test_layers.py checks.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from test_layers import LAYERS

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
SCANNED = ("mlxgrpo", "tests", "bench")
SKIPPED_DIRS = {"__pycache__", ".pytest_cache"}

SECTIONS = (
    "What mlxgrpo is",
    "Layers and what each may import",
    "One update, step by step",
    "GRPO math",
    "Memory techniques",
    "Generation",
    "Distributed training",
    "Platform: BLAS, devices and dtypes",
    "Run directory and checkpoints",
    "Configuration",
    "Rewards and data",
    "Conventions",
    "Performance harness",
)

HEADING = re.compile(r"^(#{2,4}) (\d+(?:\.\d+)*)\. (.+?)\s*$")
# "docs/architecture.md §5", "docs/architecture.md §4, §5", "docs/architecture.md §2 and §12"
REFERENCE = re.compile(r"docs/architecture\.md((?:\s*(?:,|and)?\s*§\s*\d+(?:\.\d+)*)+)")
NUMBER = re.compile(r"§\s*(\d+(?:\.\d+)*)")
OLD_CITATION = "DESIGN" + " §"  # split so this file does not cite it either


def doc_lines() -> list[str]:
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing"
    return DOC.read_text(encoding="utf-8").splitlines()


@cache
def headings() -> dict[str, tuple[int, str, int]]:
    """Section number -> (heading level, title, line)."""
    found = {}
    for number, line in enumerate(doc_lines(), start=1):
        match = HEADING.match(line)
        if match:
            level, section, title = match.groups()
            found[section] = (len(level), title, number)
    return found


def text_files() -> Iterator[Path]:
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and not SKIPPED_DIRS.intersection(path.parts):
                yield path
    yield ROOT / "README.md"


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None  # binary files hold no references


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def test_the_thirteen_sections():
    top = [(int(n), title, line) for n, (level, title, line) in headings().items() if level == 2]
    got = [(n, title) for n, title, _ in top]
    want = list(enumerate(SECTIONS, start=1))
    problems = [
        f"docs/architecture.md:{line}: section {n}. {title!r} (expected: "
        + (f"{n}. {SECTIONS[n - 1]!r})" if n <= len(SECTIONS) else "no such section)")
        for n, title, line in top
        if (n, title) not in want
    ]
    problems += [
        f"docs/architecture.md: section '## {n}. {title}' is missing"
        for n, title in want
        if (n, title) not in got
    ]
    assert not problems, "\n".join(problems)
    assert [n for n, _, _ in top] == sorted(n for n, _, _ in top), "sections are out of order"


def test_references_name_existing_sections():
    problems = []
    for path in text_files():
        text = read_text(path)
        if text is None or "architecture.md" not in text:
            continue
        for match in REFERENCE.finditer(text):
            for number in NUMBER.findall(match.group(1)):
                if number not in headings():
                    where = f"{path.relative_to(ROOT)}:{line_of(text, match.start())}"
                    problems.append(
                        f"{where}: docs/architecture.md §{number} does not exist (the document's "
                        f"sections: {', '.join(sorted(headings(), key=_numeric))})"
                    )
    assert not problems, "\n".join(problems)


def test_the_document_refers_to_its_own_sections():
    problems = [
        f"docs/architecture.md:{number}: §{ref} does not exist"
        for number, line in enumerate(doc_lines(), start=1)
        for ref in NUMBER.findall(line)
        if ref not in headings()
    ]
    assert not problems, "\n".join(problems)


def _numeric(section: str) -> tuple[int, ...]:
    return tuple(int(p) for p in section.split("."))


def test_nothing_cites_the_outside_design_note():
    this = Path(__file__).resolve()
    problems = []
    for path in text_files():
        if path.resolve() == this:
            continue
        text = read_text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if OLD_CITATION in line:
                problems.append(
                    f"{path.relative_to(ROOT)}:{number}: cites {OLD_CITATION!r}, a document "
                    "outside the repository; point to docs/architecture.md §N instead"
                )
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- the layer table


def layer_table() -> list[tuple[int, list[str], int]]:
    """(layer number, module names, line) of each row of the table in section 2."""
    lines = doc_lines()
    start = headings()["2"][2]
    end = headings()["3"][2] if "3" in headings() else len(lines)
    rows = []
    for number in range(start, end - 1):
        cells = [c.strip() for c in lines[number].strip().strip("|").split("|")]
        if lines[number].lstrip().startswith("|") and cells and cells[0].isdigit():
            names = re.findall(r"`(mlxgrpo(?:\.[A-Za-z_][A-Za-z0-9_]*)*)`", cells[1])
            rows.append((int(cells[0]), names, number + 1))
    return rows


def top_level_entries() -> Iterator[tuple[str, str]]:
    """(dotted name, path) of every module and package that must have a row: the package's
    own __init__ and __main__, each top-level module and package, and each package of a
    package that has no code of its own (mlxgrpo.engine's rooms)."""
    package = ROOT / "mlxgrpo"
    for path in sorted(package.iterdir()):
        if path.name in SKIPPED_DIRS or path.name.startswith("."):
            continue
        if path.is_dir() and (path / "__init__.py").is_file():
            init = (path / "__init__.py").read_text(encoding="utf-8")
            if _is_container(init):
                for sub in sorted(path.iterdir()):
                    if sub.is_dir() and (sub / "__init__.py").is_file():
                        yield f"mlxgrpo.{path.name}.{sub.name}", str(sub.relative_to(ROOT))
            else:
                yield f"mlxgrpo.{path.name}", str(path.relative_to(ROOT))
        elif path.suffix == ".py":
            name = "mlxgrpo" if path.stem == "__init__" else f"mlxgrpo.{path.stem}"
            yield name, str(path.relative_to(ROOT))


def _is_container(init: str) -> bool:
    """An __init__ with no statements (a docstring at most) only groups its subpackages."""
    import ast

    body = ast.parse(init).body
    return all(isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) for s in body)


def test_the_layer_table_places_every_module():
    listed = {name for _, names, _ in layer_table() for name in names}
    assert listed, "docs/architecture.md §2 has no layer table (rows '| N | `mlxgrpo.x` | ...')"
    problems = [
        f"{path}: {name} is not in the layer table of docs/architecture.md §2 (place it there and "
        "in tests/test_layers.py LAYERS)"
        for name, path in top_level_entries()
        if name not in listed
    ]
    assert not problems, "\n".join(problems)


def test_the_layer_table_matches_the_checked_layers():
    rows = layer_table()
    problems = []
    for index, entries in enumerate(LAYERS, start=1):
        row = [r for r in rows if r[0] == index]
        if not row:
            names = ", ".join(entries)
            problems.append(f"docs/architecture.md: layer {index} ({names}) has no row")
        elif sorted(row[0][1]) != sorted(entries):
            problems.append(
                f"docs/architecture.md:{row[0][2]}: layer {index} lists {row[0][1]}, "
                f"tests/test_layers.py LAYERS has {list(entries)}"
            )
    problems += [
        f"docs/architecture.md:{line}: layer {n} is not in tests/test_layers.py LAYERS"
        for n, _, line in rows
        if not 1 <= n <= len(LAYERS)
    ]
    assert not problems, "\n".join(problems)
