"""Unpickling that can name only allow-listed globals: a pickle can run code by naming any
callable, so files we did not write (tokenizer.pkl, .pt checkpoints) are read through this."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

from mlxgrpo.errors import MlxgrpoError


class AllowListUnpickler(pickle.Unpickler):
    """Resolves globals only through `allowed` ((module, name) → object); anything else is
    refused with an error naming it, before it can run. Subclasses set the three attributes."""

    allowed: Mapping[tuple[str, str], Any] = {}
    needed_by = "this file"  # what the refusal says never needs such a global
    hint = ""

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        target = self.allowed.get((module, name))
        if target is None:
            raise MlxgrpoError(
                f"refusing to load '{self._source}': it references '{module}.{name}', which "
                f"{self.needed_by} never needs (unpickling it could run arbitrary code)",
                hint=self.hint,
            )
        return target
