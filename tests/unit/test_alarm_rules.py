"""Alarm rules, table-driven: every fact -> its alarm; repeats, clears, correlation, ids."""

from __future__ import annotations

import pytest

from vim.alarms import rules
from vim.domain import alarm as al
from vim.domain import server as srv
from vim.domain.base import DomainEvent
from vim.domain.faults import (
    HostFailureDetected,
    HostFenceConfirmed,
    HostFenceFailed,
    HostRecovered,
    HostSelfFenced,
    HostServiceFailed,
    HostServiceRecovered,
    ServerCrashed,
    ServerRecoveryFailed,
    ServerWatchdogFired,
)

AT = "2026-11-22T08:00:00.000Z"
NOW = "2026-11-22T08:00:01.000Z"
SID = "5f0c1d8e-0000-4000-8000-000000000001"
TENANTS = {SID: "acme"}
NO_HOST = "no valid host: 3 hosts rejected by RamFilter"


class Run:
    """Feeds facts at increasing positions through the rules into an in-memory book."""

    def __init__(self) -> None:
        self.book = rules.AlarmBook([], TENANTS)
        self.position = 0
        self.alarms: dict[str, al.Alarm] = {}

    def fact(self, e: DomainEvent) -> rules.Changes:
        self.position += 1
        changes = rules.decide(e, self.position, NOW, self.book)
        self.book.apply(changes)
        for aid in changes:
            got = self.book.get(aid)
            assert got is not None
            self.alarms[aid] = got
        return changes

    def only(self, changes: rules.Changes) -> al.Alarm:
        assert len(changes) == 1, changes
        return self.alarms[next(iter(changes))]


CRASH = ServerCrashed(SID, "cmp-1", "killed", AT)
FACTS: list[tuple[DomainEvent, tuple[str, str, str, str, str, str, str, str]]] = [
    (
        HostServiceFailed("cmp-1", "libvirtd", "exited 9", AT),
        (
            "HOST",
            "cmp-1",
            "",
            "HOST_SERVICE_FAILURE",
            "MAJOR",
            "PROCESSING_ERROR_ALARM",
            "SOFTWARE_PROGRAM_ABNORMALLY_TERMINATED",
            "service:libvirtd",
        ),
    ),
    (
        HostServiceFailed("cmp-1", "ovs-vswitchd", "exited 9", AT),
        (
            "HOST",
            "cmp-1",
            "",
            "HOST_SERVICE_FAILURE",
            "MAJOR",
            "PROCESSING_ERROR_ALARM",
            "SOFTWARE_PROGRAM_ABNORMALLY_TERMINATED",
            "service:ovs-vswitchd",
        ),
    ),
    (
        HostFailureDetected("cmp-1", "COMPUTE_NODE", "agent down, BMC answers", AT, AT),
        (
            "HOST",
            "cmp-1",
            "",
            "COMPUTE_NODE_FAILURE",
            "CRITICAL",
            "PROCESSING_ERROR_ALARM",
            "APPLICATION_SUBSYSTEM_FAILURE",
            "host-failure:COMPUTE_NODE",
        ),
    ),
    (
        HostFailureDetected("cmp-1", "HARDWARE", "BMC silent", AT, AT),
        (
            "HOST",
            "cmp-1",
            "",
            "HOST_HARDWARE_FAILURE",
            "CRITICAL",
            "EQUIPMENT_ALARM",
            "EQUIPMENT_MALFUNCTION",
            "host-failure:HARDWARE",
        ),
    ),
    (
        HostFenceFailed("cmp-1", "redfish", "timeout", AT),
        (
            "HOST",
            "cmp-1",
            "",
            "HOST_FENCE_FAILURE",
            "MAJOR",
            "PROCESSING_ERROR_ALARM",
            "UNDERLYING_RESOURCE_UNAVAILABLE",
            "fence-failure",
        ),
    ),
    (
        HostSelfFenced("cmp-1", 3, AT, AT, AT),
        (
            "HOST",
            "cmp-1",
            "",
            "HOST_SELF_FENCED",
            "MAJOR",
            "COMMUNICATIONS_ALARM",
            "LOSS_OF_CONNECTIVITY",
            "self-fenced",
        ),
    ),
    (
        ServerWatchdogFired(SID, "cmp-1", "RESET", AT),
        (
            "SERVER",
            SID,
            "acme",
            "VM_WATCHDOG",
            "MAJOR",
            "PROCESSING_ERROR_ALARM",
            "TIMEOUT_EXPIRED",
            "watchdog",
        ),
    ),
    (
        CRASH,
        (
            "SERVER",
            SID,
            "acme",
            "VM_CRASH",
            "CRITICAL",
            "PROCESSING_ERROR_ALARM",
            "SOFTWARE_PROGRAM_ABNORMALLY_TERMINATED",
            "crash",
        ),
    ),
    (
        ServerRecoveryFailed(SID, "cmp-1", "image gone", AT),
        (
            "SERVER",
            SID,
            "acme",
            "VM_RECOVERY_FAILURE",
            "CRITICAL",
            "PROCESSING_ERROR_ALARM",
            "UNDERLYING_RESOURCE_UNAVAILABLE",
            "recovery-failure",
        ),
    ),
    (
        ServerRecoveryFailed(SID, "cmp-1", NO_HOST, AT),
        (
            "SERVER",
            SID,
            "acme",
            "VM_RECOVERY_FAILURE",
            "CRITICAL",
            "PROCESSING_ERROR_ALARM",
            "RESOURCE_AT_OR_NEARING_CAPACITY",
            "recovery-failure",
        ),
    ),
    (
        srv.ServerSchedulingFailed(SID, NO_HOST, AT),
        (
            "SERVER",
            SID,
            "acme",
            "CAPACITY_EXHAUSTION",
            "MAJOR",
            "QOS_ALARM",
            "RESOURCE_AT_OR_NEARING_CAPACITY",
            "capacity",
        ),
    ),
    (
        srv.ServerMigrationAbandoned(SID, "cmp-1", "cmp-2", "not released in 300 s", AT),
        (
            "SERVER",
            SID,
            "acme",
            "VM_MIGRATION_FAILURE",
            "MAJOR",
            "PROCESSING_ERROR_ALARM",
            "TIMEOUT_EXPIRED",
            "migration-abandoned",
        ),
    ),
]


