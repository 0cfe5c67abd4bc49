"""Fault facts -> alarm decisions: pure, deterministic, no I/O.

`decide(fact, position, now, book)` returns, per alarm id, the events to append
for one fact at log position `position`. `AlarmBook` is the view it decides on:
the alarms (from the read model, or folded in memory by tests) and the servers'
tenants.

Rules (one active alarm per (managed object, cause); a repeat of the fact while
the alarm is active updates it, the fact that ends the condition clears it):

- HostServiceFailed(s) -> host alarm `service:s`, MAJOR, PROCESSING_ERROR,
  SOFTWARE_PROGRAM_ABNORMALLY_TERMINATED; cleared by HostServiceRecovered(s);
- HostFailureDetected COMPUTE_NODE -> `host-failure:COMPUTE_NODE`, CRITICAL,
  PROCESSING_ERROR, APPLICATION_SUBSYSTEM_FAILURE; HARDWARE ->
  `host-failure:HARDWARE`, CRITICAL, EQUIPMENT, EQUIPMENT_MALFUNCTION; both root
  causes, cleared by HostRecovered; HostFenceConfirmed adds to their details;
- HostFenceFailed -> `fence-failure`, MAJOR, PROCESSING_ERROR,
  UNDERLYING_RESOURCE_UNAVAILABLE; cleared by HostFenceConfirmed or HostRecovered;
- HostSelfFenced -> `self-fenced`, MAJOR, COMMUNICATIONS, LOSS_OF_CONNECTIVITY;
  cleared by HostRecovered;
- ServerWatchdogFired -> server alarm `watchdog`, MAJOR, PROCESSING_ERROR,
  TIMEOUT_EXPIRED; ServerCrashed -> `crash`, CRITICAL, PROCESSING_ERROR,
  SOFTWARE_PROGRAM_ABNORMALLY_TERMINATED; both cleared when the server is
  reported RUNNING;
- ServerRecoveryFailed -> `recovery-failure`, CRITICAL, PROCESSING_ERROR,
  UNDERLYING_RESOURCE_UNAVAILABLE (RESOURCE_AT_OR_NEARING_CAPACITY when no host
  had room); cleared by ServerScheduled or RUNNING;
- ServerSchedulingFailed "no valid host..." -> `capacity`, MAJOR, QOS,
  RESOURCE_AT_OR_NEARING_CAPACITY; cleared by ServerScheduled (a placement);
- ServerMigrationAbandoned -> `migration-abandoned`, MAJOR, PROCESSING_ERROR,
  TIMEOUT_EXPIRED (the source host never released the server); cleared by a
  later ServerMigrationSourceReleased (a source that could release it).

The full table is in docs/ALARMS.md. ServerTerminated clears every active alarm of the server.

Correlation: a server alarm (or a host's fence-failure/self-fenced alarm) raised
while its host has an active host-failure alarm is not a root cause: it lists
the host alarm in `correlatedAlarmIds`, its root-cause faulty resource is the
host, and the host alarm gets an `AlarmCorrelated` listing it.

Alarm ids are `uuid5(object, cause, position)`: a second fault-manager leader
deciding the same fact makes the same id (and the same request id), so it cannot
raise a duplicate.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from vim.domain import alarm as al
from vim.domain import server as srv
from vim.domain.base import DomainEvent
from vim.domain.faults import (
    FailureKind,
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

NAMESPACE = uuid.UUID("6f1c3f0e-4d8a-5b7e-9a51-1f3c2a7e0b11")
HOST_FAILURE = "host-failure"
CAPACITY_PREFIX = "no valid host"

FACT_TYPES: frozenset[str] = frozenset(
    {
        "HostServiceFailed",
        "HostServiceRecovered",
        "HostSelfFenced",
        "HostFailureDetected",
        "HostFenceConfirmed",
        "HostFenceFailed",
        "HostRecovered",
        "ServerWatchdogFired",
        "ServerCrashed",
        "ServerRecoveryFailed",
        "ServerSchedulingFailed",
        "ServerScheduled",
        "ServerStateReported",
        "ServerTerminated",
        "ServerMigrationAbandoned",
        "ServerMigrationSourceReleased",
    }
)
"""Every event type a rule reads (the reactor subscribes to these only)."""

Changes = dict[str, list[DomainEvent]]
"""Alarm id -> events for its stream, in order."""


def alarm_id(object_key: str, cause: str, position: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{object_key}|{cause}|{position}"))


@dataclass(frozen=True, slots=True)
class Spec:
    """What kind of alarm a fact raises."""

    cause: str
    fault_type: al.FaultType
    severity: al.Severity
    event_type: al.EventType
    probable_cause: al.ProbableCause


class AlarmBook:
    """The alarms a decision sees, indexed by (object, cause), plus servers' tenants."""

    def __init__(
        self,
        alarms: Iterable[al.AlarmEntry],
        tenant_of: Callable[[str], str] | Mapping[str, str] | None = None,
    ) -> None:
        self._active: dict[tuple[str, str], al.Alarm] = {}
        self._by_id: dict[str, al.Alarm] = {}
        if tenant_of is None or isinstance(tenant_of, Mapping):
            known = dict(tenant_of or {})
            self._tenant_of: Callable[[str], str] = lambda sid: known.get(sid, "")
        else:
            self._tenant_of = tenant_of
        for a in alarms:
            if isinstance(a, al.Alarm):
                self._by_id[a.alarm_id] = a
                if a.active:
                    self._active[a.key] = a

    def tenant(self, server_id: str) -> str:
        """The server's tenant ("" when unknown here)."""
        return self._tenant_of(server_id)

    def active(self, object_key: str, cause: str) -> al.Alarm | None:
        return self._active.get((object_key, cause))

    def active_of(self, object_key: str, prefix: str = "") -> list[al.Alarm]:
        return sorted(
            (a for (o, c), a in self._active.items() if o == object_key and c.startswith(prefix)),
            key=lambda a: (a.source_position, a.alarm_id),
        )

    def get(self, alarm_id: str) -> al.Alarm | None:
        return self._by_id.get(alarm_id)

    def apply(self, changes: Changes, recorded: object = None) -> None:
        """Fold decided changes in (tests and the reactor's own bookkeeping)."""
        for aid, events in changes.items():
            state: al.AlarmEntry | None = self._by_id.get(aid)
            for e in events:
                state = al.evolve(state, e, recorded)
            if isinstance(state, al.Alarm):
                self._by_id[aid] = state
                self._active.pop(state.key, None)
                if state.active:
                    self._active[state.key] = state
            else:
                self._by_id.pop(aid, None)


