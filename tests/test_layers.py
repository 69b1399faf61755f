"""The house rules of the package, read from its source (docs/architecture.md §2 and §12).

Every module under mlxgrpo/ is parsed with ``ast``; nothing is imported. The imports checked are
all of them: at module level, inside functions and under ``TYPE_CHECKING``. Each rule collects
every violation before it fails, and each message names the module, the line and the rule.

- Layers: a module imports modules of its own package or of strictly lower layers only
  (:data:`LAYERS`, low to high; packages on one line are siblings and do not import each other).
- No import cycles between modules.
- No private name (leading underscore, dunders excepted) taken from another module.
- The engine, and everything it stands on, imports neither rich nor typer.
- Modules <= 600 lines; functions <= 80 lines (a Typer command's signature is not counted).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "mlxgrpo"

# The layer list, low to high. A module belongs to the entry that is the longest prefix of its
# dotted name (the entry itself or anything below it); `mlxgrpo` alone is the package's
# __init__. docs/architecture.md §2 shows the same table with the reason for each cut.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("mlxgrpo.errors", "mlxgrpo.version"),
    ("mlxgrpo.safe_io", "mlxgrpo.parsing"),
    ("mlxgrpo.blas_probe",),
    ("mlxgrpo.blas_slots",),
    ("mlxgrpo.backend",),
    ("mlxgrpo.runlog",),
    ("mlxgrpo.plotting",),
    ("mlxgrpo.rewards",),
    ("mlxgrpo.data", "mlxgrpo.tools", "mlxgrpo.models"),
    ("mlxgrpo.config",),
    ("mlxgrpo.distributed",),
    ("mlxgrpo.generation",),
    ("mlxgrpo.task",),
    ("mlxgrpo.evaluation", "mlxgrpo.inference"),
    ("mlxgrpo.engine.loss",),
    ("mlxgrpo.engine.memory",),
    ("mlxgrpo.engine.io",),
    ("mlxgrpo.engine.loop",),
    ("mlxgrpo.sinks",),
    ("mlxgrpo.ui",),
    ("mlxgrpo.launcher",),
    ("mlxgrpo.cli",),
    ("mlxgrpo", "mlxgrpo.__main__"),
)

# Packages that only group other packages: no layer of their own, and no imports of mlxgrpo.
CONTAINERS = frozenset({"mlxgrpo.engine"})

# The engine and everything below the console: none of these may import rich or typer.
ENGINE = (
    "mlxgrpo.engine",
    "mlxgrpo.generation",
    "mlxgrpo.distributed",
    "mlxgrpo.task",
    "mlxgrpo.evaluation",
    "mlxgrpo.inference",
    "mlxgrpo.models",
    "mlxgrpo.data",
    "mlxgrpo.rewards",
    "mlxgrpo.config",
)
CONSOLE_LIBRARIES = ("rich", "typer")

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


# --------------------------------------------------------------------------- reading the source


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. mlxgrpo.engine.loss.grpo; a package's __init__ is the package
    path: Path
    is_package: bool
    tree: ast.Module
    lines: int

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the mlxgrpo module imported (or imported from)
    line: int
    name: str | None = None  # the non-module name taken from ``target`` (from-imports)


def _module_name(path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


@cache
def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name, is_package = _module_name(path)
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        found[name] = Module(name, path, is_package, tree, len(text.splitlines()))
    return found


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The dotted module a from-import reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_ours(name: str) -> bool:
    return name == "mlxgrpo" or name.startswith("mlxgrpo.")


def _known(name: str) -> str:
    """The longest prefix of ``name`` that is one of our modules (``import a.b.c`` of a package
    that re-exports ``c`` still imports ``a.b``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules():
        parts.pop()
    return ".".join(parts) or name


def imports_of(module: Module) -> Iterator[Import]:
    """Every import of an mlxgrpo module in ``module``, wherever it stands in the file."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_ours(alias.name):
                    yield Import(module.name, _known(alias.name), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            if not _is_ours(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules():
                    yield Import(module.name, sub, node.lineno)
                else:
                    yield Import(module.name, _known(base), node.lineno, alias.name)


def external_imports(module: Module) -> Iterator[tuple[str, int]]:
    """Top-level names of the third-party packages ``module`` imports, with their lines."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], node.lineno
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            yield node.module.split(".")[0], node.lineno


def _where(module: str, line: int | None = None) -> str:
    m = modules()[module]
    return f"{m.rel}:{line}" if line else m.rel


# --------------------------------------------------------------------------- layers


def place(name: str) -> tuple[int, str] | None:
    """(layer index, layer entry) of a module; None when the list does not place it."""
    best: tuple[int, str] | None = None
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            matches = name == entry or (entry != "mlxgrpo" and name.startswith(entry + "."))
            if matches and (best is None or len(entry) > len(best[1])):
                best = (index, entry)
    return best


def test_layer_list_is_consistent():
    entries = [e for line in LAYERS for e in line]
    assert len(entries) == len(set(entries)), "an entry appears twice in LAYERS"
    for name in ENGINE:
        placed = name in CONTAINERS or place(name) is not None
        assert placed, f"ENGINE names {name}, which LAYERS does not place"


def test_every_module_is_placed():
    problems = [
        f"{_where(name)}: module {name} is in no layer of LAYERS (rule: every module has a layer;"
        " add it to tests/test_layers.py and docs/architecture.md §2)"
        for name in modules()
        if name not in CONTAINERS and place(name) is None
    ]
    assert not problems, "\n".join(problems)


def _at(imp: Import) -> tuple[int, str]:
    return imp.line, imp.target


def test_imports_follow_the_layers():
    problems = []
    for module in modules().values():
        if module.name in CONTAINERS:
            for imp in imports_of(module):
                problems.append(
                    f"{_where(module.name, imp.line)}: {module.name} imports {imp.target} "
                    "(rule: a container package imports nothing of mlxgrpo)"
                )
            continue
        own = place(module.name)
        if own is None:
            continue  # reported by test_every_module_is_placed
        for imp in sorted({(i.line, i.target): i for i in imports_of(module)}.values(), key=_at):
            if imp.target in CONTAINERS:
                continue
            theirs = place(imp.target)
            if theirs is None or theirs[1] == own[1]:
                continue
            if theirs[0] < own[0]:
                continue
            if theirs[0] == own[0]:
                rule = (
                    f"siblings on layer {own[0] + 1} ({own[1]}, {theirs[1]}) "
                    "do not import each other"
                )
            else:
                rule = (
                    f"layer {own[0] + 1} ({own[1]}) may not import layer {theirs[0] + 1} "
                    f"({theirs[1]}), which is higher"
                )
            where = _where(module.name, imp.line)
            problems.append(f"{where}: {module.name} imports {imp.target} (rule: {rule})")
    assert not problems, f"{len(problems)} import(s) break the layer rule:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- cycles


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, over every import in the file."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules()}
    for module in modules().values():
        for imp in imports_of(module):
            if imp.target in graph and imp.target != module.name:
                graph[module.name].setdefault(imp.target, imp.line)
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def a_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """The shortest cycle through the component's first module (breadth-first)."""
    members, start = set(component), component[0]
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return [start, start]


def test_no_import_cycles():
    graph = import_graph()
    problems = []
    for component in strongly_connected(graph):
        cycle = a_cycle(graph, component)
        steps = [
            f"{a} ({_where(a, graph[a][b])}) -> {b}" for a, b in zip(cycle, cycle[1:], strict=False)
        ]
        problems.append(
            f"import cycle among {len(component)} modules ({', '.join(component)}); one cycle: "
            + "; ".join(steps)
            + " (rule: no import circles, counting imports inside functions and under"
            " TYPE_CHECKING)"
        )
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- private names


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_aliases(module: Module) -> dict[str, str]:
    """Local names bound to mlxgrpo modules anywhere in the file (``import a.b as m``,
    ``from a import b`` of a submodule)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_ours(alias.name):
                    if alias.asname:
                        aliases[alias.asname] = _known(alias.name)
                    else:
                        aliases[alias.name.split(".")[0]] = "mlxgrpo"
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if _is_ours(base) and sub in modules():
                    aliases[alias.asname or alias.name] = sub
    return aliases


def _dotted(node: ast.expr) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def private_uses(module: Module) -> Iterator[tuple[int, str, str]]:
    """(line, other module, private name) taken from another mlxgrpo module."""
    for imp in imports_of(module):
        if imp.name and _private(imp.name) and imp.target != module.name:
            yield imp.line, imp.target, imp.name
    aliases = _module_aliases(module)
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        chain = _dotted(node)
        if not chain or chain[0] not in aliases:
            continue
        # Walk the chain through submodules: m.sub._name names _name of m.sub.
        owner = aliases[chain[0]]
        for part in chain[1:-1]:
            if f"{owner}.{part}" not in modules():
                owner = ""
                break
            owner = f"{owner}.{part}"
        if owner and owner != module.name:
            yield node.lineno, owner, node.attr


def test_no_private_names_across_modules():
    problems = [
        f"{_where(module.name, line)}: {module.name} uses {name} of {owner} (rule: no private "
        "name across modules; make it public or move it)"
        for module in modules().values()
        for line, owner, name in sorted(set(private_uses(module)))
    ]
    assert not problems, f"{len(problems)} private name(s) cross modules:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- console libraries


def _in_engine(name: str) -> bool:
    return any(name == e or name.startswith(e + ".") for e in ENGINE)


def test_engine_never_imports_rich_or_typer():
    problems = [
        f"{_where(module.name, line)}: {module.name} imports {package} (rule: the engine reports "
        "through callbacks and never imports rich or typer)"
        for module in modules().values()
        if _in_engine(module.name)
        for package, line in external_imports(module)
        if package in CONSOLE_LIBRARIES
    ]
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- sizes


def test_modules_are_at_most_600_lines():
    problems = [
        f"{m.rel}:1: {m.name} has {m.lines} lines (rule: modules <= {MAX_MODULE_LINES} lines)"
        for m in modules().values()
        if m.lines > MAX_MODULE_LINES
    ]
    assert not problems, "\n".join(problems)


def _registered_commands(module: Module) -> set[str]:
    """Names registered as Typer commands by calls such as ``app.command("x")(mod.func)``."""
    names = set()
    for node in ast.walk(module.tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Call)
            and isinstance(node.func.func, ast.Attribute)
            and node.func.func.attr in ("command", "callback")
            and node.args
        ):
            target = node.args[0]
            if isinstance(target, ast.Attribute):
                names.add(target.attr)
            elif isinstance(target, ast.Name):
                names.add(target.id)
    return names


def _is_typer_command(module: Module, func: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    if not module.name.startswith("mlxgrpo.cli."):
        return False
    for decorator in func.decorator_list:
        call = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(call, ast.Attribute) and call.attr in ("command", "callback"):
            return True
    registered = set().union(*(_registered_commands(m) for m in _cli_modules()))
    return func.name in registered


@cache
def _cli_modules() -> tuple[Module, ...]:
    return tuple(m for m in modules().values() if m.name.startswith("mlxgrpo.cli"))


def long_functions(module: Module) -> Iterator[str]:
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        end = node.end_lineno or node.lineno
        if _is_typer_command(module, node):
            body = end - node.body[0].lineno + 1
            if body > MAX_FUNCTION_LINES:
                yield (
                    f"{module.rel}:{node.lineno}: Typer command {module.name}.{node.name} has a "
                    f"{body}-line body (rule: a command's body after its signature <= "
                    f"{MAX_FUNCTION_LINES} lines)"
                )
            continue
        length = end - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
            yield (
                f"{module.rel}:{node.lineno}: function {module.name}.{node.name} has {length} "
                f"lines (rule: functions <= {MAX_FUNCTION_LINES} lines)"
            )


def test_functions_are_at_most_80_lines():
    problems = [p for m in modules().values() for p in long_functions(m)]
    assert not problems, f"{len(problems)} function(s) too long:\n" + "\n".join(problems)


# --------------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mlxgrpo", (22, "mlxgrpo")),
        ("mlxgrpo.__main__", (22, "mlxgrpo.__main__")),
        ("mlxgrpo.errors", (0, "mlxgrpo.errors")),
        ("mlxgrpo.models.cpu_kernels", (8, "mlxgrpo.models")),
        ("mlxgrpo.engine.memory.replay", (15, "mlxgrpo.engine.memory")),
        ("mlxgrpo.engine", None),
        ("mlxgrpo.somewhere_new", None),
    ],
)
def test_place(name, expected):
    assert place(name) == expected


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    (component,) = strongly_connected(graph)
    assert component == ["a", "b", "c"]
    assert a_cycle(graph, component) == ["a", "b", "c", "a"]


SAMPLE = """
from typing import TYPE_CHECKING
import mlxgrpo.errors as e
from mlxgrpo import distributed
from mlxgrpo.engine.loss.grpo import policy_loss, _aggregate
if TYPE_CHECKING:
    from mlxgrpo.cli import app
def f():
    from . import safe_io
    return e._hidden
"""


def test_imports_are_found_everywhere():
    """Module-level, function-level, TYPE_CHECKING and relative imports, submodules resolved."""
    sample = Module("mlxgrpo.sample", PACKAGE / "sample.py", False, ast.parse(SAMPLE), 10)
    found = {(i.target, i.line, i.name) for i in imports_of(sample)}
    assert found == {
        ("mlxgrpo.errors", 3, None),
        ("mlxgrpo.distributed", 4, None),
        ("mlxgrpo.engine.loss.grpo", 5, "policy_loss"),
        ("mlxgrpo.engine.loss.grpo", 5, "_aggregate"),
        ("mlxgrpo.cli.app", 7, None),
        ("mlxgrpo.safe_io", 9, None),
    }
    assert set(private_uses(sample)) == {
        (5, "mlxgrpo.engine.loss.grpo", "_aggregate"),
        (10, "mlxgrpo.errors", "_hidden"),
    }
