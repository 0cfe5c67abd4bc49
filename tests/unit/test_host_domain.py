"""The host aggregate: given events, a command, the expected events (or error); claims never
over-commit (Hypothesis); capacity per host and zone from a read model, less reservations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vim.app import capacity as cap
from vim.domain import host
from vim.domain.base import DomainEvent, parse
from vim.errors import InvalidTransition, NotFound
from vim.eventlog.model import Metadata, RecordedEvent
from vim.projections.readmodel import ReadModel, register_kind

register_kind(host.KIND, host.evolve)

T0 = "2030-01-01T00:00:00.000Z"
SPEC = host.HostSpec(
    zone="z1", vcpus=4, ram_mb=8192, disk_gb=100, management_address="10.0.0.1", max_instances=10
)


def given_(events: Sequence[DomainEvent]) -> host.Host | None:
    """Fold events as the read model would: through their stored JSON form."""
    state: host.Host | None = None
    for e in events:
        stored = parse(e.type, e.to_data())
        assert stored == e
        state = host.evolve(state, stored)
    return state


def registered(hostname: str = "cmp-01", spec: host.HostSpec = SPEC) -> host.HostRegistered:
    return host.HostRegistered(hostname, **spec.data(), at=T0)


# Registration.


def test_first_registration_is_up_and_ok() -> None:
    events = host.register(None, "cmp-01", SPEC, T0)
    assert events == [registered()]
    h = given_(events)
    assert h is not None
    assert (h.state, h.health, h.maintenance) == (host.HostState.UP, host.Health.OK, False)
    assert h.total == host.Resources(16, 8192, 100, 10)  # cpu ratio 4.0 by default
    assert h.free == h.total


def test_reregistration_same_spec_decides_nothing_changed_spec_reconfigures() -> None:
    h = given_([registered()])
    assert host.register(h, "cmp-01", SPEC, "later") == []
    bigger = host.HostSpec(**(SPEC.data() | {"ram_mb": 16384, "ram_allocation_ratio": 1.5}))
    events = host.register(h, "cmp-01", bigger, "later")
    assert events == [host.HostReconfigured("cmp-01", **bigger.data(), at="later")]
    after = given_([registered(), *events])
    assert after is not None and after.total.ram_mb == 24576 and after.registered_at == T0


def test_reregistration_never_revives_a_fenced_host() -> None:
    fenced = host.HostStateChanged("cmp-01", "FENCED", "UP", "lease lost", T0)
    h = given_([registered(), fenced])
    bigger = host.HostSpec(**(SPEC.data() | {"vcpus": 8}))
    after = given_([registered(), fenced, *host.register(h, "cmp-01", bigger, T0)])
    assert after is not None and after.state is host.HostState.FENCED


# Maintenance and state.


def test_maintenance_on_and_off() -> None:
    h = given_([registered()])
    on = host.enable_maintenance(h, "cmp-01", "firmware", T0)
    assert on == [
        host.HostMaintenanceEnabled("cmp-01", "firmware", T0),
        host.HostStateChanged("cmp-01", "MAINTENANCE", "UP", "firmware", T0),
    ]
    h2 = given_([registered(), *on])
    assert h2 is not None and h2.maintenance and h2.state is host.HostState.MAINTENANCE
    assert not h2.schedulable
    assert host.enable_maintenance(h2, "cmp-01", "again", T0) == []
    off = host.disable_maintenance(h2, "cmp-01", T0)
    assert off == [
        host.HostMaintenanceDisabled("cmp-01", T0),
        host.HostStateChanged("cmp-01", "UP", "MAINTENANCE", "maintenance ended", T0),
    ]
    h3 = given_([registered(), *on, *off])
    assert h3 is not None and h3.state is host.HostState.UP and not h3.maintenance
    assert host.disable_maintenance(h3, "cmp-01", T0) == []


def test_commands_on_an_unknown_host_are_not_found() -> None:
    with pytest.raises(NotFound):
        host.enable_maintenance(None, "nope", "", T0)
    with pytest.raises(NotFound):
        host.disable_maintenance(None, "nope", T0)
    with pytest.raises(NotFound):
        host.claim(None, "s1", 1, 1, 1)
    with pytest.raises(NotFound):
        host.release(None, "s1")


def test_change_state_rules() -> None:
    h = given_([registered()])
    down = host.change_state(h, "cmp-01", host.HostState.DOWN, "lease expired", T0)
    assert down == host.HostStateChanged("cmp-01", "DOWN", "UP", "lease expired", T0)
    assert host.change_state(h, "cmp-01", host.HostState.UP, "", T0) is None
    with pytest.raises(InvalidTransition):
        host.change_state(h, "cmp-01", host.HostState.MAINTENANCE, "", T0)
    in_maint = given_([registered(), *host.enable_maintenance(h, "cmp-01", "", T0)])
    with pytest.raises(InvalidTransition):
        host.change_state(in_maint, "cmp-01", host.HostState.UP, "heartbeat", T0)


def test_health_reports() -> None:
    h = given_([registered()])
    event = host.report_health(h, "cmp-01", host.Health.DEGRADED, ["ovs slow"], T0)
    assert event == host.HostHealthChanged("cmp-01", "DEGRADED", ["ovs slow"], T0)
    h2 = given_([registered(), event])
    assert h2 is not None and h2.health_reasons == ("ovs slow",)
    assert host.report_health(h2, "cmp-01", host.Health.DEGRADED, ["ovs slow"], T0) is None


def test_events_before_registration_are_refused() -> None:
    with pytest.raises(InvalidTransition):
        host.evolve(None, host.HostMaintenanceDisabled("cmp-01", T0))


# Claims.


def test_claim_release_and_no_double_count() -> None:
    h = given_([registered()])
    c = host.claim(h, "s1", 4, 4096, 40)
    assert c == host.HostResourcesClaimed("cmp-01", "s1", 4, 4096, 40)
    h2 = given_([registered(), c, c])  # a replayed claim replaces, never adds
    assert h2 is not None and h2.used == host.Resources(4, 4096, 40, 1)
    resized = host.claim(h2, "s1", 8, 8192, 40)  # replaces the 4096 MB claim, so it fits
    h3 = given_([registered(), c, resized])
    assert h3 is not None and h3.used == host.Resources(8, 8192, 40, 1)
    r = host.release(h3, "s1")
    assert r == host.HostResourcesReleased("cmp-01", "s1", 8, 8192, 40)
    h4 = given_([registered(), c, resized, r])
    assert h4 is not None and h4.used == host.Resources() and h4.claims == {}
    assert host.release(h4, "s1") is None
    assert given_([registered(), r, r]) == given_([registered()])  # unknown release: no-op


@pytest.mark.parametrize(
    ("vcpus", "ram_mb", "disk_gb", "short"),
    [
        (17, 1, 1, "vcpus"),
        (1, 8193, 1, "ram_mb"),
        (1, 1, 101, "disk_gb"),
    ],
)
def test_claim_over_capacity_is_refused(vcpus: int, ram_mb: int, disk_gb: int, short: str) -> None:
    h = given_([registered()])
    with pytest.raises(host.InsufficientCapacity) as err:
        host.claim(h, "s1", vcpus, ram_mb, disk_gb)
    assert [s.split()[0] for s in err.value.shortfalls] == [short]


def test_instance_limit_and_unschedulable_hosts() -> None:
    spec = host.HostSpec(**(SPEC.data() | {"max_instances": 2}))
    base = [registered(spec=spec)]
    events: list[DomainEvent] = [
        host.HostResourcesClaimed("cmp-01", "a", 1, 1, 1),
        host.HostResourcesClaimed("cmp-01", "b", 1, 1, 1),
    ]
    h = given_(base + events)
    with pytest.raises(host.InsufficientCapacity):
        host.claim(h, "c", 1, 1, 1)
    assert host.claim(h, "a", 2, 2, 2).vcpus == 2  # a resize of a held claim still fits
    maint = host.enable_maintenance(h, "cmp-01", "", T0)
    with pytest.raises(host.HostNotSchedulable):
        host.claim(given_(base + events + maint), "a", 1, 1, 1)
    down = host.HostStateChanged("cmp-01", "DOWN", "UP", "", T0)
    with pytest.raises(host.HostNotSchedulable):
        host.claim(given_([*base, down]), "c", 1, 1, 1)


# Hypothesis: claims and releases in any order, with re-registrations that may
# shrink the host, never create or worsen an over-commit.

_SERVERS = st.sampled_from(["s1", "s2", "s3", "s4", "s5"])
_claims = st.builds(
    lambda sid, vcpus, ram, disk: ("claim", sid, vcpus, ram, disk),
    _SERVERS,
    st.integers(0, 12),
    st.integers(0, 9000),
    st.integers(0, 120),
)
_releases = st.builds(lambda sid: ("release", sid, 0, 0, 0), _SERVERS)
_shrinks = st.builds(lambda vcpus: ("shrink", "", vcpus, 0, 0), st.integers(1, 8))
Op = tuple[str, str, int, int, int]


def _step(state: host.Host, op: Op) -> DomainEvent | None:
    kind, sid, a, b, c = op
    if kind == "claim":
        try:
            return host.claim(state, sid, a, b, c)
        except host.InsufficientCapacity:
            return None
    if kind == "release":
        return host.release(state, sid)
    spec = host.HostSpec(**(state.spec.data() | {"vcpus": a}))
    return next(iter(host.register(state, "cmp-01", spec, T0)), None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_claims, _releases, _shrinks), max_size=40))
def test_no_sequence_of_claims_over_commits(ops: list[Op]) -> None:
    events: list[DomainEvent] = [registered()]
    state = given_(events)
    assert state is not None
    for op in ops:
        event = _step(state, op)
        if event is None:
            continue
        events.append(event)
        before, state = state, host.evolve(state, event)
        # usage is exactly the sum of one claim per server
        assert state.used == sum(state.claims.values(), host.Resources())
        assert state.used.instances == len(state.claims)
        if op[0] == "claim":  # a claim never exceeds a total unless it shrinks that usage
            for name in ("vcpus", "ram_mb", "disk_gb", "instances"):
                used, limit = getattr(state.used, name), getattr(state.total, name)
                assert used <= limit or used <= getattr(before.used, name)
    assert given_(events) == state  # replay through stored JSON matches the incremental state


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_claims, _releases), max_size=40))
def test_without_shrinks_usage_never_exceeds_totals(ops: list[Op]) -> None:
    state = given_([registered()])
    assert state is not None
    for op in ops:
        event = _step(state, op)
        if event is not None:
            state = host.evolve(state, event)
        assert (state.total - state.used).clamp() == state.total - state.used


# Capacity from a read model.


@dataclass(frozen=True)
class Reservation:
    zone: str
    vcpus: int
    ram_mb: int
    instances: int
    tenant: str
    status: str


def model_of(*streams: tuple[str, Sequence[DomainEvent]]) -> ReadModel:
    model = ReadModel()
    position = 0
    for hostname, events in streams:
        for version, e in enumerate(events, 1):
            position += 1
            model.apply(
                RecordedEvent(
                    position,
                    host.stream(hostname),
                    version,
                    f"e{position}",
                    e.type,
                    1,
                    e.to_data(),
                    Metadata(),
                    datetime(2030, 1, 1, tzinfo=UTC),
                )
            )
    return model


def test_capacity_per_host_and_zone_less_reservations() -> None:
    z2 = host.HostSpec(**(SPEC.data() | {"zone": "z2"}))
    model = model_of(
        ("a", [registered("a"), host.HostResourcesClaimed("a", "s1", 2, 1024, 10)]),
        ("b", [registered("b"), host.HostMaintenanceEnabled("b", "", T0)]),
        ("c", [registered("c", z2)]),
    )
    reservations = [
        Reservation("z1", 4, 2048, 2, "t1", "ACTIVE"),
        Reservation("z1", 100, 100, 100, "t2", "released"),  # does not hold capacity
        Reservation("z9", 1, 1, 1, "t3", "pending"),  # a zone without hosts is still shown
    ]
    report = cap.capacity(model, reservations=lambda: reservations)
    a, b = report.host("a"), report.host("b")
    assert a is not None and b is not None
    assert a.capacity.used == host.Resources(2, 1024, 10, 1)
    assert a.capacity.available == host.Resources(14, 7168, 90, 9)
    assert b.capacity.available == host.Resources()  # in maintenance: nothing to schedule
    z1 = report.zone("z1")
    assert z1 is not None and (z1.host_count, z1.schedulable_hosts) == (2, 1)
    assert z1.capacity.total == host.Resources(32, 16384, 200, 20)
    assert z1.capacity.reserved == host.Resources(4, 2048, 0, 2)
    assert z1.capacity.available == host.Resources(10, 5120, 90, 7)
    assert [z.zone for z in report.zones] == ["z1", "z2", "z9"]
    z9 = report.zone("z9")
    assert z9 is not None and z9.capacity.available == host.Resources()
    assert cap.capacity(model).zone("z1") is not None
