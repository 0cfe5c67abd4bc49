"""The ageing policy of alarm records: how long cleared alarms stay, how long history does.

- A cleared alarm stays in the current alarm list for `cleared_retention_s` after
  it was cleared; then it is archived (`AlarmArchived`): gone from the default
  `GetAlarmList`, still returned by `GetAlarm` and by a list that asks for the
  history.
- It stays in the history for `history_retention_s` after it was cleared; then it
  is purged (`AlarmPurged`): only a tombstone remains in the read model, and the
  API answers NOT_FOUND.
- Active alarms never age, whatever their age.

Ageing is decided by a pure function of the alarms and a clock (`due`), and is
recorded as events, so a read model rebuilt by replay is identical to the live
one (the clock is read once, by whoever appends). The event log itself is the
audit trail and keeps every event.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from vim.domain import alarm as al
from vim.domain.base import DomainEvent
from vim.domain.reservation import parse_time, rfc3339
from vim.errors import FieldViolation, InvalidInput

DAY_S = 86_400.0
ENV_CLEARED = "VIM_ALARM_CLEARED_RETENTION_S"
ENV_HISTORY = "VIM_ALARM_HISTORY_RETENTION_S"


@dataclass(frozen=True, slots=True)
class AgeingPolicy:
    """How long cleared alarms stay listed, and how long they stay in the history."""

    cleared_retention_s: float = DAY_S
    history_retention_s: float = 30 * DAY_S

    def __post_init__(self) -> None:
        bad: list[FieldViolation] = []
        if not self.cleared_retention_s > 0:
            bad.append(FieldViolation("cleared_retention_s", "must be positive"))
        if not self.history_retention_s >= self.cleared_retention_s:
            bad.append(
                FieldViolation("history_retention_s", "must be at least cleared_retention_s")
            )
        if bad:
            raise InvalidInput("invalid alarm ageing policy", bad)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AgeingPolicy:
        """The defaults, overridden by VIM_ALARM_CLEARED/HISTORY_RETENTION_S (seconds)."""
        env = os.environ if env is None else env
        base = cls()
        try:
            cleared = float(env.get(ENV_CLEARED, base.cleared_retention_s))
            history = float(env.get(ENV_HISTORY, max(base.history_retention_s, cleared)))
        except ValueError:
            raise InvalidInput(
                "alarm retention must be a number of seconds",
                [FieldViolation(ENV_CLEARED, "seconds"), FieldViolation(ENV_HISTORY, "seconds")],
            ) from None
        return cls(cleared, history)


def due(
    alarms: Iterable[al.AlarmEntry], now: datetime, policy: AgeingPolicy
) -> dict[str, list[DomainEvent]]:
    """Per alarm id, the ageing events that are due at `now` (archive, then purge)."""
    out: dict[str, list[DomainEvent]] = {}
    stamp = rfc3339(now)
    for a in alarms:
        if not isinstance(a, al.Alarm) or a.active or not a.cleared_at:
            continue
        age = now - parse_time(a.cleared_at)
        events: list[DomainEvent] = []
        if age >= timedelta(seconds=policy.cleared_retention_s):
            events += al.archive(a, stamp)
        if age >= timedelta(seconds=policy.history_retention_s):
            events += al.purge(a, stamp)
        if events:
            out[a.alarm_id] = events
    return out
