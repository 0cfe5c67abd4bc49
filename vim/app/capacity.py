"""Capacity per host and per zone, from the read model and the live reservations.

For each host: total is the physical amount times the allocation ratio (and the
host's instance limit), used is the sum of its claims, reserved is zero
(reservations are zone-scoped), and available is what a new claim could still
take: total minus used, clamped at zero, and zero on a host that is not
schedulable (not UP, or in maintenance).

For each zone: total and used are the sums over its hosts; reserved is the sum
of the zone's reservations that hold capacity (`holds`, by default those whose
status is ACTIVE or PENDING); available is the zone's schedulable hosts'
available minus reserved, clamped at zero. A reservation names no disk, so
reserved disk is always zero. A reservation's amounts are taken to be what it
still holds back: the reservations module subtracts what servers created
against it have consumed (those are already counted as used).

The reservations come from another module through a structural `ReservationLike`
protocol, so this module imports nothing of theirs. Zones that only a
reservation names are reported too (with zero totals), so an over-reservation
is visible rather than dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from vim.domain import host
from vim.projections.readmodel import ReadModel

HOLDING_STATUSES = frozenset({"ACTIVE", "PENDING"})


class ReservationLike(Protocol):
    """What capacity needs of a reservation (read-only, so frozen dataclasses fit)."""

    @property
    def zone(self) -> str: ...
    @property
    def vcpus(self) -> int: ...
    @property
    def ram_mb(self) -> int: ...
    @property
    def instances(self) -> int: ...
    @property
    def tenant(self) -> str: ...
    @property
    def status(self) -> str: ...


def holds_capacity(r: ReservationLike) -> bool:
    """Whether a reservation counts as reserved: ACTIVE or PENDING (any case)."""
    return str(r.status).upper() in HOLDING_STATUSES


@dataclass(frozen=True, slots=True)
class Capacity:
    total: host.Resources
    used: host.Resources
    reserved: host.Resources
    available: host.Resources


@dataclass(frozen=True, slots=True)
class HostCapacity:
    hostname: str
    zone: str
    state: host.HostState
    schedulable: bool
    capacity: Capacity


@dataclass(frozen=True, slots=True)
class ZoneCapacity:
    zone: str
    host_count: int
    schedulable_hosts: int
    capacity: Capacity


@dataclass(frozen=True, slots=True)
class CapacityReport:
    zones: tuple[ZoneCapacity, ...]
    hosts: tuple[HostCapacity, ...]

    def zone(self, name: str) -> ZoneCapacity | None:
        return next((z for z in self.zones if z.zone == name), None)

    def host(self, hostname: str) -> HostCapacity | None:
        return next((h for h in self.hosts if h.hostname == hostname), None)


Reservations = Iterable[ReservationLike] | Callable[[], Iterable[ReservationLike]]


def hosts(model: ReadModel) -> list[host.Host]:
    """Every registered host, by hostname."""
    found: list[host.Host] = [e.state for _, e in model.of_kind(host.KIND)]
    return sorted(found, key=lambda h: h.hostname)


def of_host(h: host.Host) -> HostCapacity:
    """One host's capacity (see the module docstring)."""
    available = h.free if h.schedulable else host.Resources()
    cap = Capacity(h.total, h.used, host.Resources(), available)
    return HostCapacity(h.hostname, h.spec.zone, h.state, h.schedulable, cap)


def capacity(
    model: ReadModel,
    *,
    reservations: Reservations = (),
    holds: Callable[[ReservationLike], bool] = holds_capacity,
) -> CapacityReport:
    """Capacity of every host and zone in the read model, less what reservations hold."""
    per_host = [of_host(h) for h in hosts(model)]
    reserved = _reserved_by_zone(reservations() if callable(reservations) else reservations, holds)
    names = sorted({h.zone for h in per_host} | set(reserved))
    zones = tuple(
        _zone(z, [h for h in per_host if h.zone == z], reserved.get(z, host.Resources()))
        for z in names
    )
    return CapacityReport(zones, tuple(per_host))


def _reserved_by_zone(
    items: Iterable[ReservationLike], holds: Callable[[ReservationLike], bool]
) -> dict[str, host.Resources]:
    out: dict[str, host.Resources] = {}
    for r in items:
        if holds(r):
            amount = host.Resources(r.vcpus, r.ram_mb, 0, r.instances).clamp()
            out[r.zone] = out.get(r.zone, host.Resources()) + amount
    return out


def _zone(name: str, members: list[HostCapacity], reserved: host.Resources) -> ZoneCapacity:
    zero = host.Resources()
    total = sum((h.capacity.total for h in members), zero)
    used = sum((h.capacity.used for h in members), zero)
    free = sum((h.capacity.available for h in members), zero)
    cap = Capacity(total, used, reserved, (free - reserved).clamp())
    return ZoneCapacity(name, len(members), sum(h.schedulable for h in members), cap)
