"""Pure recovery decisions: classification, the fence state machine, evacuation, flap damping."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from vim.domain import evacuation as ev
from vim.domain import host, server
from vim.domain.base import DomainEvent
from vim.domain.faults import (
    FailureKind,
    HostFailureDetected,
    HostFenceConfirmed,
    HostFenceFailed,
    HostRecovered,
    HostSelfFenced,
    ServerRecoveryFailed,
)
from vim.errors import InvalidTransition

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def fold_host(events: list[DomainEvent], h: host.Host | None = None) -> host.Host:
    for e in events:
        h = host.evolve(h, e)
    assert h is not None
    return h


def a_host(name: str = "cmp-1") -> host.Host:
    spec = host.HostSpec("z1", 16, 65536, 500, bmc_endpoint="redfish+http://bmc/1")
    h = fold_host(host.register(None, name, spec, at(0)))
    for sid in ("s-low", "s-high", "s-mid"):
        h = host.evolve(h, host.claim(h, sid, 2, 2048, 10))
    return h


NICS = (server.Nic("p1", "n1", "fa:16:3e:00:00:01", ("10.0.0.5", "fd00::5")),)


def a_server(sid: str, priority: int, on: str = "cmp-1", created: float = 0) -> server.Server:
    allocated = server.allocate(
        sid,
        "t1",
        f"name-{sid}",
        server.FlavorCopy("f1", "m1", 2, 2048, 10),
        "img-1",
        NICS,
        now=at(created),
        affinity_group_id="g1",
        metadata={"vnf": "upf"},
        priority=priority,
        watchdog=server.Watchdog.RESET,
        live_migration_allowed=False,
        max_interruption_ms=300,
    )
    s = server.evolve(None, allocated)
    s = server.evolve(s, server.schedule(s, on, "z1", at(1)))
    return server.evolve(
        s, server.ServerStateReported(sid, on, "ACTIVE", "RUNNING", reported_at=at(2))
    )


def failed_and_fenced(h: host.Host) -> host.Host:
    h = fold_host(ev.detect(h, FailureKind.HARDWARE, "x", at(10), at(11)), h)
    return fold_host(ev.fence_confirmed(h, "redfish", "off", at(12)), h)


def test_classification_follows_the_oob_probe() -> None:
    assert ev.classify(True) is FailureKind.COMPUTE_NODE
    assert ev.classify(False) is FailureKind.HARDWARE


def test_detect_fails_the_host_once() -> None:
    h = a_host()
    events = ev.detect(h, FailureKind.COMPUTE_NODE, "lease lost", at(10), at(11))
    assert [e.type for e in events] == ["HostFailureDetected", "HostStateChanged"]
    detected = events[0]
    assert isinstance(detected, HostFailureDetected)
    assert (detected.kind, detected.lease_lost_at) == ("COMPUTE_NODE", at(10))
    h = fold_host(events, h)
    assert h.state is host.HostState.FAILED and not h.schedulable
    assert ev.detect(h, FailureKind.COMPUTE_NODE, "again", at(12), at(13)) == []


def test_a_host_in_maintenance_can_fail_too() -> None:
    h = a_host()
    h = fold_host(host.enable_maintenance(h, h.hostname, "disk swap", at(1)), h)
    assert ev.detect(h, FailureKind.HARDWARE, "x", at(2), at(3))


def test_fence_state_machine() -> None:
    h = a_host()
    assert ev.fence_confirmed(h, "redfish", "", at(1)) == []  # only from FAILED
    assert ev.fence_failed(h, "redfish", "", at(1)) == []
    h = fold_host(ev.detect(h, FailureKind.HARDWARE, "x", at(10), at(11)), h)
    failed = ev.fence_failed(h, "redfish", "HTTP 401", at(12))
    assert [e.type for e in failed] == ["HostFenceFailed"]
    h = fold_host(failed, h)
    assert h.state is host.HostState.FAILED  # no recovery without a confirmed fence
    with pytest.raises(InvalidTransition):
        ev.evacuate(h, a_server("s-low", 0), "r", at(13))
    h = fold_host(ev.fence_confirmed(h, "redfish", "Off", at(14)), h)
    assert h.state is host.HostState.FENCED
    assert ev.fence_confirmed(h, "redfish", "", at(15)) == []


def test_fault_history_folds_from_the_host_stream() -> None:
    f = ev.fold_fault(
        [
            HostSelfFenced("cmp-1", 2, at(0), at(1), at(2)),  # an older failure's report
            HostFailureDetected("cmp-1", "HARDWARE", "", at(9), at(10)),
            HostFenceFailed("cmp-1", "redfish", "timeout", at(11)),
        ]
    )
    assert f.phase is ev.FencePhase.FENCE_FAILED and f.fence_attempts == 1
    assert f.self_fenced_at == ""  # reported before this failure: does not count
    f = ev.fold_fault(
        [
            HostFailureDetected("cmp-1", "HARDWARE", "", at(9), at(10)),
            HostSelfFenced("cmp-1", 2, at(9), at(11), at(20)),
            HostFenceConfirmed("cmp-1", "self-fence-timeout", "", at(21)),
            HostRecovered("cmp-1", at(30)),
        ]
    )
    assert f.phase is ev.FencePhase.RECOVERED and f.self_fenced_at == at(11)
    assert f.failures == (at(10),) and f.lease_lost_at == at(9)


def test_evacuation_keeps_the_servers_identity_and_releases_the_claim() -> None:
    h = failed_and_fenced(a_host())
    s = a_server("s-high", 50)
    decided = ev.evacuate(h, s, "host failed", at(20))
    assert set(decided) == {server.stream("s-high"), host.stream("cmp-1")}
    (released,) = decided[host.stream("cmp-1")]
    assert isinstance(released, host.HostResourcesReleased) and released.vcpus == 2
    (requested,) = decided[server.stream("s-high")]
    after = server.evolve(s, requested)
    assert (after.state, after.host, after.task) == (server.ServerState.BUILDING, "", "EVACUATING")
    assert (after.evacuated_from, after.recovery) == ("cmp-1", ev.EVACUATING)
    same = ("server_id", "name", "tenant_id", "flavor", "image_id", "nics", "affinity_group_id")
    same += ("metadata", "priority", "watchdog", "live_migration_allowed", "max_interruption_ms")
    assert all(getattr(after, k) == getattr(s, k) for k in same)
    assert after.nics[0].mac_address == "fa:16:3e:00:00:01"
    # The scheduler places it like any BUILDING server; then it is PLACED.
    placed = server.evolve(after, server.schedule(after, "cmp-2", "z1", at(21)))
    assert placed.host == "cmp-2" and placed.recovery == ev.PLACED
    with pytest.raises(InvalidTransition):
        ev.evacuate(h, placed, "again", at(22))  # no longer on the failed host: never twice


def test_evacuation_order_is_priority_then_age_then_id() -> None:
    servers = [
        a_server("s-low", 0),
        a_server("s-mid-new", 10, created=5),
        a_server("s-high", 100),
        a_server("s-mid-old", 10, created=1),
        a_server("b-mid-old", 10, created=1),
        a_server("elsewhere", 999, on="cmp-2"),
    ]
    order = [s.server_id for s in ev.to_evacuate(a_host(), servers)]
    assert order == ["s-high", "b-mid-old", "s-mid-old", "s-mid-new", "s-low"]


def test_unplaceable_evacuation_is_recorded_once() -> None:
    h = failed_and_fenced(a_host())
    s = a_server("s-low", 0)
    (requested,) = ev.evacuate(h, s, "r", at(20))[server.stream("s-low")]
    s = server.evolve(s, requested)
    assert ev.recovery_failed(s, at(21)) is None  # still waiting for the scheduler
    s = server.evolve(s, server.scheduling_failed(s, "no valid host: 3 anti-affinity", at(22)))
    failed = ev.recovery_failed(s, at(23))
    assert isinstance(failed, ServerRecoveryFailed)
    assert (failed.hostname, failed.reason) == ("cmp-1", "no valid host: 3 anti-affinity")
    s = server.evolve(s, failed)
    assert s.recovery == ev.FAILED and ev.recovery_failed(s, at(24)) is None


def test_reserved_hosts_are_brought_into_service() -> None:
    spare = a_host("spare-1")
    spare = fold_host(host.enable_maintenance(spare, "spare-1", "reserved", at(1)), spare)
    hosts = {"spare-1": spare, "cmp-1": a_host()}
    policy = ev.ZonePolicy(ev.RecoveryPolicy.RESERVED_HOST, ("spare-1", "missing"))
    assert [h.hostname for h in ev.reserved_to_enable(policy, hosts)] == ["spare-1"]
    assert ev.reserved_to_enable(ev.ZonePolicy(), hosts) == []


def test_a_fenced_host_rejoins_unless_it_flaps() -> None:
    flap = ev.FlapPolicy(window_s=600, max_failures=2)
    h = failed_and_fenced(a_host())
    fault = ev.fold_fault(
        [
            HostFailureDetected("cmp-1", "HARDWARE", "", at(9), at(10)),
            HostFenceConfirmed("cmp-1", "redfish", "", at(12)),
        ]
    )
    first = ev.lease_returned(h, fault, T0 + timedelta(seconds=60), flap, at(60))
    assert [e.type for e in first.events] == ["HostRecovered", "HostStateChanged"]
    assert not first.held and fold_host(first.events, h).state is host.HostState.UP
    # A second failure inside the window: held FENCED for an operator.
    twice = ev.fold_fault(
        [
            HostFailureDetected("cmp-1", "HARDWARE", "", at(9), at(10)),
            HostRecovered("cmp-1", at(60)),
            HostFailureDetected("cmp-1", "HARDWARE", "", at(99), at(100)),
            HostFenceConfirmed("cmp-1", "redfish", "", at(102)),
        ]
    )
    held = ev.lease_returned(h, twice, T0 + timedelta(seconds=200), flap, at(200))
    assert held.held and [e.type for e in held.events] == ["HostRecovered"]
    assert fold_host(held.events, h).state is host.HostState.FENCED
    # Outside the window the old failure no longer counts.
    later = ev.lease_returned(h, twice, T0 + timedelta(seconds=650), flap, at(650))
    assert not later.held
    # Once recovered, nothing more is decided (no repeated HostRecovered).
    done = ev.fold_fault([*[HostFailureDetected("cmp-1", "HARDWARE", "", at(9), at(10))]])
    assert ev.lease_returned(h, done, T0, flap, at(1)).events == []  # fence not decided yet


def test_a_host_whose_fence_failed_may_rejoin_when_it_comes_back() -> None:
    h = a_host()
    h = fold_host(ev.detect(h, FailureKind.COMPUTE_NODE, "x", at(10), at(11)), h)
    fault = ev.fold_fault(
        [
            HostFailureDetected("cmp-1", "COMPUTE_NODE", "", at(10), at(11)),
            HostFenceFailed("cmp-1", "redfish", "401", at(12)),
        ]
    )
    rejoin = ev.lease_returned(h, fault, T0 + timedelta(seconds=20), ev.FlapPolicy(), at(20))
    assert fold_host(rejoin.events, h).state is host.HostState.UP


def a_movable(
    sid: str, priority: int, group: str = "", live: bool = True, max_ms: int = 0
) -> server.Server:
    s = a_server(sid, priority)
    return replace(
        s, affinity_group_id=group, live_migration_allowed=live, max_interruption_ms=max_ms
    )


def test_drain_picks_live_cold_or_blocked_and_limits_each_group() -> None:
    h = a_host()
    assert ev.drain_step(h, [a_movable("a", 1)], {}, ev.DrainPolicy()) == []  # not in maintenance
    h = fold_host(host.enable_maintenance(h, h.hostname, "bios", at(1)), h)
    servers = [
        a_movable("g-a", 9, "g1"),
        a_movable("g-b", 8, "g1"),
        a_movable("g-c", 7, "g2"),
        a_movable("cold", 6, live=False),
        a_movable("stuck", 5, live=False, max_ms=300),
        replace(a_movable("busy", 4), task="REBOOTING"),
    ]
    steps = ev.drain_step(h, servers, {"g2": 1}, ev.DrainPolicy(max_per_group=1))
    summary = [
        (x.server.server_id, x.kind.value if isinstance(x, ev.Move) else "blocked") for x in steps
    ]
    # g-b waits for g-a (K=1), g-c waits for g2's migration in flight elsewhere; busy is left.
    assert summary == [("g-a", "LIVE"), ("cold", "OFFLINE"), ("stuck", "blocked")]
    blocked = steps[-1]
    assert isinstance(blocked, ev.Blocked) and "300 ms" in blocked.reason
    two = ev.drain_step(h, servers, {}, ev.DrainPolicy(max_per_group=2))
    assert [x.server.server_id for x in two][:3] == ["g-a", "g-b", "g-c"]


def test_departed_claims_and_the_empty_host() -> None:
    h = a_host()  # claims for s-low, s-high, s-mid
    h = fold_host(host.enable_maintenance(h, h.hostname, "bios", at(1)), h)
    moved = replace(a_server("s-low", 0), host="cmp-2")
    migrating = replace(a_server("s-mid", 0), task="MIGRATING", migration_target="cmp-3")
    here = a_server("s-high", 0)
    releases = ev.departed_claims(h, {"s-low": moved, "s-mid": migrating, "s-high": here})
    assert [(e.type, e.server_id) for e in releases] == [("HostResourcesReleased", "s-low")]  # type: ignore[attr-defined]
    assert ev.drained(h, [here], at(2)) is None
    empty = replace(h, claims={}, used=host.Resources())
    drained = ev.drained(empty, [], at(3))
    assert isinstance(drained, ev.HostDrained) and drained.hostname == "cmp-1"
    assert ev.fold_fault([drained]).drained
    assert not ev.fold_fault(
        [drained, *host.enable_maintenance(a_host(), "cmp-1", "", at(4))]
    ).drained


def test_a_server_caught_mid_migration_gives_back_its_destination_claim() -> None:
    h = failed_and_fenced(a_host())
    dest = a_host("cmp-2")
    dest = host.evolve(dest, host.claim(dest, "s-low", 2, 2048, 10))
    s = replace(a_server("s-low", 0), task="MIGRATING", migration_target="cmp-2")
    decided = ev.evacuate(h, s, "host failed", at(20), dest)
    assert set(decided) == {server.stream("s-low"), host.stream("cmp-1"), host.stream("cmp-2")}
    after = server.evolve(s, decided[server.stream("s-low")][0])
    assert after.migration_target == "" and after.task == "EVACUATING"
    assert ev.evacuate(h, a_server("s-mid", 0), "r", at(21), dest).keys() == {
        server.stream("s-mid"),
        host.stream("cmp-1"),
    }  # no migration: the other host is not touched


def test_a_destination_failing_after_the_source_released_takes_the_server_with_it() -> None:
    src = a_host()
    dest = a_host("cmp-2")
    dest = host.evolve(dest, host.claim(dest, "s-low", 2, 2048, 10))
    moving = replace(a_server("s-low", 0), task="MIGRATING", migration_target="cmp-2")
    released = server.evolve(moving, server.release_source(moving, "cmp-1", at(15))[0])
    # Before the release the source runs it; after, only the destination may.
    assert ev.runs_on(moving) == "cmp-1" and ev.runs_on(released) == "cmp-2"
    dead_dest = failed_and_fenced(dest)
    assert [s.server_id for s in ev.to_evacuate(dead_dest, [released])] == ["s-low"]
    assert ev.to_evacuate(failed_and_fenced(src), [released]) == []  # nothing there
    decided = ev.evacuate(dead_dest, released, "host failed", at(20), src)
    # Both claims go back: the dead destination's and the source's.
    assert set(decided) == {server.stream("s-low"), host.stream("cmp-1"), host.stream("cmp-2")}
    after = server.evolve(released, decided[server.stream("s-low")][0])
    assert after.host == "" and after.migration_target == "" and not after.migration_released
    assert after.recovery == "EVACUATING" and after.evacuated_from == "cmp-2"
    with pytest.raises(InvalidTransition):  # the source has no copy to evacuate
        ev.evacuate(failed_and_fenced(src), released, "r", at(21), dead_dest)
