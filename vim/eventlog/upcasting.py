"""Upcasters: stored events are never rewritten, old schema versions are read forward.

An upcaster turns the data of (event type, schema version n) into version n + 1.
Reading applies them in a chain until no upcaster is registered for the version
reached, so a reader always sees the newest shape it knows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Upcaster = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class Upcasters:
    """A registry of upcasters, keyed by event type and the schema version they read."""

    def __init__(self) -> None:
        self._fns: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: str, from_version: int, fn: Upcaster) -> None:
        key = (event_type, from_version)
        if key in self._fns:
            raise ValueError(f"an upcaster for {event_type} v{from_version} is registered")
        self._fns[key] = fn

    def upcast(
        self, event_type: str, version: int, data: Mapping[str, Any]
    ) -> tuple[int, Mapping[str, Any]]:
        """Return the newest (version, data) reachable from the stored ones."""
        while (fn := self._fns.get((event_type, version))) is not None:
            data = fn(data)
            version += 1
        return version, data

    def __bool__(self) -> bool:
        return bool(self._fns)