def _host_failure(kind: str) -> Spec:
    if kind == FailureKind.HARDWARE:
        return Spec(
            f"{HOST_FAILURE}:{FailureKind.HARDWARE.value}",
            al.FaultType.HOST_HARDWARE_FAILURE,
            al.Severity.CRITICAL,
            al.EventType.EQUIPMENT_ALARM,
            al.ProbableCause.EQUIPMENT_MALFUNCTION,
        )
    return Spec(
        f"{HOST_FAILURE}:{FailureKind.COMPUTE_NODE.value}",
        al.FaultType.COMPUTE_NODE_FAILURE,
        al.Severity.CRITICAL,
        al.EventType.PROCESSING_ERROR_ALARM,
        al.ProbableCause.APPLICATION_SUBSYSTEM_FAILURE,
    )


SERVICE = Spec(
    "service",
    al.FaultType.HOST_SERVICE_FAILURE,
    al.Severity.MAJOR,
    al.EventType.PROCESSING_ERROR_ALARM,
    al.ProbableCause.SOFTWARE_PROGRAM_ABNORMALLY_TERMINATED,
)
FENCE_FAILURE = Spec(
    "fence-failure",
    al.FaultType.HOST_FENCE_FAILURE,
    al.Severity.MAJOR,
    al.EventType.PROCESSING_ERROR_ALARM,
    al.ProbableCause.UNDERLYING_RESOURCE_UNAVAILABLE,
)
SELF_FENCED = Spec(
    "self-fenced",
    al.FaultType.HOST_SELF_FENCED,
    al.Severity.MAJOR,
    al.EventType.COMMUNICATIONS_ALARM,
    al.ProbableCause.LOSS_OF_CONNECTIVITY,
)
WATCHDOG = Spec(
    "watchdog",
    al.FaultType.VM_WATCHDOG,
    al.Severity.MAJOR,
    al.EventType.PROCESSING_ERROR_ALARM,
    al.ProbableCause.TIMEOUT_EXPIRED,
)
CRASH = Spec(
    "crash",
    al.FaultType.VM_CRASH,
    al.Severity.CRITICAL,
    al.EventType.PROCESSING_ERROR_ALARM,
    al.ProbableCause.SOFTWARE_PROGRAM_ABNORMALLY_TERMINATED,
)
RECOVERY_FAILURE = Spec(
    "recovery-failure",
    al.FaultType.VM_RECOVERY_FAILURE,
    al.Severity.CRITICAL,
    al.EventType.PROCESSING_ERROR_ALARM,
    al.ProbableCause.UNDERLYING_RESOURCE_UNAVAILABLE,
)
MIGRATION_ABANDONED = Spec(
    "migration-abandoned",
    al.FaultType.VM_MIGRATION_FAILURE,
    al.Severity.MAJOR,
    al.EventType.PROCESSING_ERROR_ALARM,
    al.ProbableCause.TIMEOUT_EXPIRED,
)
CAPACITY = Spec(
    "capacity",
    al.FaultType.CAPACITY_EXHAUSTION,
    al.Severity.MAJOR,
    al.EventType.QOS_ALARM,
    al.ProbableCause.RESOURCE_AT_OR_NEARING_CAPACITY,
)


