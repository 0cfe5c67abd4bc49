"""The window of a process's own appended events (`vim.eventlog.sql._Recent`)."""

from __future__ import annotations

from datetime import UTC, datetime

from vim.eventlog.model import Metadata, RecordedEvent
from vim.eventlog.sql import _Recent


def event(position: int) -> RecordedEvent:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    return RecordedEvent(position, "server-a", position, f"e{position}", "X", 1, {}, Metadata(), at)


def test_keeps_the_last_events_by_position_and_forgets_the_oldest() -> None:
    recent = _Recent(3)
    for p in range(1, 6):
        recent.add(event(p))
    assert [recent.get(p) is not None for p in range(1, 6)] == [False, False, True, True, True]
    recent.add(event(5))  # a repeat is not a second entry: it evicts nothing
    assert recent.get(3) is not None
    recent.add(event(6))
    assert recent.get(3) is None and recent.get(6) == event(6)
