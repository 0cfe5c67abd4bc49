"""Running a command: check the request id, load, decide, append, wait, answer.

Every mutating RPC ends up in `CommandRunner.run`:

1. A repeat of a request id (scoped by tenant) returns the stored response of the
   first execution, and a reuse with another body is refused, before anything
   is decided: the state may have moved since, so deciding again could differ.
   The stored record is read only when the read model has seen the request id
   (it indexes every applied append's id). When this node lags behind the first
   execution, its decision is made on the state before it, and the log itself
   answers the append with the stored result: both paths return the first answer.
2. `decide(model)` reads current states from the read model and returns the
   changes (stream, expected version, events) and the response, a JSON dict.
3. The append carries the principal, request id, correlation id and the stored
   response. On a version conflict the node waits until its read model has the
   newer version and decides again (bounded), which is how concurrent
   allocations against one quota or one IPAM pool serialise without overshoot.
   After a conflict on a stream, later attempts on this node take a lock for that
   stream: commands contending for one quota or one pool then decide one after
   another here (each sees the previous one's effect) instead of all retrying in
   rounds with one winner each. Other nodes still conflict and retry, with jitter.
4. The node waits until its read model has applied the append (read-your-writes)
   and returns the response with the append's position.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vim.domain.base import DomainEvent
from vim.errors import IdempotencyConflict, VersionConflict
from vim.eventlog.model import AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.store import EventLog
from vim.projections.readmodel import ReadModel

MAX_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: from a verified bearer token (or the agent's certificate)."""

    user: str
    tenant: str
    roles: frozenset[str] = frozenset()

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


@dataclass(frozen=True, slots=True)
class CommandContext:
    """The envelope of one command: who, which request, which correlation."""

    principal: Principal
    request_id: str
    fingerprint: str
    correlation_id: str | None = None
    fencing_role: str | None = None
    fencing_token: int | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """Events for one stream at the version the decision was made against."""

    stream_id: str
    expected_version: int
    events: Sequence[DomainEvent]


@dataclass(frozen=True, slots=True)
class Decision:
    changes: Sequence[Change]
    response: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    response: Mapping[str, Any]
    position: int
    replayed: bool


Decide = Callable[[ReadModel], Decision]


def fingerprint(method: str, body: bytes) -> str:
    """A request body's identity for idempotency: the method and its serialised request."""
    return hashlib.sha256(method.encode() + b"\0" + body).hexdigest()


class CommandRunner:
    """Runs commands against one event log and this node's read model."""

    def __init__(self, log: EventLog, model: ReadModel, *, wait_timeout_s: float = 5.0) -> None:
        self._log = log
        self._model = model
        self._timeout = wait_timeout_s
        self._locks: dict[str, asyncio.Lock] = {}

    async def run(self, ctx: CommandContext, decide: Decide) -> Outcome:
        rid = f"{ctx.principal.tenant}:{ctx.request_id}"
        contended: str | None = None
        for attempt in range(1, MAX_ATTEMPTS + 1):
            lock = self._locks.setdefault(contended, asyncio.Lock()) if contended else None
            if lock is not None:
                # Outside the try: a call cancelled (say, its deadline passed) while it
                # waits here does not hold the lock and must not release it.
                await lock.acquire()
            try:
                return await self._attempt(ctx, rid, decide)
            except VersionConflict as conflict:
                if attempt == MAX_ATTEMPTS:
                    raise
                await self._model.wait_for_version(
                    conflict.stream_id, conflict.actual, self._timeout
                )
                if contended == conflict.stream_id:  # another node won: back off a little
                    await asyncio.sleep(random.uniform(0, 0.002 * attempt))
                contended = conflict.stream_id
            finally:
                if lock is not None:
                    lock.release()
        raise AssertionError("unreachable")

    async def _attempt(self, ctx: CommandContext, rid: str, decide: Decide) -> Outcome:
        if rid in self._model.request_ids:
            replay = await self._replay(rid, ctx.fingerprint)
            if replay is not None:
                return replay
        decision = decide(self._model)
        if not decision.changes:
            return Outcome(decision.response, self._model.position, replayed=False)
        result = await self._log.append(self._request(ctx, rid, decision))
        await self._model.wait_for(result.last_position, self._timeout)
        return Outcome(result.response or {}, result.last_position, result.replayed)

    async def _replay(self, rid: str, fp: str) -> Outcome | None:
        stored = await self._log.lookup_request(rid)
        if stored is None:
            return None
        if stored.fingerprint != fp:
            raise IdempotencyConflict(rid.split(":", 1)[1])
        result = json.loads(stored.result_json)
        position = int(result["last_position"])
        await self._model.wait_for(position, self._timeout)
        return Outcome(result.get("response") or {}, position, replayed=True)

    def _request(self, ctx: CommandContext, rid: str, d: Decision) -> AppendRequest:
        return AppendRequest(
            streams=[
                StreamAppend(
                    c.stream_id,
                    c.expected_version,
                    [NewEvent(e.type, e.to_data(), e.SCHEMA_VERSION) for e in c.events],
                )
                for c in d.changes
            ],
            metadata=Metadata(
                tenant=ctx.principal.tenant,
                actor=ctx.principal.user,
                request_id=rid,
                correlation_id=ctx.correlation_id or ctx.request_id,
                fencing_role=ctx.fencing_role,
                fencing_token=ctx.fencing_token,
            ),
            fingerprint=ctx.fingerprint,
            response=d.response,
        )
