"""The calculator tool: whitelisted arithmetic and ``.count`` only, bounded, never eval'd."""

from __future__ import annotations

import builtins
import threading
import time

import pytest

from mlxgrpo.tools import ToolError, run_with_timeout
from mlxgrpo.tools.calculator import calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2+3*4", "14"),
        ("7/2", "3.5"),
        ("2**10", "1024"),
        ("-(3-5)", "2"),
        ("48213*9921", str(48213 * 9921)),
        ("1,000*3", "3000"),
        ("1,234,567 + 1", "1234568"),
        ('"strawberry".count("r")', "3"),
        # Only commas between digits are separators; one inside a string literal is kept.
        ('"a,b,c".count(",")', "2"),
        ("17 // 5 + 17 % 5", "5"),
        ("2**-1", "0.5"),
        ("+1.5 * 2", "3.0"),
        ("(10**99)**10", "1" + "0" * 990),
    ],
)
def test_arithmetic_results(expression: str, expected: str) -> None:
    assert calculator(expression) == expected


REFUSED = [
    ("2*3#+1", "'#' is not allowed"),  # a comment would make Python answer 6
    ("__import__('os')", "__import__"),
    ("().__class__", "__class__"),
    ("open('x')", "open"),
    ("[1,2][0]", "subscript"),
    ("x+1", "names"),
    ("2**100000", "exponent too large"),
    ("9**9**9", "exponent too large"),
    ("'a'*10", "strings"),
    ("1+" * 300 + "1", "too long"),
    ("(1).real", "real"),
    ('"abc".upper()', "upper"),
    ("lambda: 1", "lambda"),
    ("(lambda: 1)()", "lambda"),
    ('"banana".count(sub="a")', "keyword"),
    ('"banana".count("a", 1)', "one argument"),
    ("'x'.count(1)", "string literal"),
    ("[c for c in 'ab']", "comprehension"),
    ("f'{1}'", "f-string"),
    ("True + 1", "bool"),
    ("1j * 2", "complex"),
    ("(-8) ** 0.5", "complex"),
    ("1e308 * 10", "finite"),
    ("(10**99)**10 * (10**99)**10", "too large"),
    ("-" * 300 + "1", "nested"),
    ("1 +", "syntax error"),
    ("", "empty"),
]


@pytest.mark.parametrize(("expression", "fragment"), REFUSED)
def test_refused_expressions_raise_one_line_tool_error(expression: str, fragment: str) -> None:
    with pytest.raises(ToolError) as caught:
        calculator(expression)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message and len(message) <= 200


def test_refused_expressions_execute_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []
    # Only calls made while the calculator runs count (monkeypatch itself imports lazily).
    window_open = False
    real_import, real_open = builtins.__import__, builtins.open
    real_eval, real_exec = builtins.eval, builtins.exec

    def recording(name: str, real):
        def wrapper(*args, **kwargs):
            if window_open:
                calls.append((name, args[0] if args else None))
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "__import__", recording("import", real_import))
    monkeypatch.setattr(builtins, "open", recording("open", real_open))
    monkeypatch.setattr(builtins, "eval", recording("eval", real_eval))
    monkeypatch.setattr(builtins, "exec", recording("exec", real_exec))
    # Plain try/except, not pytest.raises: pytest's own lazy imports would be recorded too.
    refused = []
    window_open = True
    for expression, _ in REFUSED:
        try:
            calculator(expression)
        except ToolError:
            refused.append(expression)
    counted = calculator('"strawberry".count("r")')
    window_open = False
    monkeypatch.undo()
    assert refused == [expression for expression, _ in REFUSED]
    assert counted == "3"
    assert calls == []


def test_division_by_zero() -> None:
    for expression in ("1/0", "5 // 0", "5 % 0", "1.5 / 0.0", "0 ** -1"):
        with pytest.raises(ToolError, match="division by zero"):
            calculator(expression)


def test_non_string_expression_is_refused() -> None:
    with pytest.raises(ToolError, match="str"):
        calculator(42)  # type: ignore[arg-type]


def test_timeout_returns_within_the_limit() -> None:
    release = threading.Event()

    def slow(argument: str) -> str:
        release.wait(10)
        return argument

    limit = 0.3
    started = time.monotonic()
    try:
        with pytest.raises(ToolError, match="timed out"):
            run_with_timeout(slow, "1+1", limit)
        elapsed = time.monotonic() - started
    finally:
        release.set()  # lets the abandoned worker thread finish
    assert limit <= elapsed < limit + 1.0


def test_exception_in_tool_is_reported_with_type_and_message() -> None:
    def failing(argument: str) -> str:
        raise ValueError("bad\ninput")

    with pytest.raises(ToolError) as caught:
        run_with_timeout(failing, "x", 2.0)
    message = str(caught.value)
    assert "bad" in message and "ValueError" in message
    assert "\n" not in message


def test_non_string_result_names_its_type() -> None:
    with pytest.raises(ToolError, match=r"\bint\b"):
        run_with_timeout(lambda argument: 5, "x", 2.0)


def test_run_with_timeout_passes_calculator_results_and_errors_through() -> None:
    assert run_with_timeout(calculator, "6*7", 2.0) == "42"
    with pytest.raises(ToolError) as caught:
        run_with_timeout(calculator, "1/0", 2.0)
    assert str(caught.value) == "division by zero"


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("inf"), float("nan")])
def test_bad_timeout_is_a_usage_error(timeout_s: float) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        run_with_timeout(calculator, "1", timeout_s)
