"""A name -> builder registry, shared by models and datasets."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from cnn_bench.errors import CnnBenchError, did_you_mean


class Registry:
    """Maps names to builder functions; unknown names raise with the closest matches."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, fn: Callable | None = None, *, name: str | None = None):
        """Decorator: ``@reg.register`` or ``@reg.register(name="x")``. Duplicates raise."""

        def add(f: Callable) -> Callable:
            key = name or f.__name__
            if key in self._builders:
                raise ValueError(f"{self.kind} '{key}' is already registered")
            self._builders[key] = f
            return f

        return add(fn) if fn is not None else add

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(k for k in self._builders if fnmatch.fnmatch(k, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            raise CnnBenchError(
                f"unknown {self.kind} '{name}': {did_you_mean(name, self._builders)}"
            ) from None
