"""Servers and affinity groups as pure decisions: given events, then a command, then events."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from vim.domain import affinity, server
from vim.domain.base import DomainEvent, parse
from vim.domain.server import Operation, PowerState, ServerState
from vim.errors import DomainError, InvalidTransition, NotFound

SID = "11111111-1111-1111-1111-111111111111"
GID = "22222222-2222-2222-2222-222222222222"
T0, T1 = "2024-01-01T00:00:00.000Z", "2024-01-01T00:01:00.000Z"
FLAVOR = server.FlavorCopy("f-1", "m1.small", 2, 2048, 20)
NIC = server.Nic("p-1", "n-1", "fa:16:3e:00:00:01", ("10.0.0.5",))


def allocated(**kw: Any) -> server.ServerAllocated:
    return server.allocate(SID, "t1", "vm", FLAVOR, "img-1", [NIC], now=T0, **kw)


def given(*events: DomainEvent) -> server.Server:
    state: server.Server | None = None
    for e in events:
        state = server.evolve(state, e)
    assert state is not None
    return state


def in_state(state: ServerState, host: str = "cmp-1") -> server.Server:
    """A server placed on `host` whose agent reported `state`."""
    power = {ServerState.STOPPED: PowerState.SHUTDOWN}.get(state, PowerState.RUNNING)
    return given(
        allocated(),
        server.ServerScheduled(SID, host, "z1", T0),
        server.ServerStateReported(SID, host, state.value, power.value, reported_at=T1),
    )


def test_allocate_starts_building_with_a_copy_of_everything() -> None:
    s = given(allocated(metadata={"k": "v"}, priority=700, watchdog=server.Watchdog.RESET))
    assert (s.state, s.task, s.host, s.power_state) == (
        ServerState.BUILDING,
        "SCHEDULING",
        "",
        PowerState.UNSPECIFIED,
    )
    assert s.flavor == FLAVOR and s.nics == (NIC,)
    assert s.quota_amounts() == {"cores": 2, "ram_mb": 2048, "instances": 1, "ports": 1}
    view = s.view()
    assert view["state"] == "SERVER_STATE_BUILDING"
    assert view["watchdog"] == "WATCHDOG_POLICY_RESET"
    assert view["nics"][0]["ipAddresses"] == ["10.0.0.5"]


def test_events_round_trip_through_stored_data() -> None:
    e = allocated(affinity_group_id=GID, live_migration_allowed=False, max_interruption_ms=50)
    again = parse(e.type, e.to_data())
    assert again == e
    assert given(again) == given(e)


def test_priority_out_of_range_is_refused() -> None:
    with pytest.raises(DomainError):
        allocated(priority=1001)


def test_scheduled_then_reported_active() -> None:
    s = given(allocated(), server.ServerScheduled(SID, "cmp-1", "z1", T1))
    assert (s.state, s.host, s.zone, s.task) == (ServerState.BUILDING, "cmp-1", "z1", "SPAWNING")
    assert server.report_state(s, "cmp-1", ServerState.ACTIVE, PowerState.RUNNING, T1) == [
        server.ServerStateReported(SID, "cmp-1", "ACTIVE", "RUNNING", reported_at=T1)
    ]
    s = in_state(ServerState.ACTIVE)
    assert (s.state, s.power_state, s.task) == (ServerState.ACTIVE, PowerState.RUNNING, "")


def test_scheduling_failure_is_error_with_reason() -> None:
    s = given(allocated())
    event = server.scheduling_failed(s, "no valid host: anti-affinity", T1)
    s = server.evolve(s, event)
    assert (s.state, s.fault_reason, s.task) == (
        ServerState.ERROR,
        "no valid host: anti-affinity",
        "",
    )
    with pytest.raises(InvalidTransition):
        server.scheduling_failed(s, "again", T1)


def test_only_the_servers_own_host_may_report() -> None:
    with pytest.raises(DomainError):
        server.report_state(given(allocated()), "cmp-1", ServerState.ACTIVE, PowerState.RUNNING, T1)
    s = in_state(ServerState.ACTIVE)
    with pytest.raises(DomainError):
        server.report_state(s, "cmp-2", ServerState.ACTIVE, PowerState.RUNNING, T1)
    with pytest.raises(DomainError):
        server.report_state(s, "cmp-1", ServerState.DELETED, PowerState.SHUTDOWN, T1)
    assert server.report_state(s, "cmp-1", ServerState.ACTIVE, PowerState.RUNNING, T1) == []


ALL_STATES = [ServerState.BUILDING, *server.REPORTABLE]
ALLOWED = {
    (ServerState.ACTIVE, Operation.STOP): PowerState.SHUTDOWN,
    (ServerState.ACTIVE, Operation.PAUSE): PowerState.PAUSED,
    (ServerState.ACTIVE, Operation.SUSPEND): PowerState.SUSPENDED,
    (ServerState.ACTIVE, Operation.REBOOT): PowerState.RUNNING,
    (ServerState.STOPPED, Operation.START): PowerState.RUNNING,
    (ServerState.PAUSED, Operation.UNPAUSE): PowerState.RUNNING,
    (ServerState.PAUSED, Operation.STOP): PowerState.SHUTDOWN,
    (ServerState.SUSPENDED, Operation.RESUME): PowerState.RUNNING,
    (ServerState.SUSPENDED, Operation.STOP): PowerState.SHUTDOWN,
    (ServerState.ERROR, Operation.REBOOT): PowerState.RUNNING,
    (ServerState.ERROR, Operation.STOP): PowerState.SHUTDOWN,
}


@pytest.mark.parametrize("state", ALL_STATES)
@pytest.mark.parametrize("op", list(Operation))
def test_operation_table(state: ServerState, op: Operation) -> None:
    s = given(allocated()) if state is ServerState.BUILDING else in_state(state)
    wanted = ALLOWED.get((state, op))
    if wanted is None:
        with pytest.raises(InvalidTransition):
            server.operate(s, op, T1)
        return
    event = server.operate(s, op, T1)
    assert event == server.ServerOperationRequested(SID, op.value, wanted.value, T1)
    after = server.evolve(s, event)
    # Only the request is recorded: the state waits for the agent's report.
    assert (after.state, after.desired_power_state, after.task) == (
        state,
        wanted,
        server.TRANSITIONS[op].task,
    )


def test_a_second_operation_waits_for_the_first_unless_in_error() -> None:
    s = in_state(ServerState.ACTIVE)
    s = server.evolve(s, server.operate(s, Operation.STOP, T1))
    with pytest.raises(InvalidTransition, match="busy"):
        server.operate(s, Operation.REBOOT, T1)
    s = server.evolve(s, server.ServerStateReported(SID, "cmp-1", "STOPPED", "SHUTDOWN"))
    assert server.operate(s, Operation.START, T1).desired_power_state == "RUNNING"
    stuck = replace(in_state(ServerState.ERROR), task="REBOOTING")
    assert server.operate(stuck, Operation.REBOOT, T1).operation == "REBOOT"


def test_migration_constraints() -> None:
    s = in_state(ServerState.ACTIVE)
    event = server.migrate(s, server.MigrationType.LIVE, "cmp-2", T1)
    assert event == server.ServerMigrationRequested(SID, "LIVE", "cmp-1", "cmp-2", 0, T1)
    migrating = server.evolve(s, event)
    assert (migrating.task, migrating.migration_target) == ("MIGRATING", "cmp-2")
    # the destination's agent may report once the source released the server
    migrating = server.evolve(migrating, *server.release_source(migrating, "cmp-1", T1))
    landed = server.report_state(migrating, "cmp-2", ServerState.ACTIVE, PowerState.RUNNING, T1)
    assert server.evolve(migrating, landed[0]).host == "cmp-2"
    pinned = given(
        allocated(live_migration_allowed=False, max_interruption_ms=10),
        server.ServerScheduled(SID, "cmp-1", "", T0),
        server.ServerStateReported(SID, "cmp-1", "ACTIVE", "RUNNING"),
    )
    with pytest.raises(server.MigrationNotAllowed):
        server.migrate(pinned, server.MigrationType.LIVE, "", T1)
    offline = server.migrate(pinned, server.MigrationType.OFFLINE, "", T1)
    assert offline.max_interruption_ms == 10
    with pytest.raises(InvalidTransition):
        server.migrate(given(allocated()), server.MigrationType.OFFLINE, "", T1)
    with pytest.raises(InvalidTransition):
        server.migrate(s, server.MigrationType.OFFLINE, "cmp-1", T1)
    with pytest.raises(InvalidTransition):
        server.migrate(in_state(ServerState.SUSPENDED), server.MigrationType.LIVE, "", T1)


def test_update_records_only_changes() -> None:
    s = given(allocated(metadata={"a": "1"}))
    assert server.update(s, "vm", {"a": "1"}, T1) == []
    assert server.update(s, None, None, T1) == []
    [event] = server.update(s, "vm2", None, T1)
    after = server.evolve(s, event)
    assert (after.name, after.metadata, after.updated_at) == ("vm2", {"a": "1"}, T1)


def test_terminate_leaves_a_tombstone_that_ignores_later_events() -> None:
    s = in_state(ServerState.ACTIVE)
    dead = server.evolve(s, server.terminate(s, T1))
    assert dead.state is ServerState.DELETED and dead.nics == s.nics
    for action in (
        lambda: server.terminate(dead, T1),
        lambda: server.operate(dead, Operation.START, T1),
        lambda: server.update(dead, "x", None, T1),
        lambda: server.migrate(dead, server.MigrationType.OFFLINE, "", T1),
    ):
        with pytest.raises(InvalidTransition):
            action()
    late = server.ServerStateReported(SID, "cmp-1", "ACTIVE", "RUNNING")
    assert server.evolve(dead, late) == dead
    assert server.report_state(dead, "cmp-1", ServerState.ACTIVE, PowerState.RUNNING, T1) == []


def test_events_before_allocation_are_refused() -> None:
    with pytest.raises(InvalidTransition):
        server.evolve(None, server.ServerTerminated(SID, T0))


# --- affinity groups ------------------------------------------------------------------------


def group(*events: DomainEvent) -> affinity.AffinityGroup:
    state: affinity.AffinityGroup | None = None
    for e in (
        affinity.create(GID, "t1", "g", affinity.Policy.ANTI_AFFINITY, affinity.Scope.HOST, T0),
        *events,
    ):
        state = affinity.evolve(state, e)
    assert state is not None
    return state


def test_group_membership_and_deletion() -> None:
    g = group()
    assert g.view()["policy"] == "AFFINITY_POLICY_ANTI_AFFINITY"
    joined = affinity.join(g, GID, "t1", SID)
    g = affinity.evolve(g, joined)
    assert g.members == (SID,)
    assert affinity.evolve(g, joined).members == (SID,)  # a repeat is not counted twice
    with pytest.raises(affinity.GroupNotEmpty):
        affinity.delete(g, GID, "t1", T1)
    [left] = affinity.leave(g, GID, SID)
    g = affinity.evolve(g, left)
    assert affinity.leave(g, GID, SID) == []
    deleted = affinity.evolve(g, affinity.delete(g, GID, "t1", T1))
    assert deleted.deleted
    with pytest.raises(NotFound):
        affinity.join(deleted, GID, "t1", SID)
    with pytest.raises(NotFound):
        affinity.delete(deleted, GID, None, T1)


def test_another_tenants_group_is_not_found() -> None:
    g = group()
    with pytest.raises(NotFound):
        affinity.join(g, GID, "t2", SID)
    with pytest.raises(NotFound):
        affinity.delete(g, GID, "t2", T1)
    assert affinity.delete(g, GID, None, T1) == affinity.AffinityGroupDeleted(GID, T1)
