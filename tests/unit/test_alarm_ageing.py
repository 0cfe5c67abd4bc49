"""The ageing policy (pure, with a fake clock): archive after the cleared retention, purge
after the history retention, never age active alarms; the policy is validated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from vim.alarms import ageing, rules
from vim.domain import alarm as al
from vim.domain.faults import HostRecovered, HostServiceFailed, HostServiceRecovered
from vim.domain.reservation import rfc3339
from vim.errors import InvalidInput

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
POLICY = ageing.AgeingPolicy(cleared_retention_s=60.0, history_retention_s=600.0)


def book_at(clock: datetime) -> tuple[rules.AlarmBook, list[str]]:
    """Two alarms raised at T0: libvirtd cleared at `clock`, ovs-vswitchd still active."""
    b = rules.AlarmBook([])
    now = rfc3339(T0)
    ids = []
    for i, fact in enumerate(
        [
            HostServiceFailed("cmp-1", "libvirtd", "x", now),
            HostServiceFailed("cmp-1", "ovs-vswitchd", "x", now),
        ]
    ):
        changes = rules.decide(fact, i + 1, now, b)
        b.apply(changes)
        ids += list(changes)
    b.apply(rules.decide(HostServiceRecovered("cmp-1", "libvirtd", 1, now), 3, rfc3339(clock), b))
    return b, ids


def states(b: rules.AlarmBook, ids: list[str]) -> list[al.AlarmEntry]:
    return [a for a in (b.get(i) for i in ids) if a is not None]


def test_cleared_alarms_archive_then_purge_and_active_ones_never_age() -> None:
    b, (cleared, active) = book_at(T0)
    assert ageing.due(states(b, [cleared, active]), T0 + timedelta(seconds=59), POLICY) == {}
    due = ageing.due(states(b, [cleared, active]), T0 + timedelta(seconds=60), POLICY)
    assert [type(e) for e in due[cleared]] == [al.AlarmArchived] and active not in due
    b.apply(due)
    assert ageing.due(states(b, [cleared, active]), T0 + timedelta(seconds=599), POLICY) == {}
    due = ageing.due(states(b, [cleared, active]), T0 + timedelta(days=365), POLICY)
    assert [type(e) for e in due[cleared]] == [al.AlarmPurged] and active not in due
    b.apply(due)
    assert b.get(cleared) is None and b.get(active) is not None


def test_an_alarm_past_both_retentions_is_archived_and_purged_at_once() -> None:
    b, (cleared, _) = book_at(T0)
    due = ageing.due(states(b, [cleared]), T0 + timedelta(hours=1), POLICY)
    assert [type(e) for e in due[cleared]] == [al.AlarmArchived, al.AlarmPurged]


def test_retention_counts_from_the_clear_not_the_raise() -> None:
    b, (cleared, _) = book_at(T0 + timedelta(seconds=500))
    assert ageing.due(states(b, [cleared]), T0 + timedelta(seconds=559), POLICY) == {}
    assert cleared in ageing.due(states(b, [cleared]), T0 + timedelta(seconds=560), POLICY)


def test_host_recovered_is_unrelated_to_service_alarms() -> None:
    b, (_, active) = book_at(T0)
    assert rules.decide(HostRecovered("cmp-1", rfc3339(T0)), 9, rfc3339(T0), b) == {}
    assert b.get(active) is not None


@pytest.mark.parametrize(("cleared", "history"), [(0.0, 10.0), (-1.0, 10.0), (10.0, 5.0)])
def test_bad_policies_are_refused(cleared: float, history: float) -> None:
    with pytest.raises(InvalidInput):
        ageing.AgeingPolicy(cleared, history)


def test_policy_from_environment() -> None:
    p = ageing.AgeingPolicy.from_env({ageing.ENV_CLEARED: "120", ageing.ENV_HISTORY: "3600"})
    assert (p.cleared_retention_s, p.history_retention_s) == (120.0, 3600.0)
    assert ageing.AgeingPolicy.from_env({}) == ageing.AgeingPolicy()
    with pytest.raises(InvalidInput):
        ageing.AgeingPolicy.from_env({ageing.ENV_CLEARED: "soon"})
