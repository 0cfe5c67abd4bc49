"""Scheduler filters, weighers, priority and planning invariants (no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from vim.domain import affinity, host, reservation
from vim.scheduler import filters
from vim.scheduler.filters import Request
from vim.scheduler.planner import Failure, Placement, Planner, Snapshot, priority_key
from vim.scheduler.weighers import Strategy

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def mk_host(
    name: str,
    *,
    zone: str = "z1",
    vcpus: int = 4,
    ram_mb: int = 8192,
    disk_gb: int = 100,
    state: host.HostState = host.HostState.UP,
    maintenance: bool = False,
    cpu_ratio: float = 4.0,
    max_instances: int = 256,
) -> host.Host:
    spec = host.HostSpec(
        zone, vcpus, ram_mb, disk_gb, cpu_ratio, 1.0, 1.0, max_instances=max_instances
    )
    h = host.evolve(None, host.register(None, name, spec, "t")[0])
    if maintenance:
        for e in host.enable_maintenance(h, name, "", "t"):
            h = host.evolve(h, e)
    elif state is not host.HostState.UP:
        e = host.change_state(h, name, state, "", "t")
        assert e is not None
        h = host.evolve(h, e)
    return h


def req(
    sid: str,
    *,
    vcpus: int = 1,
    ram_mb: int = 512,
    disk_gb: int = 1,
    zone: str = "",
    group: str = "",
    tenant: str = "t1",
    priority: int = 0,
) -> Request:
    return Request(sid, tenant, vcpus, ram_mb, disk_gb, zone, group, priority)


def snap(
    hosts: list[host.Host],
    groups: dict[str, tuple[affinity.Policy, affinity.Scope]] | None = None,
    members: dict[str, list[tuple[str, str]]] | None = None,
    reservations: list[reservation.Reservation] | None = None,
) -> Snapshot:
    gs = {
        gid: (affinity.AffinityGroup(gid, "t1", gid, p, s, "t"), 1)
        for gid, (p, s) in (groups or {}).items()
    }
    return Snapshot({h.hostname: (h, 1) for h in hosts}, gs, members or {}, reservations or [], [])


def place(s: Snapshot, r: Request, strategy: Strategy = Strategy.SPREAD) -> Placement | Failure:
    return Planner(s, strategy).place(r)


def host_of(outcome: Placement | Failure) -> str:
    assert isinstance(outcome, Placement), outcome
    return outcome.hostname


# -- each filter -----------------------------------------------------------------------


def test_state_filter_rejects_maintenance_failed_fenced_and_down() -> None:
    hosts = [
        mk_host("m", maintenance=True),
        mk_host("f", state=host.HostState.FAILED),
        mk_host("x", state=host.HostState.FENCED),
        mk_host("d", state=host.HostState.DOWN),
    ]
    assert [filters.state_filter(h) for h in hosts] == ["maintenance", "failed", "fenced", "down"]
    out = place(snap([*hosts, mk_host("up")]), req("s1"))
    assert host_of(out) == "up"
    out = place(snap(hosts), req("s1"))
    assert isinstance(out, Failure)
    assert out.reason == (
        "no valid host: 1 host rejected by down, 1 by failed, 1 by fenced, 1 by maintenance"
    )


def test_capacity_uses_allocation_ratios() -> None:
    h = mk_host("a", vcpus=4, cpu_ratio=4.0)  # 16 schedulable vCPUs
    assert filters.capacity_filter(h.free, req("s", vcpus=16)) is None
    assert filters.capacity_filter(h.free, req("s", vcpus=17)) == "capacity (vcpus)"
    assert filters.capacity_filter(h.free, req("s", ram_mb=9000)) == "capacity (ram)"
    assert filters.capacity_filter(h.free, req("s", disk_gb=101)) == "capacity (disk)"
    full = mk_host("b", max_instances=0)
    assert filters.capacity_filter(full.free, req("s")) == "capacity (instances)"


def test_capacity_fills_a_host_then_fails_with_reason() -> None:
    planner = Planner(snap([mk_host("a", vcpus=1, cpu_ratio=2.0)]))
    assert host_of(planner.place(req("s1"))) == "a"
    assert host_of(planner.place(req("s2"))) == "a"
    out = planner.place(req("s3"))
    assert isinstance(out, Failure)
    assert out.reason == "no valid host: 1 host rejected by capacity (vcpus)"


def test_error_reason_names_filters_by_count() -> None:
    hosts = [mk_host(f"h{i}", vcpus=1, cpu_ratio=1.0) for i in range(3)]
    out = place(snap([*hosts, mk_host("m", maintenance=True)]), req("s", vcpus=2))
    assert isinstance(out, Failure)
    assert out.reason == "no valid host: 3 hosts rejected by capacity (vcpus), 1 by maintenance"
    out = place(snap([]), req("s"))
    assert isinstance(out, Failure)
    assert out.reason == "no valid host: no hosts are registered"


def test_zone_filter() -> None:
    s = snap([mk_host("a", zone="z1"), mk_host("b", zone="z2")])
    assert host_of(place(s, req("s", zone="z2"))) == "b"
    out = place(s, req("s", zone="z3"))
    assert isinstance(out, Failure)
    assert out.reason == "no valid host: 2 hosts rejected by zone"


def test_affinity_host_and_zone() -> None:
    hosts = [mk_host("a", zone="z1"), mk_host("b", zone="z1"), mk_host("c", zone="z2")]
    host_scope = snap(
        hosts, {"g": (affinity.Policy.AFFINITY, affinity.Scope.HOST)}, {"g": [("b", "z1")]}
    )
    assert host_of(place(host_scope, req("s", group="g"))) == "b"
    zone_scope = snap(
        hosts, {"g": (affinity.Policy.AFFINITY, affinity.Scope.ZONE)}, {"g": [("c", "z2")]}
    )
    assert host_of(place(zone_scope, req("s", group="g"))) == "c"
    out = place(zone_scope, req("s", group="g", zone="z1"))
    assert isinstance(out, Failure)
    assert "2 hosts rejected by affinity" in out.reason


def test_anti_affinity_host_and_zone() -> None:
    hosts = [mk_host("a", zone="z1"), mk_host("b", zone="z1"), mk_host("c", zone="z2")]
    planner = Planner(snap(hosts, {"g": (affinity.Policy.ANTI_AFFINITY, affinity.Scope.HOST)}))
    placed = {host_of(planner.place(req(f"s{i}", group="g"))) for i in range(3)}
    assert placed == {"a", "b", "c"}
    out = planner.place(req("s4", group="g"))
    assert isinstance(out, Failure)
    assert out.reason == "no valid host: 3 hosts rejected by anti-affinity"

    planner = Planner(snap(hosts, {"g": (affinity.Policy.ANTI_AFFINITY, affinity.Scope.ZONE)}))
    zones = {planner.place(req(f"s{i}", group="g")).zone for i in range(2)}  # type: ignore[union-attr]
    assert zones == {"z1", "z2"}
    assert isinstance(planner.place(req("s3", group="g")), Failure)


def _reservation(tenant: str, zone: str, vcpus: int, ram_mb: int = 1) -> reservation.Reservation:
    w = reservation.Window(NOW - timedelta(hours=1), NOW + timedelta(hours=1))
    e = reservation.create(
        "r-" + tenant, tenant, zone, (vcpus, ram_mb, 1), w, NOW - timedelta(hours=2)
    )
    return reservation.evolve(None, e)


def test_reserved_capacity_is_only_for_the_owner() -> None:
    hosts = [mk_host("a", zone="z1", vcpus=4, cpu_ratio=1.0)]
    s = snap(hosts, reservations=[_reservation("owner", "z1", vcpus=3)])
    assert host_of(place(s, req("s", vcpus=1, tenant="other"))) == "a"
    out = place(s, req("s", vcpus=2, tenant="other"))
    assert isinstance(out, Failure)
    assert out.reason == "no valid host: 1 host rejected by reservation"
    assert host_of(place(s, req("s", vcpus=4, tenant="owner"))) == "a"
    # A reservation in another zone does not hold this one.
    s2 = snap(hosts, reservations=[_reservation("owner", "z9", vcpus=4)])
    assert host_of(place(s2, req("s", vcpus=4, tenant="other"))) == "a"


# -- weighers and priority -------------------------------------------------------------


def test_spread_and_pack() -> None:
    busy = host.evolve(mk_host("busy"), host.claim(mk_host("busy"), "x", 8, 4096, 1))
    hosts = [busy, mk_host("empty")]
    assert host_of(place(snap(hosts), req("s"), Strategy.SPREAD)) == "empty"
    assert host_of(place(snap(hosts), req("s"), Strategy.PACK)) == "busy"
    planner = Planner(snap([mk_host("a"), mk_host("b")]), Strategy.SPREAD)
    assert [host_of(planner.place(req(f"s{i}"))) for i in range(4)] == ["a", "b", "a", "b"]
    planner = Planner(snap([mk_host("a"), mk_host("b")]), Strategy.PACK)
    assert {host_of(planner.place(req(f"s{i}"))) for i in range(4)} == {"a"}


def test_priority_orders_requests_and_wins_scarce_capacity() -> None:
    low, high = req("low", vcpus=4), req("high", vcpus=4, priority=10)
    old = Request("old", "t1", 4, 1, 1, priority=10, created_at="2030-01-01T00:00:00.000Z")
    ordered = sorted([low, high, old], key=priority_key)
    assert [r.server_id for r in ordered] == ["high", "old", "low"]
    plan = Planner(snap([mk_host("a", vcpus=1, cpu_ratio=4.0)])).plan(ordered)
    assert [p.request.server_id for p in plan.placements] == ["high"]
    assert {f.request.server_id for f in plan.failures} == {"old", "low"}


def test_versions_chain_within_a_plan() -> None:
    plan = Planner(
        snap([mk_host("a")], {"g": (affinity.Policy.AFFINITY, affinity.Scope.HOST)})
    ).plan([req("s1", group="g"), req("s2", group="g")])
    assert [(p.host_version, p.group_version) for p in plan.placements] == [(1, 1), (2, 2)]


# -- properties ------------------------------------------------------------------------

STATES = [host.HostState.UP] * 4 + [
    host.HostState.FAILED,
    host.HostState.FENCED,
    host.HostState.DOWN,
]
GROUPS = {
    "ah": (affinity.Policy.AFFINITY, affinity.Scope.HOST),
    "az": (affinity.Policy.AFFINITY, affinity.Scope.ZONE),
    "nh": (affinity.Policy.ANTI_AFFINITY, affinity.Scope.HOST),
    "nz": (affinity.Policy.ANTI_AFFINITY, affinity.Scope.ZONE),
}

host_st = st.builds(
    lambda i, zone, vcpus, ram, state, maint, ratio: mk_host(
        f"h{i}",
        zone=zone,
        vcpus=vcpus,
        ram_mb=ram,
        state=state,
        maintenance=maint,
        cpu_ratio=ratio,
        max_instances=8,
    ),
    st.integers(0, 10**6),
    st.sampled_from(["z1", "z2", "z3"]),
    st.integers(1, 8),
    st.integers(512, 8192),
    st.sampled_from(STATES),
    st.booleans(),
    st.sampled_from([1.0, 2.0, 4.0]),
)
req_st = st.builds(
    lambda vcpus, ram, disk, zone, group, prio: (vcpus, ram, disk, zone, group, prio),
    st.integers(1, 8),
    st.integers(128, 4096),
    st.integers(0, 50),
    st.sampled_from(["", "", "z1", "z2"]),
    st.sampled_from(["", "", "ah", "az", "nh", "nz"]),
    st.integers(0, 3),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(host_st, max_size=12, unique_by=lambda h: h.hostname),
    st.lists(req_st, max_size=60),
    st.sampled_from(list(Strategy)),
)
def test_plans_never_overcommit_or_break_groups(
    hosts: list[host.Host], raw: list[tuple[int, int, int, str, str, int]], strategy: Strategy
) -> None:
    requests = [
        Request(f"s{i}", "t1", v, r, d, z, g, p) for i, (v, r, d, z, g, p) in enumerate(raw)
    ]
    requests.sort(key=priority_key)
    plan = Planner(snap(hosts, GROUPS), strategy).plan(requests)
    assert len(plan.placements) + len(plan.failures) == len(requests)
    by_name = {h.hostname: h for h in hosts}
    versions = {h.hostname: 1 for h in hosts}
    members: dict[str, list[tuple[str, str]]] = {g: [] for g in GROUPS}
    for p in plan.placements:
        h = by_name[p.hostname]
        assert h.schedulable, f"placed on {h.state} host (maintenance={h.maintenance})"
        assert p.host_version == versions[p.hostname]
        versions[p.hostname] += 1
        assert not p.request.zone or p.zone == p.request.zone
        by_name[p.hostname] = host.evolve(h, p.claim)
        if p.request.group_id:
            members[p.request.group_id].append((p.hostname, p.zone))
    for h in by_name.values():
        used, total = h.used, h.total
        assert used.vcpus <= total.vcpus and used.ram_mb <= total.ram_mb
        assert used.disk_gb <= total.disk_gb and used.instances <= total.instances
    assert len({p[0] for p in members["ah"]}) <= 1
    assert len({p[1] for p in members["az"]}) <= 1
    assert len({p[0] for p in members["nh"]}) == len(members["nh"])
    assert len({p[1] for p in members["nz"]}) == len(members["nz"])
    for f in plan.failures:
        assert f.reason.startswith("no valid host: ")