@pytest.mark.parametrize(("fact", "expected"), FACTS, ids=[f.type for f, _ in FACTS])
def test_each_fact_raises_its_alarm(
    fact: DomainEvent, expected: tuple[str, str, str, str, str, str, str, str]
) -> None:
    run = Run()
    a = run.only(run.fact(fact))
    got = (
        a.resource_type.value,
        a.managed_object_id,
        a.tenant_id,
        a.fault_type,
        a.perceived_severity.value,
        a.event_type,
        a.probable_cause,
        a.cause,
    )
    assert got == expected
    assert (a.state, a.is_root_cause, a.event_time, a.raised_at) == (
        al.AlarmState.FIRED,
        True,
        AT,
        NOW,
    )
    assert a.source_position == 1 and a.fault_details
    # The same fact again (still active): one alarm, updated, not a second one.
    again = run.fact(fact)
    assert list(again) == [a.alarm_id]
    assert run.alarms[a.alarm_id].state is al.AlarmState.UPDATED


CLEARS: list[tuple[DomainEvent, DomainEvent]] = [
    (
        HostServiceFailed("cmp-1", "libvirtd", "x", AT),
        HostServiceRecovered("cmp-1", "libvirtd", 1, AT),
    ),
    (HostFailureDetected("cmp-1", "HARDWARE", "x", AT, AT), HostRecovered("cmp-1", AT)),
    (HostFailureDetected("cmp-1", "COMPUTE_NODE", "x", AT, AT), HostRecovered("cmp-1", AT)),
    (HostFenceFailed("cmp-1", "redfish", "x", AT), HostFenceConfirmed("cmp-1", "redfish", "", AT)),
    (HostSelfFenced("cmp-1", 1, AT, AT, AT), HostRecovered("cmp-1", AT)),
    (CRASH, srv.ServerStateReported(SID, "cmp-2", "ACTIVE", "RUNNING", reported_at=AT)),
    (
        ServerWatchdogFired(SID, "cmp-1", "RESET", AT),
        srv.ServerStateReported(SID, "cmp-1", "ACTIVE", "RUNNING", reported_at=AT),
    ),
    (ServerRecoveryFailed(SID, "cmp-1", NO_HOST, AT), srv.ServerScheduled(SID, "cmp-3")),
    (srv.ServerSchedulingFailed(SID, NO_HOST, AT), srv.ServerScheduled(SID, "cmp-3")),
    (CRASH, srv.ServerTerminated(SID, AT)),
    (
        srv.ServerMigrationAbandoned(SID, "cmp-1", "cmp-2", "not released", AT),
        srv.ServerMigrationSourceReleased(SID, "cmp-1", AT),
    ),
]


