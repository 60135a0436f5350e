"""The registry primitive: name -> implementation, filled where each implementation lives.

    ACTIVATIONS = Registry("activation")

    @ACTIVATIONS.register("relu2")
    def relu2(x): ...

A config field names an entry with `choice(default, ACTIVATIONS)` (a plain name) or
`variant(SCHEDULES, default)` (a name plus that entry's own parameter dataclass). Names are
checked when a config is validated, not when a class is defined, so a module imported later
can still add entries. Every registry is listed in `Registry.all()`, which the registry test
walks: a new entry is tested without editing a test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import ClassVar, Generic, TypeVar

from underpar.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations of one kind (activations, schedules, quantizers, ...)."""

    _all: ClassVar[dict[str, Registry]] = {}

    def __init__(self, kind: str):
        if kind in Registry._all:
            raise ValueError(f"a registry of kind {kind!r} exists already")
        self.kind = kind
        self._entries: dict[str, T] = {}
        Registry._all[kind] = self

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name")` over a function or class."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(f"unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def name_of(self, entry: object) -> str:
        """The name `entry` (an implementation, or an instance of a registered class) is registered under."""
        for name, registered in self._entries.items():
            if registered is entry or (isinstance(registered, type) and type(entry) is registered):
                return name
        raise ConfigError(f"{entry!r} is not a registered {self.kind}; valid: {', '.join(self._entries)}")

    @classmethod
    def all(cls) -> dict[str, Registry]:
        """Every registry created so far, by kind."""
        return dict(cls._all)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
