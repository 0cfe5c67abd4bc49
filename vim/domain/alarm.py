"""Alarms after the ETSI IFA005 fault model (X.733 event types and severities).

One stream per alarm, `alarm-<alarmId>`. An alarm is raised FIRED, changes to
UPDATED when its fault repeats or its details change, and ends CLEARED when the
condition ends; it is acknowledged (by an operator, at most once) independently
of its state. The alarm reactor (`vim.alarms`) decides raises, updates, clears
and correlations from the fault facts; the API decides acknowledgements; the
ageing policy archives cleared alarms (out of the current list, still in the
history) and later purges them (a tombstone in the read model).

Invariants:

- A cleared alarm never changes state again (a repeat of its fault raises a new
  alarm); an archived alarm is cleared, a purged one is archived.
- `alarmChangedTime` is the time of the last change of state, severity,
  details or correlation; `alarmClearedTime` and `alarmAcknowledgedTime` are set
  once.
- `correlatedAlarmIds` only grows; a root-cause alarm lists the alarms it caused,
  and a caused alarm (`isRootCause` false) lists its root cause.
- `sourcePosition` is the log position of the last fact the reactor applied to
  this alarm: the reactor resumes after the greatest one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.errors import DomainError, InvalidTransition, NotFound

KIND = "alarm"


def stream(alarm_id: str) -> str:
    return f"{KIND}-{alarm_id}"


class AlarmState(enum.StrEnum):
    FIRED = "FIRED"
    UPDATED = "UPDATED"
    CLEARED = "CLEARED"


class AckState(enum.StrEnum):
    UNACKNOWLEDGED = "UNACKNOWLEDGED"
    ACKNOWLEDGED = "ACKNOWLEDGED"


class Severity(enum.StrEnum):
    """X.733 perceived severity (IFA005 `perceivedSeverity`), most severe first."""

    CRITICAL = "CRITICAL"
    MAJOR = "MAJOR"
    MINOR = "MINOR"
    WARNING = "WARNING"
    INDETERMINATE = "INDETERMINATE"
    CLEARED = "CLEARED"


class EventType(enum.StrEnum):
    """X.733 event types (IFA005 `eventType`)."""

    COMMUNICATIONS_ALARM = "COMMUNICATIONS_ALARM"
    PROCESSING_ERROR_ALARM = "PROCESSING_ERROR_ALARM"
    ENVIRONMENTAL_ALARM = "ENVIRONMENTAL_ALARM"
    QOS_ALARM = "QOS_ALARM"
    EQUIPMENT_ALARM = "EQUIPMENT_ALARM"


class ResourceType(enum.StrEnum):
    """What the managed object is: a compute host or a server (virtual compute)."""

    HOST = "HOST"
    SERVER = "SERVER"


class FaultType(enum.StrEnum):
    """The VIM's own classification of the fault (IFA005 `faultType`)."""

    HOST_HARDWARE_FAILURE = "HOST_HARDWARE_FAILURE"
    COMPUTE_NODE_FAILURE = "COMPUTE_NODE_FAILURE"
    HOST_SERVICE_FAILURE = "HOST_SERVICE_FAILURE"
    HOST_SELF_FENCED = "HOST_SELF_FENCED"
    HOST_FENCE_FAILURE = "HOST_FENCE_FAILURE"
    VM_WATCHDOG = "VM_WATCHDOG"
    VM_CRASH = "VM_CRASH"
    VM_RECOVERY_FAILURE = "VM_RECOVERY_FAILURE"
    VM_MIGRATION_FAILURE = "VM_MIGRATION_FAILURE"
    CAPACITY_EXHAUSTION = "CAPACITY_EXHAUSTION"


class ProbableCause(enum.StrEnum):
    """X.733 probable causes used here (IFA005 `probableCause`)."""

    EQUIPMENT_MALFUNCTION = "EQUIPMENT_MALFUNCTION"
    APPLICATION_SUBSYSTEM_FAILURE = "APPLICATION_SUBSYSTEM_FAILURE"
    SOFTWARE_PROGRAM_ABNORMALLY_TERMINATED = "SOFTWARE_PROGRAM_ABNORMALLY_TERMINATED"
    LOSS_OF_CONNECTIVITY = "LOSS_OF_CONNECTIVITY"
    UNDERLYING_RESOURCE_UNAVAILABLE = "UNDERLYING_RESOURCE_UNAVAILABLE"
    TIMEOUT_EXPIRED = "TIMEOUT_EXPIRED"
    RESOURCE_AT_OR_NEARING_CAPACITY = "RESOURCE_AT_OR_NEARING_CAPACITY"


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlarmRaised(DomainEvent):
    alarm_id: str
    managed_object_id: str
    resource_type: str  # a ResourceType value
    tenant_id: str  # the server's tenant; "" for host alarms
    cause: str
    """The alarm's key with its object: one active alarm per (object, cause)."""
    fault_type: str
    probable_cause: str
    event_type: str
    perceived_severity: str
    event_time: str
    raised_at: str
    root_cause_faulty_resource: dict[str, str]
    is_root_cause: bool = True
    correlated_alarm_ids: list[str] = field(default_factory=list)
    fault_details: list[str] = field(default_factory=list)
    hostname: str = ""
    source_position: int = 0


