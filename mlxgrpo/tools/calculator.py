"""The calculator tool that nanochat models call while they generate.

A model writes ``<|python_start|>EXPR<|python_end|>``; the trainer evaluates EXPR with
:func:`calculator` and forces the result text into the sequence. EXPR is sampled text, so it is
never given to ``eval``: it is parsed with ``ast.parse(..., mode="eval")`` and evaluated here, node
by node, from a whitelist:

* int and float literals, and string literals of at most ``MAX_STRING_CHARS`` characters;
* unary ``+``/``-`` and binary ``+ - * / // % **`` on numbers (parentheses group as usual);
* ``"literal".count("literal")``, the one method call nanochat's tasks use (counting letters).

Everything else is refused: names, other attributes, subscripts, comprehensions, lambdas,
f-strings, keyword arguments, bools, complex numbers, string arithmetic. Commas between digits
are dropped first, as nanochat does (``1,000*3`` is ``3000``).

Size bounds keep every evaluation fast: the expression is at most ``MAX_EXPRESSION_CHARS`` long,
and ``**`` and ``*`` are refused before computing when the result would have more than about
``MAX_RESULT_DIGITS`` digits. ``mlxgrpo.tools.run_with_timeout`` is a backstop for any tool
function.

Every refusal or failure raises :class:`ToolError` with a one-line message.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import warnings
from collections.abc import Callable

from mlxgrpo.tools.calls import ToolError, one_line

MAX_EXPRESSION_CHARS = 500
MAX_STRING_CHARS = 1000
MAX_EXPONENT = 100
MAX_RESULT_DIGITS = 1000
# Deep enough for any sensible formula, shallow enough that recursion never nears Python's limit.
MAX_NESTING = 100

Number = int | float

_BINARY_OPERATORS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPERATORS: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
# Friendlier words than the AST class names for the things models most often try.
_REFUSED_NODE_NAMES: dict[type[ast.AST], str] = {
    ast.Subscript: "subscripts",
    ast.Lambda: "lambdas",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.JoinedStr: "f-strings",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.Compare: "comparisons",
    ast.BoolOp: "boolean operators",
    ast.IfExp: "conditional expressions",
    ast.NamedExpr: "assignments",
    ast.Starred: "starred arguments",
}
# A string literal (either quote, backslash escapes allowed) or a comma between two digits.
_STRING_OR_DIGIT_COMMA = re.compile(r"""("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|(?<=\d),(?=\d)""")


def calculator(expression: str) -> str:
    """Evaluate a whitelisted arithmetic or ``.count`` expression and return the result as text."""
    if not isinstance(expression, str):
        raise ToolError(f"expression must be a str, not {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression too long ({len(expression)} > {MAX_EXPRESSION_CHARS} chars)")
    source = _drop_digit_commas(expression).strip()
    if not source:
        raise ToolError("empty expression")
    if "#" in source:  # Python would read the rest as a comment and answer for less
        raise ToolError("refused: '#' is not allowed")
    try:
        with warnings.catch_warnings():  # "invalid decimal literal" and such: an error below
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source, mode="eval")
    except SyntaxError as error:
        raise ToolError(one_line(f"syntax error: {error.msg}")) from None
    except (ValueError, RecursionError, MemoryError) as error:
        # ValueError: null bytes; the other two: pathological nesting inside the parser.
        raise ToolError(f"cannot parse expression ({type(error).__name__})") from None
    return _format_result(_evaluate(tree.body, depth=0))


def _drop_digit_commas(expression: str) -> str:
    """Remove thousands separators like nanochat, but leave commas inside string literals alone."""
    return _STRING_OR_DIGIT_COMMA.sub(lambda match: match.group(1) or "", expression)


