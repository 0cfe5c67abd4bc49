"""The planner: proposes placements for BUILDING servers from a snapshot. No I/O.

A `Snapshot` is read from the read model at one position: hosts with their
stream versions, affinity groups with theirs, where each group's members are,
the active reservations and the BUILDING servers (as `Request`s, highest
priority first, then oldest). `Planner.plan` places the requests one after
another against its own copy of the hosts, so the second placement of a batch
sees the first one's claim, and returns a `Plan`: for each request either a
`Placement` (host, the claim event made by `host.claim`, and the versions it
was decided against) or a `Failure` with the ERROR reason.

The versions are what makes the plan safe to apply: a placement is valid only
if the server, host and group streams are still at exactly those versions, and
the applier (`vim.scheduler.applying`) commits it in one append that expects
them. A plan is a proposal; the log decides.

Speed: hosts that can take claims are kept in lists sorted by the weigher's key
(one for every zone, one for all), and a placement walks its list best-first and
stops at the first host every filter accepts, so a typical placement looks at a
few hosts, not all of them. Re-sorting after a claim is an O(log n) remove and
insert in a `SortedList`. Only a failure scans every host, to count the
rejections for the reason (O(hosts), by design: the reason counts every host).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from sortedcontainers import SortedList

from vim.app import quotas
from vim.domain import affinity, host, reservation, server
from vim.errors import DomainError
from vim.projections.readmodel import ReadModel, register_kind
from vim.scheduler import filters, weighers
from vim.scheduler.filters import GroupPlacements, Request

# The kinds the scheduler folds; the same functions the API registers, so a
# process that loads both does not register twice (register_kind allows that).
register_kind(host.KIND, host.evolve)
register_kind(server.KIND, server.evolve)
register_kind(affinity.KIND, affinity.evolve)

Key = tuple[float, str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state a plan is decided against, with every stream's version."""

    hosts: dict[str, tuple[host.Host, int]]
    groups: dict[str, tuple[affinity.AffinityGroup, int]]
    members: dict[str, list[tuple[str, str]]]
    """Group id -> (host, zone) of each member already placed."""
    reservations: list[reservation.Reservation]
    requests: list[Request]
    position: int = 0

    @classmethod
    def of(cls, model: ReadModel, now: datetime) -> Snapshot:
        """Read everything the planner needs from the model (O(hosts + servers))."""
        hosts = {e.state.hostname: (e.state, e.version) for _, e in model.of_kind(host.KIND)}
        groups = {
            e.state.group_id: (e.state, e.version)
            for _, e in model.of_kind(affinity.KIND)
            if not e.state.deleted
        }
        members: dict[str, list[tuple[str, str]]] = {}
        requests: list[Request] = []
        for _, e in model.of_kind(server.KIND):
            s: server.Server = e.state
            if s.deleted:
                continue
            if s.host and s.affinity_group_id in groups:
                known = hosts.get(s.host)
                zone = known[0].spec.zone if known else s.zone
                members.setdefault(s.affinity_group_id, []).append((s.host, zone))
            elif s.state is server.ServerState.BUILDING and not s.host:
                requests.append(request_of(s, e.version))
        requests.sort(key=priority_key)
        reservations = quotas.active_reservations(model, now)
        return cls(hosts, groups, members, reservations, requests, model.position)


def request_of(s: server.Server, version: int) -> Request:
    """The placement request for a BUILDING server read at `version`."""
    f = s.flavor
    return Request(
        s.server_id,
        s.tenant_id,
        f.vcpus,
        f.ram_mb,
        f.disk_gb,
        zone=s.zone,
        group_id=s.affinity_group_id,
        priority=s.priority,
        version=version,
        created_at=s.created_at,
    )


def priority_key(r: Request) -> tuple[int, str, str]:
    """Higher priority first, then the oldest, then the id (deterministic)."""
    return (-r.priority, r.created_at, r.server_id)


@dataclass(frozen=True, slots=True)
class Placement:
    """A proposed placement and the versions it was decided against."""

    request: Request
    hostname: str
    zone: str
    host_version: int
    claim: host.HostResourcesClaimed
    group_id: str = ""
    group_version: int | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """A request no host can take, with the reason naming the filters."""

    request: Request
    reason: str


@dataclass(frozen=True, slots=True)
class Plan:
    placements: tuple[Placement, ...] = ()
    failures: tuple[Failure, ...] = ()
    position: int = 0


