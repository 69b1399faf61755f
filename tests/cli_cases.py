"""The harness of the table-driven bad-input tests (test_bad_inputs*.py): a case is an argv
(with `{tmp}`, `{model}` and `{adapters}` filled in), the files it writes first, the exit code
and a substring the error line must contain. The checks are the same for all: a non-zero
exit, the substring on the error line, one error line (an optional `hint:` line, and Click's
`Usage:` framing for usage errors, may come with it), no traceback and no "unexpected error"
line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import run_subprocess

MODEL = "builtin:tiny-qwen2"

Setup = Callable[[Path, "Assets"], None]


@dataclass(frozen=True)
class Assets:
    model: Path  # a pristine copy of the tiny model (never modified by a case)
    adapters: Path  # LoRA adapters that fit it


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    code: int
    expect: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    setup: Setup | None = None
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False  # a fresh `python -m mlxgrpo` where the process state matters
    runs: bool = False  # training starts (its banner and tables come first), then fails


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Assets:
    """The tiny model on disk, and LoRA adapters that fit it (built once for the module)."""
    from random_models import add_random_adapters

    from mlxgrpo.models.builtin import build_tiny_model
    from mlxgrpo.models.loading import load_model

    root = tmp_path_factory.mktemp("bad-inputs-assets")
    model_dir = build_tiny_model(root / "model", MODEL)
    model, _ = load_model(str(model_dir))
    add_random_adapters(model, root / "adapters", seed=0)
    return Assets(model=model_dir, adapters=root / "adapters")


# Click's usage framing around its one `Error:` line.
_FRAMING = re.compile(r"^(Usage: |Try '.*' for help\.$)")


def error_lines(stderr: str) -> list[str]:
    """The lines of `stderr` that are the error itself (not hints or usage framing)."""
    lines = [line.rstrip() for line in stderr.splitlines() if line.strip()]
    return [line for line in lines if not _FRAMING.match(line) and not line.startswith("hint:")]


def check_one_line_error(case: Case, code: int, stderr: str) -> None:
    shown = f"[{case.id}] exit {code}, stderr:\n{stderr}"
    assert code != 0 and code == case.code, shown
    assert "Traceback" not in stderr, shown
    # (a parser's own words may say "unexpected '}'": what must not appear is our fallback)
    assert "unexpected error" not in stderr.lower(), shown
    assert "unexpected input" not in stderr.lower(), shown
    assert "this is a bug in mlxgrpo" not in stderr, shown
    lines = error_lines(stderr)
    if case.runs:  # the run's own output first; the error is its last line
        assert sum(line.lower().startswith("error:") for line in lines) == 1, shown
        lines = lines[-1:]
    assert len(lines) == 1, shown
    assert lines[0].lower().startswith("error:"), shown
    assert case.expect in lines[0], shown


def table_params(groups: dict[str, list[Case]]) -> list:
    """The cases of ``groups`` (name -> cases) as pytest params with ids ``group:case``."""
    return [pytest.param(case, id=f"{group}:{case.id}") for group, cases in groups.items()
            for case in cases]  # fmt: skip


def check_table(groups: dict[str, list[Case]], taken: set[str] = frozenset()) -> None:
    """A table has at least 60 cases with unique ids (none of them in ``taken``) and at least
    3 in each group."""
    ids = [case.id for cases in groups.values() for case in cases]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    assert not set(ids) & set(taken)
    assert all(len(cases) >= 3 for cases in groups.values())


def fill(text: str, tmp: Path, assets: Assets) -> str:
    return (
        text.replace("{tmp}", str(tmp))
        .replace("{model}", str(assets.model))
        .replace("{adapters}", str(assets.adapters))
    )


def run_case(case: Case, cli, tmp_path: Path, assets: Assets, monkeypatch) -> None:
    """Write the case's files, run its setup and argv, and check the one-line contract."""
    for name, content in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    argv = [fill(arg, tmp_path, assets) for arg in case.argv]
    env = {key: fill(value, tmp_path, assets) for key, value in case.env.items()}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if case.setup is not None:
        case.setup(tmp_path, assets)
    monkeypatch.chdir(tmp_path)  # no case may read or write the repository
    if case.subprocess:
        result = run_subprocess(argv, cwd=tmp_path)  # (the environment set above included)
        check_one_line_error(case, result.returncode, result.stderr)
        return
    code, _, stderr = cli(*argv)
    check_one_line_error(case, code, stderr)
