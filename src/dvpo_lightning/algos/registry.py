"""A name -> function table, so a new estimator or loss is one decorated function.

`ADVANTAGE_ESTIMATORS` and `LOSSES` are instances; configs name an entry by string and the modules
look it up with `get_advantage(name)` / `get_loss(name)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    """Functions of one kind (`kind` names it in error messages), looked up by name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._functions: dict[str, Callable] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[F], F]:
        """Decorator adding a function under `name`; `replace=True` lets a notebook cell re-run."""

        def decorator(function: F) -> F:
            if name in self._functions and not replace:
                raise ValueError(
                    f"{self.kind} {name!r} is already registered; pass replace=True to overwrite it"
                )
            self._functions[name] = function
            return function

        return decorator

    def get(self, name: str) -> Callable:
        """The function registered as `name`; an unknown name is an error listing the known ones."""
        if name not in self._functions:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._functions[name]

    def unregister(self, name: str) -> None:
        """Remove `name` (an unknown name is an error, as in `get`)."""
        self.get(name)
        del self._functions[name]

    def names(self) -> list[str]:
        return sorted(self._functions)

    def __contains__(self, name: object) -> bool:
        return name in self._functions

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._functions)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