@dataclass(frozen=True, slots=True)
class AlarmUpdated(DomainEvent):
    alarm_id: str
    perceived_severity: str
    event_time: str
    changed_at: str
    fault_details: list[str] = field(default_factory=list)
    source_position: int = 0


@dataclass(frozen=True, slots=True)
class AlarmCorrelated(DomainEvent):
    """Alarms linked to this one (caused by it, or its root cause)."""

    alarm_id: str
    correlated_alarm_ids: list[str]
    changed_at: str
    source_position: int = 0


@dataclass(frozen=True, slots=True)
class AlarmCleared(DomainEvent):
    alarm_id: str
    event_time: str
    cleared_at: str
    reason: str = ""
    source_position: int = 0


@dataclass(frozen=True, slots=True)
class AlarmAcknowledged(DomainEvent):
    alarm_id: str
    acknowledged_at: str
    by: str = ""


@dataclass(frozen=True, slots=True)
class AlarmArchived(DomainEvent):
    """Ageing: cleared long enough ago to leave the current list (kept in the history)."""

    alarm_id: str
    archived_at: str


@dataclass(frozen=True, slots=True)
class AlarmPurged(DomainEvent):
    """Ageing: past the history retention; only a tombstone remains."""

    alarm_id: str
    purged_at: str


# --- state -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Alarm:
    alarm_id: str
    managed_object_id: str
    resource_type: ResourceType
    tenant_id: str
    cause: str
    fault_type: str
    probable_cause: str
    event_type: str
    perceived_severity: Severity
    event_time: str
    raised_at: str
    changed_at: str
    root_cause_faulty_resource: dict[str, str]
    is_root_cause: bool
    correlated_alarm_ids: tuple[str, ...]
    fault_details: tuple[str, ...]
    hostname: str
    source_position: int
    state: AlarmState = AlarmState.FIRED
    ack_state: AckState = AckState.UNACKNOWLEDGED
    cleared_at: str = ""
    acknowledged_at: str = ""
    acknowledged_by: str = ""
    archived: bool = False

    @property
    def active(self) -> bool:
        return self.state is not AlarmState.CLEARED

    @property
    def key(self) -> tuple[str, str]:
        """(object, cause): at most one active alarm per key."""
        return object_key(self.resource_type, self.managed_object_id), self.cause

    def view(self) -> dict[str, Any]:
        """The proto3 JSON view (the API's `Alarm` message)."""
        return {
            "alarmId": self.alarm_id,
            "managedObjectId": self.managed_object_id,
            "resourceType": f"RESOURCE_TYPE_{self.resource_type.value}",
            "tenantId": self.tenant_id,
            "hostname": self.hostname,
            "rootCauseFaultyResource": {
                "resourceType": self.root_cause_faulty_resource.get("resourceType", ""),
                "resourceId": self.root_cause_faulty_resource.get("resourceId", ""),
            },
            "alarmRaisedTime": self.raised_at,
            "alarmChangedTime": self.changed_at,
            "alarmClearedTime": self.cleared_at,
            "alarmAcknowledgedTime": self.acknowledged_at,
            "ackState": f"ACK_STATE_{self.ack_state.value}",
            "state": f"ALARM_STATE_{self.state.value}",
            "perceivedSeverity": f"SEVERITY_{self.perceived_severity.value}",
            "eventTime": self.event_time,
            "eventType": f"EVENT_TYPE_{self.event_type}",
            "faultType": self.fault_type,
            "probableCause": self.probable_cause,
            "isRootCause": self.is_root_cause,
            "correlatedAlarmIds": list(self.correlated_alarm_ids),
            "faultDetails": list(self.fault_details),
            "archived": self.archived,
        }


@dataclass(frozen=True, slots=True)
class PurgedAlarm:
    """What remains of a purged alarm in the read model."""

    alarm_id: str
    purged_at: str


AlarmEntry = Alarm | PurgedAlarm


def object_key(resource_type: ResourceType | str, managed_object_id: str) -> str:
    return f"{ResourceType(resource_type).value.lower()}:{managed_object_id}"


