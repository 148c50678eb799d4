"""One small generic registry: register, get, names.

Unknown names raise an error listing the known names and the closest match.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from slm_export.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping with aliases and helpful lookup errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, item: T, aliases: tuple[str, ...] = ()) -> T:
        """Register ``item`` under ``name`` and its aliases; a name may be taken once. Names are
        case-insensitive: they are stored lower-case, as lookups are."""
        name, aliases = name.strip().lower(), tuple(a.strip().lower() for a in aliases)
        for key in (name, *aliases):
            if key in self._items or key in self._aliases:
                raise ConfigError(f"{self.kind} name {key!r} is already registered")
        self._items[name] = item
        for alias in aliases:
            self._aliases[alias] = name
        return item

    def decorator(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        """Use as ``@registry.decorator("name")``."""

        def wrap(item: T) -> T:
            return self.register(name, item, aliases)

        return wrap

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases."""
        key = name.strip().lower()
        if key in self._items:
            return key
        if key in self._aliases:
            return self._aliases[key]
        known = sorted(self._items)
        close = difflib.get_close_matches(key, [*known, *self._aliases], n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(known)}.")

    def get(self, name: str) -> T:
        """Look up by name or alias."""
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        """Registered names (aliases excluded), sorted."""
        return sorted(self._items)

    def aliases_of(self, name: str) -> list[str]:
        """Aliases that point at ``name``."""
        return sorted(a for a, n in self._aliases.items() if n == name)

    def __contains__(self, name: str) -> bool:
        key = name.strip().lower()
        return key in self._items or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
