"""Domain events and aggregates: plain data and pure functions, no I/O.

Events are frozen dataclasses named in the past tense. Their class name is the
stored event type, so a stored event is never renamed: a changed shape gets a new
schema version and an upcaster (`vim.eventlog.upcasting`). `to_data` and
`from_data` are the only serialisation: the fields must be JSON values (str,
int, float, bool, None, lists and dicts of them).

An aggregate module holds a frozen state dataclass, `evolve(state, event)` that
folds one event into it (None before the first event), and decision functions
that take the state plus arguments (ids, clocks) and return new events or raise
a `DomainError`. Nothing here reads a clock, makes an id or touches a database.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self

_REGISTRY: dict[str, type[DomainEvent]] = {}
_FIELDS: dict[type[Any], tuple[tuple[str, ...], frozenset[str]]] = {}
"""Per event class, its field names in order and as a set: `dataclasses.fields`
walks the class's field table on every call (per event, twice per allocation)."""


def _field_names(cls: type[Any]) -> tuple[tuple[str, ...], frozenset[str]]:
    known = _FIELDS.get(cls)
    if known is None:
        names = tuple(f.name for f in dataclasses.fields(cls))
        known = _FIELDS[cls] = (names, frozenset(names))
    return known


@dataclasses.dataclass(frozen=True, slots=True)
class DomainEvent:
    """Base of every domain event; subclasses register themselves by class name."""

    SCHEMA_VERSION: ClassVar[int] = 1

    def __init_subclass__(cls, **kw: Any) -> None:
        # `dataclass(slots=True)` builds a second class of the same name: the later
        # one (the one the module ends up with) replaces the first.
        old = _REGISTRY.get(cls.__name__)
        if old is not None and (old.__module__, old.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise TypeError(f"event type {cls.__name__} is defined twice")
        _REGISTRY[cls.__name__] = cls

    @property
    def type(self) -> str:
        return type(self).__name__

    def to_data(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _field_names(type(self))[0]}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Self:
        names = _field_names(cls)[1]
        return cls(**{k: v for k, v in data.items() if k in names})


def parse(event_type: str, data: Mapping[str, Any]) -> DomainEvent | None:
    """The domain event for a stored one, or None for a type this code does not know."""
    cls = _REGISTRY.get(event_type)
    return None if cls is None else cls.from_data(data)


def event_types() -> frozenset[str]:
    return frozenset(_REGISTRY)