def _raised(e: AlarmRaised) -> Alarm:
    return Alarm(
        alarm_id=e.alarm_id,
        managed_object_id=e.managed_object_id,
        resource_type=ResourceType(e.resource_type),
        tenant_id=e.tenant_id,
        cause=e.cause,
        fault_type=e.fault_type,
        probable_cause=e.probable_cause,
        event_type=e.event_type,
        perceived_severity=Severity(e.perceived_severity),
        event_time=e.event_time,
        raised_at=e.raised_at,
        changed_at=e.raised_at,
        root_cause_faulty_resource=dict(e.root_cause_faulty_resource),
        is_root_cause=e.is_root_cause,
        correlated_alarm_ids=tuple(e.correlated_alarm_ids),
        fault_details=tuple(e.fault_details),
        hostname=e.hostname,
        source_position=e.source_position,
    )


def evolve(state: AlarmEntry | None, event: DomainEvent, _recorded: object = None) -> AlarmEntry:
    """Fold one event; see the module docstring for the invariants."""
    if isinstance(event, AlarmRaised):
        if state is not None:
            raise InvalidTransition(f"alarm {event.alarm_id} raised twice")
        return _raised(event)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before AlarmRaised")
    if isinstance(state, PurgedAlarm):
        return state
    match event:
        case AlarmUpdated():
            return replace(
                state,
                state=AlarmState.UPDATED,
                perceived_severity=Severity(event.perceived_severity),
                event_time=event.event_time,
                changed_at=event.changed_at,
                fault_details=tuple(event.fault_details),
                source_position=max(state.source_position, event.source_position),
            )
        case AlarmCorrelated():
            merged = tuple(
                dict.fromkeys([*state.correlated_alarm_ids, *event.correlated_alarm_ids])
            )
            return replace(
                state,
                correlated_alarm_ids=merged,
                changed_at=event.changed_at,
                source_position=max(state.source_position, event.source_position),
            )
        case AlarmCleared():
            return replace(
                state,
                state=AlarmState.CLEARED,
                perceived_severity=Severity.CLEARED,
                event_time=event.event_time or state.event_time,
                changed_at=event.cleared_at,
                cleared_at=event.cleared_at,
                source_position=max(state.source_position, event.source_position),
            )
        case AlarmAcknowledged():
            return replace(
                state,
                ack_state=AckState.ACKNOWLEDGED,
                acknowledged_at=event.acknowledged_at,
                acknowledged_by=event.by,
            )
        case AlarmArchived():
            return replace(state, archived=True)
        case AlarmPurged():
            return PurgedAlarm(state.alarm_id, event.purged_at)
    return state


# --- decisions ---------------------------------------------------------------------------


def _live(state: AlarmEntry | None, alarm_id: str) -> Alarm:
    if state is None or isinstance(state, PurgedAlarm):
        raise NotFound(f"alarm {alarm_id} not found")
    return state


def acknowledge(
    state: AlarmEntry | None, alarm_id: str, by: str, now: str
) -> list[AlarmAcknowledged]:
    """Acknowledge an alarm (active or cleared); nothing if it already is."""
    alarm = _live(state, alarm_id)
    if alarm.ack_state is AckState.ACKNOWLEDGED:
        return []
    return [AlarmAcknowledged(alarm_id, now, by)]


def update(
    alarm: Alarm, severity: Severity, event_time: str, details: list[str], now: str, source: int
) -> list[AlarmUpdated]:
    """The fault repeated or changed; refused on a cleared alarm (it raises a new one)."""
    if not alarm.active:
        raise DomainError(f"alarm {alarm.alarm_id} is cleared; raise a new one")
    return [AlarmUpdated(alarm.alarm_id, severity.value, event_time, now, details, source)]


def clear(alarm: Alarm, event_time: str, reason: str, now: str, source: int) -> list[AlarmCleared]:
    """The condition ended; nothing if the alarm is already cleared."""
    if not alarm.active:
        return []
    return [AlarmCleared(alarm.alarm_id, event_time, now, reason, source)]


def correlate(alarm: Alarm, others: list[str], now: str, source: int) -> list[AlarmCorrelated]:
    """Link `others` to this alarm; nothing when they all already are."""
    new = [a for a in others if a not in alarm.correlated_alarm_ids and a != alarm.alarm_id]
    if not new:
        return []
    return [AlarmCorrelated(alarm.alarm_id, new, now, source)]


def archive(alarm: Alarm, now: str) -> list[AlarmArchived]:
    if alarm.active:
        raise DomainError(f"alarm {alarm.alarm_id} is active; only cleared alarms age")
    return [] if alarm.archived else [AlarmArchived(alarm.alarm_id, now)]


def purge(alarm: Alarm, now: str) -> list[AlarmPurged]:
    if alarm.active:
        raise DomainError(f"alarm {alarm.alarm_id} is active; only cleared alarms age")
    return [AlarmPurged(alarm.alarm_id, now)]
