"""The plan applier: checks each placement against the newest versions and commits it.

Like Nomad's plan applier, the planner only proposes; this step decides what is
recorded. Each placement is one atomic append over:

- `server-<id>`: `ServerScheduled`, expecting the version the request was read at
  (a server is scheduled at most once, and never after it was deleted);
- `host-<name>`: `HostResourcesClaimed`, expecting the host version planned
  against (so two claims decided on the same free capacity cannot both land:
  never an over-commit, whatever number of schedulers run);
- `affinity-<group>` when the server is in a group: `AffinityMemberAdded` again
  (a no-op for the group's state, but it moves the version), expecting the
  group's version, so two placements into one group serialise and an
  (anti-)affinity decision is never made on a stale view of the group.

Before the round trip, a placement whose streams have moved since the plan (in
the read model, or through this applier's own earlier appends) is not sent: it
is returned for re-planning. Placements of one plan chain: the second claim on a
host expects the version the first one makes. If the first did not land, the
stream's version may still reach that number through someone else's write, with
a different state behind it, so once a placement is not committed every later
placement that touches one of its streams is re-planned too (`_broken`); that is
what keeps version equality meaning "the state the planner assumed".

A `VersionConflict` from the log means the same: the read model is given a
moment to catch up with the winner's write, and the request is re-planned by
the caller (bounded there). A failure
(`ServerSchedulingFailed`, ERROR) expects only the server's version.

Every append carries the caller's metadata (the fencing role and token of the
scheduler's term); `FencedOut` propagates: this process is no longer the leader
and must stop at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from vim.domain import affinity, host, server
from vim.domain.base import DomainEvent
from vim.errors import DomainError, EventLogUnavailable, Unavailable, VersionConflict
from vim.eventlog.model import AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.store import EventLog
from vim.projections.readmodel import ReadModel
from vim.scheduler.filters import Request
from vim.scheduler.planner import Failure, Placement, Plan

log = logging.getLogger(__name__)

CATCH_UP_S = 2.0
"""How long to wait for the read model to see a conflicting write before re-planning."""


@dataclass(slots=True)
class Applied:
    """What one `apply` did."""

    placed: list[Placement] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    replan: list[Request] = field(default_factory=list)
    conflicts: int = 0
    """Appends the log refused with a version conflict."""
    stale: int = 0
    """Placements not sent because a stream had already moved."""
    position: int = 0
    """The last position this applier wrote (0 if none)."""


class Applier:
    """Commits plans against one event log, checking versions in one read model."""

    def __init__(
        self,
        log: EventLog,
        model: ReadModel,
        *,
        metadata: Callable[[], Metadata],
        now: Callable[[], str],
        may_act: Callable[[], bool] = lambda: True,
    ) -> None:
        self._log = log
        self._model = model
        self._metadata = metadata
        self._now = now
        self._may_act = may_act
        self._known: dict[str, int] = {}
        self._broken: set[str] = set()

    def _newest(self, stream_id: str) -> int:
        return max(self._model.version(stream_id), self._known.get(stream_id, 0))

    async def apply(self, plan: Plan) -> Applied:
        """Commit what is still valid, one append per placement; see the module docstring."""
        done = Applied()
        self._known = {}
        self._broken = set()
        for p in plan.placements:
            if not self._may_act():
                done.replan.append(p.request)
                continue
            await self._place(p, done)
        for f in plan.failures:
            if self._may_act():
                await self._fail(f, done)
        return done

    def _expected(self, p: Placement) -> list[tuple[str, int]]:
        expected = [
            (server.stream(p.request.server_id), p.request.version),
            (host.stream(p.hostname), p.host_version),
        ]
        if p.group_id and p.group_version is not None:
            expected.append((affinity.stream(p.group_id), p.group_version))
        return expected

    async def _place(self, p: Placement, done: Applied) -> None:
        expected = self._expected(p)
        sids = {sid for sid, _ in expected}
        if sids & self._broken or any(self._newest(sid) != v for sid, v in expected):
            done.stale += 1
            done.replan.append(p.request)
            self._broken |= sids
            return
        s = self._server(p.request.server_id)
        try:
            if s is None:
                raise DomainError("server unknown here")
            scheduled = server.schedule(s, p.hostname, p.zone, self._now())
        except DomainError:
            self._broken |= sids
            return  # no longer BUILDING (deleted, placed): nothing to do
        events: dict[str, list[DomainEvent]] = {
            expected[0][0]: [scheduled],
            expected[1][0]: [p.claim],
        }
        if len(expected) > 2:
            events[expected[2][0]] = [affinity.AffinityMemberAdded(p.group_id, p.request.server_id)]
        if await self._append(expected, events, done):
            done.placed.append(p)
        else:
            done.replan.append(p.request)
            self._broken |= sids

    async def _fail(self, f: Failure, done: Applied) -> None:
        sid = server.stream(f.request.server_id)
        if self._newest(sid) != f.request.version:
            return  # the server moved on (placed by another scheduler, deleted)
        s = self._server(f.request.server_id)
        if s is None or s.state is not server.ServerState.BUILDING or s.host:
            return
        failed = server.scheduling_failed(s, f.reason, self._now())
        if await self._append([(sid, f.request.version)], {sid: [failed]}, done):
            done.failed.append(f)

    def _server(self, server_id: str) -> server.Server | None:
        entry = self._model.get(server.stream(server_id))
        return None if entry is None else entry.state

    async def _append(
        self, expected: list[tuple[str, int]], events: dict[str, list[DomainEvent]], done: Applied
    ) -> bool:
        """One atomic append; False on a version conflict or an unknown outcome."""
        request = AppendRequest(
            streams=[
                StreamAppend(sid, version, [_encode(e) for e in events[sid]])
                for sid, version in expected
            ],
            metadata=self._metadata(),
        )
        try:
            result = await self._log.append(request)
        except VersionConflict as conflict:
            done.conflicts += 1
            await self._catch_up(conflict.stream_id, conflict.actual)
            return False
        except EventLogUnavailable:
            # Outcome unknown: the next snapshot shows whether it landed, and a
            # repeat would expect the same versions, so it can never land twice.
            log.warning("scheduler append outcome unknown; re-planning", exc_info=True)
            return False
        self._known.update(result.versions)
        done.position = max(done.position, result.last_position)
        return True

    async def _catch_up(self, stream_id: str, version: int) -> None:
        try:
            await self._model.wait_for_version(stream_id, version, within_s=CATCH_UP_S)
        except Unavailable:
            log.info("read model has not seen %s@%d yet; re-planning anyway", stream_id, version)


def _encode(e: DomainEvent) -> NewEvent:
    return NewEvent(e.type, e.to_data(), e.SCHEMA_VERSION)
