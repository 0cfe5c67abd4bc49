"""Migrations as a hand-off between two agents: the domain and application rules.

The source host stops and removes its copy and records the release; the target
may start the server (and report it) only after that fact; nobody else may
record it, and a repeat decides nothing (`vim.domain.server`, `vim.app.agents`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

import vim.api.compute  # noqa: F401  (registers the server kind the read model folds)
from vim.app import agents as app
from vim.domain import evacuation as ev
from vim.domain import server
from vim.domain.base import DomainEvent
from vim.domain.server import PowerState, ServerState
from vim.errors import DomainError, PermissionDenied
from vim.eventlog.model import Metadata, RecordedEvent
from vim.projections.readmodel import ReadModel

SID = "11111111-1111-1111-1111-111111111111"
T0, T1, T2 = (f"2024-01-01T00:0{i}:00.000Z" for i in range(3))
FLAVOR = server.FlavorCopy("f-1", "m1.small", 2, 2048, 20)
NIC = server.Nic("p-1", "n-1", "fa:16:3e:00:00:01", ("10.0.0.5",))


def history(target: str = "cmp-2") -> list[DomainEvent]:
    """Allocated, placed on cmp-1, ACTIVE there, then a migration to `target` requested."""
    return [
        server.allocate(SID, "t1", "vm", FLAVOR, "img-1", [NIC], now=T0),
        server.ServerScheduled(SID, "cmp-1", "z1", T0),
        server.ServerStateReported(SID, "cmp-1", "ACTIVE", "RUNNING", reported_at=T0),
        server.ServerMigrationRequested(SID, "OFFLINE", "cmp-1", target, 0, T1),
    ]


def fold(events: Sequence[DomainEvent]) -> server.Server:
    s: server.Server | None = None
    for e in events:
        s = server.evolve(s, e)
    assert s is not None
    return s


def model_of(events: Sequence[DomainEvent]) -> ReadModel:
    model = ReadModel()
    for position, e in enumerate(events, 1):
        model.apply(
            RecordedEvent(
                position,
                server.stream(SID),
                position,
                f"e{position}",
                e.type,
                1,
                e.to_data(),
                Metadata(),
                datetime(2030, 1, 1, tzinfo=UTC),
            )
        )
    return model


def test_release_is_the_sources_alone_and_a_repeat_decides_nothing() -> None:
    s = fold(history())
    assert server.handing_off(s) and not s.migration_released
    with pytest.raises(DomainError):
        server.release_source(s, "cmp-2", T2)  # the target cannot let go of what it lacks
    (released,) = server.release_source(s, "cmp-1", T2)
    assert released == server.ServerMigrationSourceReleased(SID, "cmp-1", T2)
    after = server.evolve(s, released)
    assert after.migration_released and after.migration_released_at == T2
    assert after.host == "cmp-1" and after.task == "MIGRATING"
    assert server.release_source(after, "cmp-1", T2) == []
    still = fold(history()[:3])  # no migration in progress
    with pytest.raises(DomainError, match="not the source"):
        server.release_source(still, "cmp-1", T2)
    no_target = fold([*history()[:3], server.ServerMigrationRequested(SID, "LIVE", "cmp-1")])
    with pytest.raises(DomainError):
        server.release_source(no_target, "cmp-1", T2)  # the scheduler has not picked one


def test_target_speaks_only_after_the_release_and_the_source_never_during_it() -> None:
    s = fold(history())
    running = (ServerState.ACTIVE, PowerState.RUNNING, T2)
    assert server.report_state(s, "cmp-2", *running) == []
    stopped = (ServerState.STOPPED, PowerState.SHUTDOWN, T2)
    assert server.report_state(s, "cmp-1", *stopped) == []  # would abort it otherwise
    released = server.evolve(s, *server.release_source(s, "cmp-1", T2))
    assert server.report_state(released, "cmp-1", *running) == []
    (landed,) = server.report_state(released, "cmp-2", *running)
    done = server.evolve(released, landed)
    assert (done.host, done.task, done.migration_target) == ("cmp-2", "", "")
    assert not done.migration_released and done.state is ServerState.ACTIVE
    again = server.evolve(done, server.migrate(done, server.MigrationType.LIVE, "cmp-1", T2))
    assert not again.migration_released  # a new hand-off starts unreleased


def test_app_refuses_any_host_but_the_source_and_repeats_record_nothing() -> None:
    model = model_of(history())
    with pytest.raises(PermissionDenied):
        app.release_source(model, "cmp-2", SID, T2)  # the target
    with pytest.raises(PermissionDenied):
        app.release_source(model, "cmp-3", SID, T2)  # a stranger
    with pytest.raises(PermissionDenied):
        app.release_source(model, "cmp-1", "22222222-2222-2222-2222-222222222222", T2)
    first = app.release_source(model, "cmp-1", SID, T2)
    assert first.response == {"recorded": True}
    (change,) = first.changes
    assert [e.type for e in change.events] == ["ServerMigrationSourceReleased"]
    model2 = model_of([*history(), *change.events])
    second = app.release_source(model2, "cmp-1", SID, T2)
    assert second.changes == [] and second.response == {"recorded": False}
    settled = model_of(history()[:3])
    with pytest.raises(PermissionDenied):
        app.release_source(settled, "cmp-1", SID, T2)  # not migrating: nothing to release


def test_desired_state_roles_and_the_fingerprint_wakes_the_target() -> None:
    before = model_of(history())
    src, tgt = app.desired(before, "cmp-1"), app.desired(before, "cmp-2")
    (s,) = src.servers
    assert app.migration_role(s, "cmp-1") == "SOURCE" and not app.may_start(s, "cmp-1")
    assert app.migration_role(s, "cmp-2") == "TARGET" and not app.may_start(s, "cmp-2")
    assert tgt.servers == src.servers
    after = model_of([*history(), server.ServerMigrationSourceReleased(SID, "cmp-1", T2)])
    (s2,) = app.desired(after, "cmp-2").servers
    assert app.may_start(s2, "cmp-2") and not app.may_start(s2, "cmp-1")
    assert app.desired(after, "cmp-2").fingerprint() != tgt.fingerprint()
    settled = fold(history()[:3])
    assert app.migration_role(settled, "cmp-1") == "" and app.may_start(settled, "cmp-1")


def at(text: str, seconds: float = 0.0) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) + timedelta(seconds=seconds)


def test_a_migration_its_source_never_releases_is_abandoned_after_the_timeout() -> None:
    s = fold(history())
    assert s.migration_requested_at == T1
    assert ev.migration_stalled(s, at(T1, 59.9), 60) is None  # still in time
    abandoned = ev.migration_stalled(s, at(T1, 60), 60)
    assert abandoned is not None
    assert (abandoned.source_host, abandoned.target_host) == ("cmp-1", "cmp-2")
    assert "cmp-1 did not release" in abandoned.reason
    after = server.evolve(s, abandoned)
    assert (after.host, after.task, after.migration_target) == ("cmp-1", "", "")
    assert not after.migration_released and after.migration_requested_at == ""
    assert not server.handing_off(after)
    # The source owns the server again: its reports count, the old target's do not.
    assert server.report_state(after, "cmp-1", ServerState.ACTIVE, PowerState.SHUTDOWN, T2)
    with pytest.raises(DomainError):
        server.report_state(after, "cmp-2", ServerState.ACTIVE, PowerState.RUNNING, T2)
    assert ev.migration_stalled(after, at(T1, 3600), 60) is None  # nothing left to abandon


def test_a_released_migration_is_never_abandoned() -> None:
    released = fold([*history(), *server.release_source(fold(history()), "cmp-1", T2)])
    assert released.migration_released
    assert ev.migration_stalled(released, at(T1, 3600), 60) is None
    with pytest.raises(DomainError):
        server.abandon_migration(released, "late", T2)


def test_a_request_time_without_zone_is_utc_and_one_unreadable_is_never_timed_out() -> None:
    naive = fold(
        [
            *history()[:-1],
            server.ServerMigrationRequested(
                SID, "OFFLINE", "cmp-1", "cmp-2", 0, "2024-01-01T00:01:00"
            ),
        ]
    )
    assert ev.migration_stalled(naive, at(T1, 59), 60) is None
    assert ev.migration_stalled(naive, at(T1, 61), 60) is not None
    garbled = fold(
        [
            *history()[:-1],
            server.ServerMigrationRequested(SID, "OFFLINE", "cmp-1", "cmp-2", 0, "yesterday"),
        ]
    )
    assert ev.migration_stalled(garbled, at(T1, 3600), 60) is None
