"""Property tests of the scheduler's filters and planner (hypothesis, no I/O).

Random clusters (hosts in every state, allocation ratios, instance limits, claims
already held, hosts shrunk below their usage by a re-registration) and random
affinity groups of every policy and scope with members already placed are fed to
the real `Planner`, one request at a time. The test keeps its own copy of every
host and group, folded only with the domain's `host.evolve`, and checks after
every decision:

- never over-commit: a claim never takes a resource past the host's schedulable
  total (physical x ratio), and never grows one that is already past it;
- never place on a host that is in maintenance, DOWN, FAILED or FENCED, nor
  outside the requested zone;
- never break a group: AFFINITY members share one host (HOST) or zone (ZONE),
  ANTI_AFFINITY members never share one, counting the members placed before;
- never give up while a host could take the request (a `Failure` only when a
  brute-force check of every host finds none), and the reason counts every
  host exactly once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from vim.domain import affinity, host
from vim.errors import DomainError
from vim.scheduler import filters
from vim.scheduler.filters import GroupPlacements, Request
from vim.scheduler.planner import Failure, Placement, Planner, Snapshot
from vim.scheduler.weighers import Strategy

T = "2030-01-01T00:00:00.000Z"
ZONES = ("z1", "z2", "z3")
RESOURCES = ("vcpus", "ram_mb", "disk_gb", "instances")
POLICIES = {
    "ah": (affinity.Policy.AFFINITY, affinity.Scope.HOST),
    "az": (affinity.Policy.AFFINITY, affinity.Scope.ZONE),
    "nh": (affinity.Policy.ANTI_AFFINITY, affinity.Scope.HOST),
    "nz": (affinity.Policy.ANTI_AFFINITY, affinity.Scope.ZONE),
}
NOT_UP = (host.HostState.DOWN, host.HostState.FAILED, host.HostState.FENCED)


@dataclass(frozen=True, slots=True)
class HostDraw:
    zone: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    cpu_ratio: float
    ram_ratio: float
    max_instances: int
    state: str  # "UP", "MAINTENANCE" or a NOT_UP state
    claims: tuple[tuple[int, int, int], ...]
    shrink: bool


host_draw = st.builds(
    HostDraw,
    st.sampled_from(ZONES),
    st.integers(1, 16),
    st.integers(1024, 32768),
    st.integers(10, 400),
    st.sampled_from([1.0, 2.0, 4.0, 16.0]),
    st.sampled_from([1.0, 1.5]),
    st.integers(1, 8),
    st.sampled_from(["UP"] * 5 + ["MAINTENANCE", *(s.value for s in NOT_UP)]),
    st.lists(
        st.tuples(st.integers(1, 8), st.integers(256, 8192), st.integers(0, 80)), max_size=3
    ).map(tuple),
    st.booleans(),
)


def make_host(name: str, d: HostDraw) -> host.Host:
    """Register, claim what fits, change state, maybe shrink: all through the domain."""
    spec = host.HostSpec(
        d.zone,
        d.vcpus,
        d.ram_mb,
        d.disk_gb,
        d.cpu_ratio,
        d.ram_ratio,
        1.0,
        max_instances=d.max_instances,
    )
    h = host.evolve(None, host.register(None, name, spec, T)[0])
    for i, (vcpus, ram, disk) in enumerate(d.claims):
        try:
            h = host.evolve(h, host.claim(h, f"old-{name}-{i}", vcpus, ram, disk))
        except DomainError:
            continue
    if d.shrink and h.claims:  # the agent reported less hardware than is claimed
        smaller = host.HostSpec(**(spec.data() | {"vcpus": 1, "cpu_allocation_ratio": 1.0}))
        for e in host.register(h, name, smaller, T):
            h = host.evolve(h, e)
    if d.state == "MAINTENANCE":
        for e in host.enable_maintenance(h, name, "", T):
            h = host.evolve(h, e)
    elif d.state != "UP":
        changed = host.change_state(h, name, host.HostState(d.state), "", T)
        assert changed is not None
        h = host.evolve(h, changed)
    return h


request_draw = st.tuples(
    st.integers(1, 8),
    st.integers(128, 8192),
    st.integers(0, 60),
    st.sampled_from(["", "", "", *ZONES]),
    st.sampled_from(["", "", "", *POLICIES]),
)


@dataclass(slots=True)
class World:
    """The test's own copy of hosts and group placements, folded independently."""

    hosts: dict[str, host.Host]
    groups: dict[str, GroupPlacements] = field(default_factory=dict)

    def fits(self, h: host.Host, r: Request) -> bool:
        """Brute force: would every filter and the domain's claim accept `h` for `r`?"""
        if not h.schedulable or (r.zone and h.spec.zone != r.zone):
            return False
        if filters.capacity_filter(h.free, r) is not None:
            return False
        g = self.groups.get(r.group_id)
        if filters.affinity_filter(h.hostname, h.spec.zone, g) is not None:
            return False
        try:
            host.claim(h, r.server_id, r.vcpus, r.ram_mb, r.disk_gb)
        except DomainError:
            return False
        return True


