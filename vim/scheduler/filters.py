"""Scheduler filters: may this host take this request? Pure functions, no I/O.

A filter returns None when the host passes, or a short *rejection label* naming
itself (and, for capacity, the resource that is short). Labels are what the
ERROR reason counts: "no valid host: 3 hosts rejected by capacity (vcpus), 1 by
maintenance". `FILTER_ORDER` is the order the planner applies them in; a host is
counted under the first filter that rejects it, so every host is counted once.

Filters:

- state: the host is UP and not in maintenance (labels `maintenance`, `down`,
  `failed`, `fenced`);
- zone: the request names no zone or the host's zone;
- capacity: free vCPUs, RAM, disk (after allocation ratios) and instance slots;
- affinity / anti-affinity: against where the group's members already are (and
  where this plan put them), at HOST or ZONE scope;
- reservation: capacity that active reservations hold in a zone may be used only
  by the reservation owner's tenant (checked per zone, see `ReservationBook`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from vim.domain import affinity, host
from vim.domain.reservation import Reservation

FILTER_ORDER = ("state", "zone", "capacity", "affinity", "anti-affinity", "reservation")
CAPACITY_FIELDS = (("vcpus", "vcpus"), ("ram_mb", "ram"), ("disk_gb", "disk"))


@dataclass(frozen=True, slots=True)
class Request:
    """One BUILDING server to place, as the filters see it."""

    server_id: str
    tenant: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    zone: str = ""
    group_id: str = ""
    priority: int = 0
    created_at: str = ""
    """Tie-break within a priority: older requests first (RFC 3339, sorts as text)."""
    version: int = 1
    """The server stream's version the request was read at."""

    @property
    def amounts(self) -> host.Resources:
        return host.Resources(self.vcpus, self.ram_mb, self.disk_gb, 1)


@dataclass(slots=True)
class GroupPlacements:
    """Where an affinity group's members are: hosts and zones, with member counts."""

    policy: affinity.Policy
    scope: affinity.Scope
    hosts: dict[str, int] = field(default_factory=dict)
    zones: dict[str, int] = field(default_factory=dict)

    def add(self, hostname: str, zone: str) -> None:
        self.hosts[hostname] = self.hosts.get(hostname, 0) + 1
        self.zones[zone] = self.zones.get(zone, 0) + 1

    @property
    def placed(self) -> bool:
        return bool(self.hosts)


def state_filter(h: host.Host) -> str | None:
    """UP and not in maintenance; otherwise the reason (maintenance first)."""
    if h.maintenance or h.state is host.HostState.MAINTENANCE:
        return "maintenance"
    if h.state is not host.HostState.UP:
        return h.state.value.lower()
    return None


def zone_filter(h: host.Host, req: Request) -> str | None:
    """The host is in the requested zone (any zone when none is requested)."""
    return None if not req.zone or h.spec.zone == req.zone else "zone"


def capacity_filter(free: host.Resources, req: Request) -> str | None:
    """Free capacity (after allocation ratios) covers the request; else the first short one."""
    # Spelled out rather than looped over CAPACITY_FIELDS: a failure runs this for every host.
    if req.vcpus > free.vcpus:
        return "capacity (vcpus)"
    if req.ram_mb > free.ram_mb:
        return "capacity (ram)"
    if req.disk_gb > free.disk_gb:
        return "capacity (disk)"
    if free.instances < 1:
        return "capacity (instances)"
    return None


def affinity_filter(hostname: str, zone: str, group: GroupPlacements | None) -> str | None:
    """AFFINITY: together with the members already placed (host or zone); ANTI: apart."""
    if group is None or not group.placed:
        return None
    by_host = group.scope is affinity.Scope.HOST
    occupied = hostname in group.hosts if by_host else zone in group.zones
    if group.policy is affinity.Policy.AFFINITY:
        return None if occupied else "affinity"
    return "anti-affinity" if occupied else None


@dataclass(slots=True)
class ReservationBook:
    """Capacity held aside by active reservations, per zone ("" = any zone), per tenant.

    A tenant may place into a zone only if what stays free there afterwards still
    covers what *other* tenants' reservations hold (vCPUs, RAM, instances). Usage
    against a reservation is not tracked (see `vim.domain.reservation`), so the
    whole reserved amount is kept aside for its owner: conservative, never short.
    """

    held: dict[str, dict[str, host.Resources]] = field(default_factory=dict)

    @classmethod
    def of(cls, reservations: Iterable[Reservation]) -> ReservationBook:
        book = cls()
        for r in reservations:
            per_tenant = book.held.setdefault(r.zone, {})
            amount = host.Resources(r.vcpus, r.ram_mb, 0, r.instances)
            per_tenant[r.tenant] = per_tenant.get(r.tenant, host.Resources()) + amount
        return book

    def others(self, zone: str, tenant: str) -> host.Resources:
        """What reservations of tenants other than `tenant` hold in `zone`."""
        total = host.Resources()
        for owner, amount in self.held.get(zone, {}).items():
            if owner != tenant:
                total = total + amount
        return total

    def allows(
        self, zone: str, tenant: str, req: Request, zone_free: Mapping[str, host.Resources]
    ) -> bool:
        """Whether placing `req` in `zone` leaves others' reservations (zone and global) whole."""
        if not self.held:
            return True
        if zone in self.held and not _covers(
            zone_free.get(zone, host.Resources()), req, self.others(zone, tenant)
        ):
            return False
        if "" in self.held:
            everywhere = sum(zone_free.values(), host.Resources())
            return _covers(everywhere, req, self.others("", tenant))
        return True


def _covers(free: host.Resources, req: Request, held: host.Resources) -> bool:
    left = free - req.amounts
    return (
        left.vcpus >= held.vcpus
        and left.ram_mb >= held.ram_mb
        and (left.instances >= held.instances)
    )


def reason(rejections: Mapping[str, int], total_hosts: int) -> str:
    """The human-readable ERROR reason, most common rejection first."""
    if total_hosts == 0:
        return "no valid host: no hosts are registered"
    parts = sorted(rejections.items(), key=lambda kv: (-kv[1], _rank(kv[0]), kv[0]))
    words = []
    for i, (label, count) in enumerate(parts):
        if i == 0:
            noun = "host" if count == 1 else "hosts"
            words.append(f"{count} {noun} rejected by {label}")
        else:
            words.append(f"{count} by {label}")
    return "no valid host: " + ", ".join(words)


def _rank(label: str) -> int:
    base = label.split(" ", 1)[0]
    if base in FILTER_ORDER:
        return FILTER_ORDER.index(base)
    return 0  # host states (maintenance, failed, ...) are the state filter