class _Index:
    """Hostnames sorted by weigher key, best first.

    A `SortedList` (O(log n) insert and remove), so a claim that moves a host in the
    order costs the same at 100k hosts as at 1k; built with one sort.
    """

    __slots__ = ("_building", "keys")

    def __init__(self) -> None:
        self.keys: SortedList[Key] = SortedList()
        self._building: list[Key] = []

    def add(self, key: Key) -> None:
        self.keys.add(key)

    def extend_unsorted(self, key: Key) -> None:
        """Collect without sorting (building the index); `seal()` before use."""
        self._building.append(key)

    def seal(self) -> None:
        self.keys.update(self._building)
        self._building = []

    def remove(self, key: Key) -> None:
        self.keys.discard(key)


class Planner:
    """Places requests against a private, evolving copy of a snapshot."""

    def __init__(
        self, snapshot: Snapshot, strategy: weighers.Strategy = weighers.Strategy.SPREAD
    ) -> None:
        self._strategy = strategy
        self._position = snapshot.position
        self._hosts = {name: h for name, (h, _) in snapshot.hosts.items()}
        self._host_versions = {name: v for name, (_, v) in snapshot.hosts.items()}
        self._group_versions = {gid: v for gid, (_, v) in snapshot.groups.items()}
        self._groups: dict[str, GroupPlacements] = {}
        for gid, (g, _) in snapshot.groups.items():
            placements = GroupPlacements(g.policy, g.scope)
            for hostname, zone in snapshot.members.get(gid, []):
                placements.add(hostname, zone)
            self._groups[gid] = placements
        self._book = filters.ReservationBook.of(snapshot.reservations)
        self._all = _Index()
        self._zones: dict[str, _Index] = {}
        self._zone_free: dict[str, host.Resources] = {}
        self._keys: dict[str, Key] = {}
        self._free: dict[str, host.Resources] = {}
        """Every host's free capacity, kept current (the filters read it on every visit)."""
        self._unschedulable: dict[str, int] = {}
        """State label -> how many hosts it rejects (states do not change within a plan)."""
        self._schedulable: dict[str, list[str]] = {}
        """Zone -> its schedulable hostnames."""
        for h in self._hosts.values():
            label = filters.state_filter(h)
            if label is None:
                self._schedulable.setdefault(h.spec.zone, []).append(h.hostname)
            else:
                self._unschedulable[label] = self._unschedulable.get(label, 0) + 1
            self._enter(h, building=True)
        # One bulk load per list (n log n), not one insert per host.
        for index in (self._all, *self._zones.values()):
            index.seal()

    # -- the index ---------------------------------------------------------------------

    def _enter(self, h: host.Host, *, building: bool = False) -> None:
        free = self._free[h.hostname] = h.free
        if not h.schedulable:
            return
        zone = h.spec.zone
        self._zone_free[zone] = self._zone_free.get(zone, host.Resources()) + free
        if min(free.vcpus, free.ram_mb, free.instances) <= 0:
            return  # nothing fits: keep it out of the walk (a failure scan still counts it)
        key = weighers.sort_key(h, self._strategy)
        self._keys[h.hostname] = key
        zone_index = self._zones.setdefault(zone, _Index())
        if building:
            self._all.extend_unsorted(key)
            zone_index.extend_unsorted(key)
        else:
            self._all.add(key)
            zone_index.add(key)

    def _leave(self, h: host.Host) -> None:
        if not h.schedulable:
            return
        zone = h.spec.zone
        self._zone_free[zone] = self._zone_free[zone] - self._free[h.hostname]
        key = self._keys.pop(h.hostname, None)
        if key is not None:
            self._all.remove(key)
            self._zones[zone].remove(key)

    # -- planning ----------------------------------------------------------------------

    def plan(self, requests: Iterable[Request]) -> Plan:
        """Place each request in turn (callers pass them in priority order)."""
        placements: list[Placement] = []
        failures: list[Failure] = []
        for req in requests:
            outcome = self.place(req)
            if isinstance(outcome, Placement):
                placements.append(outcome)
            else:
                failures.append(outcome)
        return Plan(tuple(placements), tuple(failures), self._position)

    def place(self, req: Request) -> Placement | Failure:
        """The best host for `req` (claimed in this planner's copy), or why there is none."""
        group = self._groups.get(req.group_id) if req.group_id else None
        zone_ok: dict[str, bool] = {}
        for hostname in self._candidates(req, group):
            h = self._hosts[hostname]
            if self._reject(h, req, group, zone_ok) is None:
                try:
                    return self._claim(h, req, group)
                except DomainError:
                    continue  # the domain's own check disagreed: never over-commit
        return Failure(req, self.explain(req))

    def _candidates(self, req: Request, group: GroupPlacements | None) -> Iterator[str]:
        """Hostnames to try, best first, lazily; a superset of the hosts that pass.

        The caller stops at the first fit and claims it before asking again, so
        the index is never changed under a live iteration.
        """
        keys = self._all.keys
        if group is not None and group.placed and group.policy is affinity.Policy.AFFINITY:
            if group.scope is affinity.Scope.HOST:
                names = [n for n in group.hosts if n in self._keys]
                yield from sorted(names, key=self._keys.__getitem__)
                return
            zones = set(group.zones) if not req.zone else {req.zone} & set(group.zones)
            if len(zones) == 1:
                keys = self._zones.get(zones.pop(), _Index()).keys
        elif (
            group is not None
            and group.placed
            and group.policy is affinity.Policy.ANTI_AFFINITY
            and group.scope is affinity.Scope.ZONE
        ):
            # Only the zones the group is not in yet, merged best-first; none left: no walk.
            free = [
                z for z in self._zones if z not in group.zones and (not req.zone or z == req.zone)
            ]
            merged = heapq.merge(*(self._zones[z].keys for z in sorted(free)))
            for _, name in merged:
                yield name
            return
        elif req.zone:
            keys = self._zones.get(req.zone, _Index()).keys
        for _, name in keys:
            yield name

    def _reject(
        self,
        h: host.Host,
        req: Request,
        group: GroupPlacements | None,
        zone_ok: dict[str, bool],
    ) -> str | None:
        """The first filter (in `FILTER_ORDER`) that rejects `h`, or None."""
        label = filters.state_filter(h) or filters.zone_filter(h, req)
        label = label or filters.capacity_filter(self._free[h.hostname], req)
        zone = h.spec.zone
        label = label or filters.affinity_filter(h.hostname, zone, group)
        if label is not None:
            return label
        if zone not in zone_ok:
            zone_ok[zone] = self._book.allows(zone, req.tenant, req, self._zone_free)
        return None if zone_ok[zone] else "reservation"

    def _claim(self, h: host.Host, req: Request, group: GroupPlacements | None) -> Placement:
        claimed = host.claim(h, req.server_id, req.vcpus, req.ram_mb, req.disk_gb)
        version = self._host_versions[h.hostname]
        after = host.evolve(h, claimed)
        self._leave(h)
        self._hosts[h.hostname] = after
        self._host_versions[h.hostname] = version + 1
        self._enter(after)
        zone = h.spec.zone
        group_version: int | None = None
        if group is not None:
            group_version = self._group_versions[req.group_id]
            self._group_versions[req.group_id] = group_version + 1
            group.add(h.hostname, zone)
        return Placement(
            req,
            h.hostname,
            zone,
            version,
            claimed,
            req.group_id if group is not None else "",
            group_version,
        )

    def explain(self, req: Request) -> str:
        """Count, for every host, the first filter rejecting it (the ERROR reason).

        The same verdicts as `_reject`, host by host, but the parts that cannot change
        within a plan are counted in bulk: unschedulable hosts by their state label,
        and every schedulable host of another zone than the requested one as `zone`;
        a ZONE-scope group's verdict is taken once per zone. Still O(hosts): the
        reason counts every host.
        """
        group = self._groups.get(req.group_id) if req.group_id else None
        counts = dict(self._unschedulable)
        free = self._free
        for zone, names in self._schedulable.items():
            if req.zone and zone != req.zone:
                counts["zone"] = counts.get("zone", 0) + len(names)
                continue
            zone_ok: bool | None = None
            by_zone = group is not None and group.scope is affinity.Scope.ZONE
            zone_verdict = filters.affinity_filter("", zone, group) if by_zone else None
            for name in names:
                label = filters.capacity_filter(free[name], req)
                if label is None:
                    label = zone_verdict if by_zone else filters.affinity_filter(name, zone, group)
                if label is None:
                    if zone_ok is None:
                        zone_ok = self._book.allows(zone, req.tenant, req, self._zone_free)
                    label = "claim" if zone_ok else "reservation"
                counts[label] = counts.get(label, 0) + 1
        return filters.reason(counts, len(self._hosts))