@pytest.mark.parametrize(("fact", "ending"), CLEARS, ids=[f"{f.type}-{e.type}" for f, e in CLEARS])
def test_the_ending_fact_clears_and_a_repeat_raises_a_new_alarm(
    fact: DomainEvent, ending: DomainEvent
) -> None:
    run = Run()
    first = run.only(run.fact(fact))
    cleared = run.only(run.fact(ending))
    assert cleared.alarm_id == first.alarm_id and cleared.state is al.AlarmState.CLEARED
    assert run.fact(ending) == {}  # nothing left to clear
    second = run.only(run.fact(fact))
    assert second.alarm_id != first.alarm_id and second.state is al.AlarmState.FIRED


def test_unrelated_recoveries_and_non_capacity_failures_change_nothing() -> None:
    run = Run()
    run.fact(HostServiceFailed("cmp-1", "libvirtd", "x", AT))
    assert run.fact(HostServiceRecovered("cmp-1", "ovs-vswitchd", 1, AT)) == {}
    assert run.fact(HostServiceRecovered("cmp-2", "libvirtd", 1, AT)) == {}
    assert run.fact(srv.ServerSchedulingFailed(SID, "image not found", AT)) == {}
    assert run.fact(srv.ServerStateReported(SID, "cmp-1", "STOPPED", "SHUTDOWN")) == {}


def test_vm_alarms_on_a_failed_host_correlate_to_the_host_root_cause() -> None:
    run = Run()
    host = run.only(run.fact(HostFailureDetected("cmp-1", "HARDWARE", "BMC silent", AT, AT)))
    changes = run.fact(ServerRecoveryFailed(SID, "cmp-1", NO_HOST, AT))
    assert set(changes) == {host.alarm_id, *changes}
    (vm_id,) = set(changes) - {host.alarm_id}
    vm = run.alarms[vm_id]
    assert not vm.is_root_cause and vm.correlated_alarm_ids == (host.alarm_id,)
    assert vm.root_cause_faulty_resource == {"resourceType": "HOST", "resourceId": "cmp-1"}
    assert run.alarms[host.alarm_id].correlated_alarm_ids == (vm_id,)
    fence = run.fact(HostFenceFailed("cmp-1", "redfish", "timeout", AT))
    (fence_id,) = set(fence) - {host.alarm_id}
    assert run.alarms[fence_id].correlated_alarm_ids == (host.alarm_id,)
    assert run.alarms[host.alarm_id].correlated_alarm_ids == (vm_id, fence_id)
    # A crash on another host is its own root cause.
    other = run.only(run.fact(ServerCrashed("x-2", "cmp-2", "oom", AT)))
    assert other.is_root_cause and other.correlated_alarm_ids == ()


def test_fence_confirmed_updates_the_host_failure_alarm() -> None:
    run = Run()
    host = run.only(run.fact(HostFailureDetected("cmp-1", "HARDWARE", "BMC silent", AT, AT)))
    changes = run.fact(HostFenceConfirmed("cmp-1", "redfish", "powered off", AT))
    assert list(changes) == [host.alarm_id]
    updated = run.alarms[host.alarm_id]
    assert updated.state is al.AlarmState.UPDATED
    assert updated.fault_details[-1] == "fenced by redfish: powered off"


def test_decisions_are_deterministic_so_a_second_leader_makes_the_same_ids() -> None:
    one, two = Run(), Run()
    for r in (one, two):
        r.fact(HostFailureDetected("cmp-1", "HARDWARE", "x", AT, AT))
    assert one.fact(CRASH) == two.fact(CRASH)
    assert rules.alarm_id("host:cmp-1", "crash", 3) == rules.alarm_id("host:cmp-1", "crash", 3)
    assert rules.alarm_id("host:cmp-1", "crash", 3) != rules.alarm_id("host:cmp-1", "crash", 4)