@dataclass(frozen=True, slots=True)
class _Fact:
    """One fact's common parts: where it is, when it happened, and what it says."""

    position: int
    now: str
    at: str
    details: list[str]


class _Decider:
    def __init__(self, book: AlarmBook, fact: _Fact) -> None:
        self.book = book
        self.fact = fact
        self.changes: Changes = {}

    def _add(self, aid: str, events: list[DomainEvent]) -> None:
        if events:
            self.changes.setdefault(aid, []).extend(events)

    def raise_or_update(
        self,
        rtype: al.ResourceType,
        object_id: str,
        spec: Spec,
        *,
        hostname: str,
        tenant: str = "",
        correlate_to_host: bool = True,
    ) -> None:
        """Raise (with correlation to the host's failure) or update the active one."""
        okey = al.object_key(rtype, object_id)
        f = self.fact
        current = self.book.active(okey, spec.cause)
        if current is not None:
            self._add(
                current.alarm_id,
                list(al.update(current, spec.severity, f.at, f.details, f.now, f.position)),
            )
            return
        aid = alarm_id(okey, spec.cause, f.position)
        roots = self.book.active_of(al.object_key(al.ResourceType.HOST, hostname), HOST_FAILURE)
        root = roots[-1] if roots and correlate_to_host else None
        faulty = (
            {"resourceType": al.ResourceType.HOST.value, "resourceId": hostname}
            if root is not None
            else {"resourceType": rtype.value, "resourceId": object_id}
        )
        raised = al.AlarmRaised(
            alarm_id=aid,
            managed_object_id=object_id,
            resource_type=rtype.value,
            tenant_id=tenant,
            cause=spec.cause,
            fault_type=spec.fault_type.value,
            probable_cause=spec.probable_cause.value,
            event_type=spec.event_type.value,
            perceived_severity=spec.severity.value,
            event_time=f.at,
            raised_at=f.now,
            root_cause_faulty_resource=faulty,
            is_root_cause=root is None,
            correlated_alarm_ids=[] if root is None else [root.alarm_id],
            fault_details=f.details,
            hostname=hostname,
            source_position=f.position,
        )
        self._add(aid, [raised])
        if root is not None:
            self._add(root.alarm_id, list(al.correlate(root, [aid], f.now, f.position)))

    def clear(self, rtype: al.ResourceType, object_id: str, prefix: str, reason: str) -> None:
        f = self.fact
        for a in self.book.active_of(al.object_key(rtype, object_id), prefix):
            self._add(a.alarm_id, list(al.clear(a, f.at, reason, f.now, f.position)))

    def update_details(self, a: al.Alarm, extra: list[str]) -> None:
        f = self.fact
        details = [*a.fault_details, *extra]
        self._add(
            a.alarm_id,
            list(al.update(a, a.perceived_severity, a.event_time, details, f.now, f.position)),
        )