def initial_members(
    hosts: dict[str, host.Host], picks: list[int]
) -> dict[str, list[tuple[str, str]]]:
    """Members already placed, consistent with each group's policy."""
    names = sorted(hosts)
    members: dict[str, list[tuple[str, str]]] = {g: [] for g in POLICIES}
    if not names:
        return members
    for gid, (policy, scope) in POLICIES.items():
        for i, pick in enumerate(picks):
            h = hosts[
                names[(pick + (i if policy is affinity.Policy.ANTI_AFFINITY else 0)) % len(names)]
            ]
            if policy is affinity.Policy.AFFINITY and members[gid]:
                first = hosts[members[gid][0][0]]
                h = first if scope is affinity.Scope.HOST else h
                if scope is affinity.Scope.ZONE and h.spec.zone != first.spec.zone:
                    continue
            if policy is affinity.Policy.ANTI_AFFINITY and any(
                (m[0] == h.hostname) if scope is affinity.Scope.HOST else (m[1] == h.spec.zone)
                for m in members[gid]
            ):
                continue
            members[gid].append((h.hostname, h.spec.zone))
    return members


def check_groups(members: dict[str, list[tuple[str, str]]]) -> None:
    for gid, placed in members.items():
        policy, scope = POLICIES[gid]
        where = [m[0] if scope is affinity.Scope.HOST else m[1] for m in placed]
        if policy is affinity.Policy.AFFINITY:
            assert len(set(where)) <= 1, f"{gid} split over {sorted(set(where))}"
        else:
            assert len(set(where)) == len(where), f"{gid} shares {where}"


def check_claim(before: host.Host, after: host.Host, r: Request) -> None:
    total = before.total
    for res in RESOURCES:
        was, now, cap = getattr(before.used, res), getattr(after.used, res), getattr(total, res)
        assert now <= cap or now <= was, f"{before.hostname} {res}: {was} -> {now} > {cap}"


REASON_RE = re.compile(r"(\d+) (?:hosts? )?(?:rejected )?by ([a-z\- ()]+)")


def reason_total(reason: str) -> int:
    assert reason.startswith("no valid host: "), reason
    return sum(int(n) for n, _ in REASON_RE.findall(reason))


@settings(max_examples=250, deadline=None)
@given(
    st.lists(host_draw, max_size=10),
    st.lists(st.integers(0, 50), max_size=3),
    st.lists(request_draw, min_size=1, max_size=40),
    st.sampled_from(list(Strategy)),
)
def test_planner_never_overcommits_breaks_groups_or_uses_unschedulable_hosts(
    drawn: list[HostDraw],
    picks: list[int],
    raw: list[tuple[int, int, int, str, str]],
    strategy: Strategy,
) -> None:
    hosts = {f"h{i}": make_host(f"h{i}", d) for i, d in enumerate(drawn)}
    members = initial_members(hosts, picks)
    groups = {
        gid: (affinity.AffinityGroup(gid, "t1", gid, p, s, T), 1)
        for gid, (p, s) in POLICIES.items()
    }
    snapshot = Snapshot({n: (h, 1) for n, h in hosts.items()}, groups, members, [], [])
    planner = Planner(snapshot, strategy)
    world = World(dict(hosts))
    for gid, (p, s) in POLICIES.items():
        world.groups[gid] = GroupPlacements(p, s)
        for hostname, zone in members[gid]:
            world.groups[gid].add(hostname, zone)

    for i, (vcpus, ram, disk, zone, gid) in enumerate(raw):
        r = Request(f"s{i}", "t1", vcpus, ram, disk, zone, gid)
        outcome = planner.place(r)
        if isinstance(outcome, Failure):
            assert not any(world.fits(h, r) for h in world.hosts.values()), (
                f"gave up on {r} although a host fits: {outcome.reason}"
            )
            assert reason_total(outcome.reason) == len(hosts) or not hosts, outcome.reason
            continue
        assert isinstance(outcome, Placement)
        before = world.hosts[outcome.hostname]
        assert before.schedulable, f"placed on {before.state} (maintenance={before.maintenance})"
        assert filters.state_filter(before) is None
        assert not zone or before.spec.zone == zone
        assert outcome.zone == before.spec.zone
        assert outcome.claim.server_id == r.server_id
        after = host.evolve(before, outcome.claim)
        check_claim(before, after, r)
        world.hosts[outcome.hostname] = after
        if gid:
            world.groups[gid].add(outcome.hostname, outcome.zone)
            members[gid].append((outcome.hostname, outcome.zone))
        check_groups(members)


@settings(max_examples=300, deadline=None)
@given(host_draw, request_draw)
def test_filters_agree_with_the_domain(d: HostDraw, raw: tuple[int, int, int, str, str]) -> None:
    """The state filter is exactly `schedulable`; capacity passing means the claim is safe."""
    h = make_host("h0", d)
    vcpus, ram, disk, zone, _ = raw
    r = Request("s", "t1", vcpus, ram, disk, zone)
    assert (filters.state_filter(h) is None) == h.schedulable
    if h.state in NOT_UP:
        assert filters.state_filter(h) == h.state.value.lower()
    if d.state == "MAINTENANCE":
        assert filters.state_filter(h) == "maintenance"
    assert (filters.zone_filter(h, r) is None) == (not zone or zone == h.spec.zone)
    free = h.free
    fits = all(getattr(r, res) <= getattr(free, res) for res in RESOURCES[:3])
    assert (filters.capacity_filter(free, r) is None) == (fits and free.instances >= 1)
    if h.schedulable and filters.capacity_filter(free, r) is None:
        after = host.evolve(h, host.claim(h, "s", vcpus, ram, disk))
        check_claim(h, after, r)
