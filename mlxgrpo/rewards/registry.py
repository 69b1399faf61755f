"""Reward registry and resolution of reward specs.

A reward function has the signature
``fn(prompts, completions, answers, **columns) -> list[float | None]``; ``None`` means "not
applicable" and is left out of means. A spec names one: a registered name (``correctness``),
``package.module:function`` or ``path/to/file.py:function``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxgrpo.errors import ConfigError

RewardFn = Callable[..., Sequence[float | None]]


@dataclass(frozen=True)
class ResolvedReward:
    """A reward function together with the name shown in reward tables."""

    name: str
    fn: RewardFn
    spec: str
    description: str = ""


_REGISTRY: dict[str, ResolvedReward] = {}
_ALIASES: dict[str, str] = {}
_LOADED_FILES: dict[Path, Any] = {}


def register_reward(
    name: str, description: str | None = None, *, aliases: Sequence[str] = ()
) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn`` under ``name`` (and optional legacy ``aliases``)."""

    def decorate(fn: RewardFn) -> RewardFn:
        text = description if description is not None else _first_doc_line(fn)
        _REGISTRY[name] = ResolvedReward(name=name, fn=fn, spec=name, description=text)
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return decorate


def list_rewards() -> dict[str, str]:
    """Registered reward names mapped to their one-line descriptions."""
    return {name: entry.description for name, entry in sorted(_REGISTRY.items())}


def is_registered(name: str) -> bool:
    return name in _REGISTRY or name in _ALIASES


def resolve_reward(spec: str, base_dir: str | Path | None = None) -> ResolvedReward:
    """Turn a spec into a callable reward; ``ConfigError`` when it cannot be found or loaded.

    Relative file paths and top-level local modules are looked up in ``base_dir`` (default: the
    current directory).
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("Empty reward function name.", hint=_registered_hint())
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if spec in _ALIASES:
        return _REGISTRY[_ALIASES[spec]]
    if ":" not in spec:
        raise _unknown_name_error(spec)
    attr, fn = load_callable(spec, "Reward", base_dir)
    return ResolvedReward(name=attr, fn=fn, spec=spec, description=_first_doc_line(fn))


def load_callable(
    spec: str, kind: str, base_dir: str | Path | None = None
) -> tuple[str, Callable[..., Any]]:
    """``'path/to/file.py:name'`` or ``'package.module:name'`` -> (name, the callable);
    ``ConfigError`` naming ``kind`` ("Reward", "Tool") when it cannot be loaded."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(
            f"Cannot parse {kind.lower()} spec {spec!r}.",
            hint="use a registered name, 'package.module:function' or 'path/to/file.py:function'",
        )
    search_dir = Path(base_dir) if base_dir is not None else Path.cwd()
    if target.endswith(".py"):
        module = _load_file(spec, target, search_dir, kind)
    else:
        module = _import_module(spec, target, search_dir, kind)
    fn = getattr(module, attr, None)
    if fn is None:
        available = sorted(
            n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
        )
        raise ConfigError(
            f"{kind} spec {spec!r}: {target!r} has no attribute {attr!r}.",
            hint=f"callables defined there: {', '.join(available) or '(none)'}",
        )
    if not callable(fn):
        raise ConfigError(f"{kind} spec {spec!r}: {attr!r} is not callable.")
    return attr, fn


def _load_file(spec: str, target: str, search_dir: Path, kind: str = "Reward") -> Any:
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = search_dir / path
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(
            f"{kind} spec {spec!r}: file not found: {path}",
            hint="relative paths are resolved against the config file's directory or the "
            "current directory",
        )
    if path in _LOADED_FILES:
        return _LOADED_FILES[path]
    # A unique module name per file, so two files named rewards.py do not collide.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"mlxgrpo_user_rewards.{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ConfigError(f"{kind} spec {spec!r}: cannot load {path} as a Python module.")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # user code: any failure is a config problem to report
        sys.modules.pop(module_name, None)
        raise ConfigError(
            f"{kind} spec {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}",
            hint=f"fix the error in the {kind.lower()} file",
        ) from exc
    _LOADED_FILES[path] = module
    return module


def _import_module(spec: str, target: str, search_dir: Path, kind: str = "Reward") -> Any:
    # A console script does not have the working directory on sys.path; add it for the import.
    added = str(search_dir.resolve())
    sys.path.insert(0, added)
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise ConfigError(
            f"{kind} spec {spec!r}: cannot import module {target!r}: {exc}",
            hint="check the module name, or use 'path/to/file.py:function'",
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"{kind} spec {spec!r}: importing {target!r} failed: {type(exc).__name__}: {exc}",
        ) from exc
    finally:
        try:
            sys.path.remove(added)
        except ValueError:
            pass


def _unknown_name_error(spec: str) -> ConfigError:
    candidates = list(_REGISTRY) + list(_ALIASES)
    close = difflib.get_close_matches(spec, candidates, n=1)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    return ConfigError(f"Unknown reward function {spec!r}.", hint=suggestion + _registered_hint())


def _registered_hint() -> str:
    return (
        f"registered rewards: {', '.join(sorted(_REGISTRY))}; or give "
        "'package.module:function' or 'path/to/file.py:function'"
    )


def _first_doc_line(fn: Callable[..., Any]) -> str:
    doc = (getattr(fn, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""
