"""Unique names: a stream per (scope, name) that records which resource holds it.

A resource whose name must be unique appends `NameClaimed` to the name's stream
at the version it read, in the same append as its own creation. Two concurrent
creations with one name both expect the same version: one wins, the other gets a
version conflict, decides again, and finds the name taken. Deleting the resource
appends `NameReleased`. Stream: `name-<scope>.<sha256(name)[:32]>`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from vim.domain.base import DomainEvent
from vim.errors import AlreadyExists

KIND = "name"


def stream(scope: str, name: str) -> str:
    return f"{KIND}-{scope}.{hashlib.sha256(name.encode()).hexdigest()[:32]}"


@dataclass(frozen=True, slots=True)
class NameClaimed(DomainEvent):
    scope: str
    name: str
    owner_id: str


@dataclass(frozen=True, slots=True)
class NameReleased(DomainEvent):
    scope: str
    name: str
    owner_id: str


@dataclass(frozen=True, slots=True)
class NameOwner:
    name: str
    owner_id: str | None


def evolve(state: NameOwner | None, event: DomainEvent, _recorded: object = None) -> NameOwner:
    match event:
        case NameClaimed():
            return NameOwner(event.name, event.owner_id)
        case NameReleased() if state is not None and state.owner_id == event.owner_id:
            return NameOwner(event.name, None)
    return state or NameOwner("", None)


def claim(state: NameOwner | None, scope: str, name: str, owner_id: str) -> NameClaimed:
    if state is not None and state.owner_id not in (None, owner_id):
        raise AlreadyExists(f"the name {name!r} is taken by {state.owner_id}")
    return NameClaimed(scope, name, owner_id)


def release(scope: str, name: str, owner_id: str) -> NameReleased:
    return NameReleased(scope, name, owner_id)
