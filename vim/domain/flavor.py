"""Compute flavours (IFA005 "compute flavour"): the sizes servers are made in.

A flavour is created by an admin, is immutable, and is deleted (a tombstone:
servers made from it keep their copy of its sizes). Stream: `flavor-<id>`.
Names are unique among live flavours: the API claims the name in a `names`
stream in the same append (see `vim.domain.names`), so concurrent creations
with one name cannot both succeed.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.errors import AlreadyExists, InvalidTransition, NotFound

KIND = "flavor"


def stream(flavor_id: str) -> str:
    return f"{KIND}-{flavor_id}"


@dataclass(frozen=True, slots=True)
class FlavorCreated(DomainEvent):
    flavor_id: str
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    is_public: bool = True
    extra_specs: dict[str, str] = field(default_factory=dict)
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class FlavorDeleted(DomainEvent):
    flavor_id: str
    deleted_at: str = ""


@dataclass(frozen=True, slots=True)
class Flavor:
    flavor_id: str
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    is_public: bool
    extra_specs: dict[str, str]
    created_at: str
    deleted: bool = False

    def view(self) -> dict[str, Any]:
        """The proto3 JSON view of the flavour (the API's `Flavour` message)."""
        return {
            "flavourId": self.flavor_id,
            "name": self.name,
            "vcpus": self.vcpus,
            "ramMb": str(self.ram_mb),
            "diskGb": str(self.disk_gb),
            "isPublic": self.is_public,
            "extraSpecs": dict(self.extra_specs),
            "createdAt": self.created_at,
        }


def evolve(state: Flavor | None, event: DomainEvent, _recorded: object = None) -> Flavor:
    match event:
        case FlavorCreated():
            return Flavor(
                event.flavor_id,
                event.name,
                event.vcpus,
                event.ram_mb,
                event.disk_gb,
                event.is_public,
                dict(event.extra_specs),
                event.created_at,
            )
        case FlavorDeleted() if state is not None:
            return replace(state, deleted=True)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before FlavorCreated")
    return state


def create(
    existing: Iterable[Flavor],
    flavor_id: str,
    name: str,
    vcpus: int,
    ram_mb: int,
    disk_gb: int,
    is_public: bool,
    extra_specs: dict[str, str],
    now: str,
) -> FlavorCreated:
    """Create a flavour; its name must be unique among live flavours."""
    for f in existing:
        if not f.deleted and f.name == name:
            raise AlreadyExists(f"a flavour named {name!r} exists: {f.flavor_id}")
    return FlavorCreated(flavor_id, name, vcpus, ram_mb, disk_gb, is_public, extra_specs, now)


def delete(state: Flavor | None, flavor_id: str, now: str) -> FlavorDeleted:
    if state is None or state.deleted:
        raise NotFound(f"flavour {flavor_id} not found")
    return FlavorDeleted(flavor_id, now)