def _evaluate(node: ast.AST, depth: int) -> Number | str:
    if depth > MAX_NESTING:
        raise ToolError(f"expression nested too deeply (> {MAX_NESTING} levels)")
    if isinstance(node, ast.Constant):
        return _constant(node)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
        operand = _number(_evaluate(node.operand, depth + 1), "unary operator")
        return _checked(_UNARY_OPERATORS[type(node.op)](operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY_OPERATORS:
        left = _evaluate(node.left, depth + 1)
        right = _evaluate(node.right, depth + 1)
        return _binary(node.op, left, right)
    if isinstance(node, ast.Call):
        return _count_call(node)
    if isinstance(node, ast.Name):
        raise ToolError(f"refused: names are not allowed ({node.id})")
    if isinstance(node, ast.Attribute):
        raise ToolError(f"refused: attribute access is not allowed (.{node.attr})")
    raise ToolError(f"refused: {_describe(node)} are not allowed")


def _describe(node: ast.AST) -> str:
    """Plural words for a refused node, for the one-line message."""
    if isinstance(node, ast.UnaryOp | ast.BinOp):
        return f"{type(node.op).__name__} operators"
    return _REFUSED_NODE_NAMES.get(type(node), f"{type(node).__name__} expressions")


def _constant(node: ast.Constant) -> Number | str:
    value = node.value
    # bool is an int subclass and True/False parse as constants, so test the exact type.
    if type(value) is int:
        return value
    if type(value) is float:
        return _checked(value)
    if type(value) is str:
        if len(value) > MAX_STRING_CHARS:
            raise ToolError(f"string literal too long (> {MAX_STRING_CHARS} chars)")
        return value
    raise ToolError(f"refused: {type(value).__name__} literals are not allowed")


def _count_call(node: ast.Call) -> int:
    """Only ``"text".count("sub")``: string literals both, one positional argument."""
    shape = '"text".count("sub")'
    function = node.func
    if isinstance(function, ast.Name):
        raise ToolError(f"refused: names are not allowed ({function.id})")
    if not isinstance(function, ast.Attribute):
        raise ToolError(f"refused: only {shape} calls are allowed ({_describe(function)} are not)")
    if function.attr != "count":
        raise ToolError(f"refused: method .{function.attr}() is not allowed, only {shape}")
    if node.keywords:
        raise ToolError("refused: keyword arguments are not allowed")
    if len(node.args) != 1:
        raise ToolError(f"refused: .count takes exactly one argument, as in {shape}")
    receiver, (needle,) = function.value, node.args
    if not (isinstance(receiver, ast.Constant) and type(receiver.value) is str):
        raise ToolError(f"refused: .count is only allowed on a string literal, as in {shape}")
    if not (isinstance(needle, ast.Constant) and type(needle.value) is str):
        raise ToolError(f"refused: .count needs a string literal argument, as in {shape}")
    text, sub = _constant(receiver), _constant(needle)
    assert isinstance(text, str) and isinstance(sub, str)
    return text.count(sub)


def _number(value: Number | str, where: str) -> Number:
    if isinstance(value, str):
        raise ToolError(f"refused: strings are not allowed in a {where}")
    return value


def _binary(op: ast.operator, left: Number | str, right: Number | str) -> Number:
    if isinstance(left, str) or isinstance(right, str):
        # Includes 'a'*10 and "a"+"b": string building is the cheapest way to exhaust memory.
        raise ToolError("refused: arithmetic on strings is not allowed")
    if isinstance(op, ast.Pow):
        _check_power(left, right)
    elif isinstance(op, ast.Mult):
        _check_product(left, right)
    try:
        result = _BINARY_OPERATORS[type(op)](left, right)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("number too large") from None
    return _checked(result)


def _digits(value: Number) -> float:
    """Decimal digits of the integer part (a cheap upper estimate; 0 for values below 1)."""
    magnitude = abs(value)
    return math.log10(magnitude) + 1 if magnitude >= 1 else 0.0


def _check_power(base: Number, exponent: Number) -> None:
    if abs(exponent) > MAX_EXPONENT:
        # The exponent itself is not shown: a huge int cannot even be formatted as a float.
        raise ToolError(f"exponent too large (limit is {MAX_EXPONENT})")
    # Only a positive exponent of a base above 1 grows the result.
    if exponent > 0 and abs(base) > 1:
        if exponent * math.log10(abs(base)) > MAX_RESULT_DIGITS:
            raise ToolError(f"result too large (more than {MAX_RESULT_DIGITS} digits)")


def _check_product(left: Number, right: Number) -> None:
    if _digits(left) + _digits(right) > MAX_RESULT_DIGITS + 1:
        raise ToolError(f"result too large (more than {MAX_RESULT_DIGITS} digits)")


def _checked(value: object) -> Number:
    """Refuse complex results (negative base, fractional exponent) and inf/nan floats."""
    if type(value) is int:
        return value
    if type(value) is float:
        if not math.isfinite(value):
            raise ToolError("result is not a finite number")
        return value
    raise ToolError(f"refused: result of type {type(value).__name__} is not allowed")


def _format_result(value: Number | str) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)