def decide(fact: DomainEvent, position: int, now: str, book: AlarmBook) -> Changes:
    """The alarm changes one fact makes; empty for a fact that changes nothing."""
    handler = _HANDLERS.get(type(fact).__name__)
    if handler is None:
        return {}
    d = handler(fact, position, now, book)
    return d.changes


def _d(book: AlarmBook, position: int, now: str, at: str, details: list[str]) -> _Decider:
    return _Decider(book, _Fact(position, now, at or now, details))


HOST = al.ResourceType.HOST
SERVER = al.ResourceType.SERVER


def _service_failed(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, HostServiceFailed)
    d = _d(book, pos, now, e.at, [f"{e.service} failed: {e.detail}"])
    spec = Spec(f"service:{e.service}", *_rest(SERVICE))
    d.raise_or_update(HOST, e.hostname, spec, hostname=e.hostname, correlate_to_host=False)
    return d


def _rest(s: Spec) -> tuple[al.FaultType, al.Severity, al.EventType, al.ProbableCause]:
    return s.fault_type, s.severity, s.event_type, s.probable_cause


def _service_recovered(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, HostServiceRecovered)
    d = _d(book, pos, now, e.at, [])
    d.clear(HOST, e.hostname, f"service:{e.service}", f"{e.service} recovered")
    return d


def _failure_detected(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, HostFailureDetected)
    d = _d(book, pos, now, e.at, [f"{e.kind}: {e.detail}", f"lease lost at {e.lease_lost_at}"])
    spec = _host_failure(e.kind)
    d.raise_or_update(HOST, e.hostname, spec, hostname=e.hostname, correlate_to_host=False)
    return d


def _fence_confirmed(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, HostFenceConfirmed)
    d = _d(book, pos, now, e.at, [])
    for a in book.active_of(al.object_key(HOST, e.hostname), HOST_FAILURE):
        d.update_details(a, [f"fenced by {e.method}: {e.detail}"])
    d.clear(HOST, e.hostname, FENCE_FAILURE.cause, f"fenced by {e.method}")
    return d


def _fence_failed(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, HostFenceFailed)
    d = _d(book, pos, now, e.at, [f"fencing by {e.method} failed: {e.reason}"])
    d.raise_or_update(HOST, e.hostname, FENCE_FAILURE, hostname=e.hostname)
    return d


def _self_fenced(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, HostSelfFenced)
    details = [
        f"lease lost at {e.lease_lost_at}",
        f"{e.domains_destroyed} domains destroyed at {e.fenced_at}",
    ]
    d = _d(book, pos, now, e.fenced_at or e.at, details)
    d.raise_or_update(HOST, e.hostname, SELF_FENCED, hostname=e.hostname)
    return d


def _host_recovered(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, HostRecovered)
    d = _d(book, pos, now, e.at, [])
    for prefix in (HOST_FAILURE, FENCE_FAILURE.cause, SELF_FENCED.cause):
        d.clear(HOST, e.hostname, prefix, "host recovered")
    return d


def _watchdog(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, ServerWatchdogFired)
    d = _d(book, pos, now, e.at, [f"guest watchdog fired; hypervisor action {e.action}"])
    tenant = book.tenant(e.server_id)
    d.raise_or_update(SERVER, e.server_id, WATCHDOG, hostname=e.hostname, tenant=tenant)
    return d


