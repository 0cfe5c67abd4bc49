"""The alarm aggregate: raise, update, correlate, clear, acknowledge, age (pure)."""

from __future__ import annotations

import pytest

from vim.domain import alarm as al
from vim.domain.base import DomainEvent, parse
from vim.errors import DomainError, InvalidTransition, NotFound

T0 = "2026-11-22T08:00:00.000Z"
T1 = "2026-11-22T08:01:00.000Z"


def raised(aid: str = "a-1", **kw: object) -> al.AlarmRaised:
    base: dict[str, object] = {
        "alarm_id": aid,
        "managed_object_id": "cmp-1",
        "resource_type": "HOST",
        "tenant_id": "",
        "cause": "host-failure:HARDWARE",
        "fault_type": "HOST_HARDWARE_FAILURE",
        "probable_cause": "EQUIPMENT_MALFUNCTION",
        "event_type": "EQUIPMENT_ALARM",
        "perceived_severity": "CRITICAL",
        "event_time": T0,
        "raised_at": T0,
        "root_cause_faulty_resource": {"resourceType": "HOST", "resourceId": "cmp-1"},
        "source_position": 7,
    }
    return al.AlarmRaised(**(base | kw))  # type: ignore[arg-type]


def fold(*events: DomainEvent) -> al.AlarmEntry:
    state: al.AlarmEntry | None = None
    for e in events:
        # Every event survives its stored form (what the read model folds).
        again = parse(e.type, e.to_data())
        assert again == e
        state = al.evolve(state, e)
    assert state is not None
    return state


def alive(state: al.AlarmEntry) -> al.Alarm:
    assert isinstance(state, al.Alarm)
    return state


def test_raise_fold_and_view_carry_every_ifa005_field() -> None:
    a = alive(fold(raised(fault_details=["lease lost"])))
    assert (a.state, a.ack_state, a.perceived_severity) == (
        al.AlarmState.FIRED,
        al.AckState.UNACKNOWLEDGED,
        al.Severity.CRITICAL,
    )
    view = a.view()
    for key in (
        "alarmId",
        "managedObjectId",
        "rootCauseFaultyResource",
        "alarmRaisedTime",
        "alarmChangedTime",
        "alarmClearedTime",
        "alarmAcknowledgedTime",
        "ackState",
        "state",
        "perceivedSeverity",
        "eventTime",
        "eventType",
        "faultType",
        "probableCause",
        "isRootCause",
        "correlatedAlarmIds",
        "faultDetails",
    ):
        assert key in view
    assert (
        view["state"] == "ALARM_STATE_FIRED" and view["eventType"] == "EVENT_TYPE_EQUIPMENT_ALARM"
    )


def test_update_correlate_clear_and_times() -> None:
    a = alive(fold(raised()))
    up = al.update(a, al.Severity.MAJOR, T1, ["again"], T1, 9)
    a = alive(al.evolve(a, up[0]))
    assert a.state is al.AlarmState.UPDATED and a.changed_at == T1 and a.source_position == 9
    (corr,) = al.correlate(a, ["b", "c"], T1, 10)
    a = alive(al.evolve(a, corr))
    assert a.correlated_alarm_ids == ("b", "c")
    assert al.correlate(a, ["b", a.alarm_id], T1, 11) == []
    (cleared,) = al.clear(a, T1, "host recovered", T1, 12)
    a = alive(al.evolve(a, cleared))
    assert a.state is al.AlarmState.CLEARED and a.cleared_at == T1
    assert a.perceived_severity is al.Severity.CLEARED
    assert al.clear(a, T1, "again", T1, 13) == []
    with pytest.raises(DomainError):
        al.update(a, al.Severity.MAJOR, T1, [], T1, 14)


def test_acknowledge_unknown_is_not_found_and_twice_is_a_no_op() -> None:
    with pytest.raises(NotFound):
        al.acknowledge(None, "nope", "ops", T1)
    a = alive(fold(raised()))
    (ack,) = al.acknowledge(a, a.alarm_id, "ops", T1)
    a = alive(al.evolve(a, ack))
    assert a.ack_state is al.AckState.ACKNOWLEDGED and a.acknowledged_at == T1
    assert al.acknowledge(a, a.alarm_id, "ops", T1) == []


def test_ageing_events_archive_then_purge_to_a_tombstone() -> None:
    a = alive(fold(raised()))
    with pytest.raises(DomainError):
        al.archive(a, T1)
    a = alive(al.evolve(a, al.clear(a, T1, "", T1, 8)[0]))
    a = alive(al.evolve(a, al.archive(a, T1)[0]))
    assert a.archived and al.archive(a, T1) == []
    gone = al.evolve(a, al.purge(a, T1)[0])
    assert gone == al.PurgedAlarm(a.alarm_id, T1)
    with pytest.raises(NotFound):
        al.acknowledge(gone, a.alarm_id, "ops", T1)


def test_raised_twice_and_events_before_raise_are_refused() -> None:
    with pytest.raises(InvalidTransition):
        fold(raised(), raised())
    with pytest.raises(InvalidTransition):
        al.evolve(None, al.AlarmCleared("a-1", T0, T0))