def _crashed(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, ServerCrashed)
    d = _d(book, pos, now, e.at, [f"domain stopped on {e.hostname}: {e.reason}"])
    tenant = book.tenant(e.server_id)
    d.raise_or_update(SERVER, e.server_id, CRASH, hostname=e.hostname, tenant=tenant)
    return d


def _recovery_failed(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, ServerRecoveryFailed)
    d = _d(book, pos, now, e.at, [f"not recreated after failure of {e.hostname}: {e.reason}"])
    spec = RECOVERY_FAILURE
    if e.reason.startswith(CAPACITY_PREFIX):
        spec = Spec(
            spec.cause,
            spec.fault_type,
            spec.severity,
            spec.event_type,
            al.ProbableCause.RESOURCE_AT_OR_NEARING_CAPACITY,
        )
    tenant = book.tenant(e.server_id)
    d.raise_or_update(SERVER, e.server_id, spec, hostname=e.hostname, tenant=tenant)
    return d


def _scheduling_failed(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, srv.ServerSchedulingFailed)
    d = _d(book, pos, now, e.failed_at, [e.reason])
    if e.reason.startswith(CAPACITY_PREFIX):
        tenant = book.tenant(e.server_id)
        d.raise_or_update(
            SERVER, e.server_id, CAPACITY, hostname="", tenant=tenant, correlate_to_host=False
        )
    return d


def _scheduled(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, srv.ServerScheduled)
    d = _d(book, pos, now, e.scheduled_at, [])
    d.clear(SERVER, e.server_id, CAPACITY.cause, f"placed on {e.host}")
    d.clear(SERVER, e.server_id, RECOVERY_FAILURE.cause, f"placed on {e.host}")
    return d


def _reported(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, srv.ServerStateReported)
    d = _d(book, pos, now, e.reported_at, [])
    if e.power_state == srv.PowerState.RUNNING:
        for cause in (CRASH.cause, WATCHDOG.cause, RECOVERY_FAILURE.cause):
            d.clear(SERVER, e.server_id, cause, f"running on {e.host}")
    return d


def _migration_abandoned(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, srv.ServerMigrationAbandoned)
    d = _d(book, pos, now, e.abandoned_at, [e.reason])
    tenant = book.tenant(e.server_id)
    d.raise_or_update(
        SERVER, e.server_id, MIGRATION_ABANDONED, hostname=e.source_host, tenant=tenant
    )
    return d


def _source_released(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, srv.ServerMigrationSourceReleased)
    d = _d(book, pos, now, e.released_at, [])
    d.clear(SERVER, e.server_id, MIGRATION_ABANDONED.cause, f"released by {e.host}")
    return d


def _terminated(e: DomainEvent, pos: int, now: str, book: AlarmBook) -> _Decider:
    assert isinstance(e, srv.ServerTerminated)
    d = _d(book, pos, now, e.terminated_at, [])
    d.clear(SERVER, e.server_id, "", "server deleted")
    return d


_HANDLERS: dict[str, Callable[[DomainEvent, int, str, AlarmBook], _Decider]] = {
    "HostServiceFailed": _service_failed,
    "HostServiceRecovered": _service_recovered,
    "HostFailureDetected": _failure_detected,
    "HostFenceConfirmed": _fence_confirmed,
    "HostFenceFailed": _fence_failed,
    "HostSelfFenced": _self_fenced,
    "HostRecovered": _host_recovered,
    "ServerWatchdogFired": _watchdog,
    "ServerCrashed": _crashed,
    "ServerRecoveryFailed": _recovery_failed,
    "ServerSchedulingFailed": _scheduling_failed,
    "ServerScheduled": _scheduled,
    "ServerStateReported": _reported,
    "ServerTerminated": _terminated,
    "ServerMigrationAbandoned": _migration_abandoned,
    "ServerMigrationSourceReleased": _source_released,
}
assert frozenset(_HANDLERS) == FACT_TYPES
