"""Group commit: many concurrent appends become one transaction, each decided on its own.

The writer serialises position assignment: a transaction first locks the log head
(one row holding the last position), so transactions commit one after another in
position order and a reader that has seen position p will never later find a
smaller position committing. Positions are gapless, since a transaction that
rolls back never moved the head.

A lone transaction per append would pay one fsync per append while holding the
head lock. Instead every append that arrives while a transaction is in flight
waits in a queue, and the next transaction takes them all. `plan_batch` decides,
without I/O, which appends of a batch succeed against the state read under the
lock (stream versions, request ids, fencing tokens): a refused append is refused
alone and the rest still commit. (PostgreSQL first tries the batch on a state read
without the lock, with positions as offsets from a head it learns only when it
writes; a stale read makes that write fail as a whole, and the batch is then
decided again under the lock: see `vim/eventlog/postgres.py`.) Every acknowledged
append is durable because the acknowledgement is sent only after the commit returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from vim.errors import FencedOut, IdempotencyConflict, VersionConflict, VimError
from vim.eventlog.model import ANY_VERSION, AppendResult, PreparedAppend


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """A request id as recorded: its body's fingerprint and the first result."""

    request_id: str
    fingerprint: str
    result_json: str


@dataclass(slots=True)
class LogState:
    """What a batch is decided against; read under the head lock."""

    head: int
    versions: dict[str, int]
    requests: dict[str, StoredRequest]
    tokens: dict[str, int]


EventRow = tuple[int, str, int, str, str, int, str, str, datetime]
"""position, stream_id, version, event_id, type, schema_version, data, metadata, recorded_at"""


@dataclass(slots=True)
class BatchWrites:
    """The rows one batch transaction writes."""

    events: list[EventRow] = field(default_factory=list)
    streams: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (version, pos)
    requests: list[tuple[str, str, str, int, datetime]] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    head: int = 0


Outcome = AppendResult | VimError


def plan_batch(
    batch: Sequence[PreparedAppend], state: LogState, now: datetime
) -> tuple[list[Outcome], BatchWrites]:
    """Decide every append of a batch in order; later ones see earlier ones' effects."""
    writes = BatchWrites(head=state.head)
    outcomes: list[Outcome] = []
    for p in batch:
        outcome = _decide(p, state)
        if outcome is None:
            outcome = _accept(p, state, writes, now)
        outcomes.append(outcome)
    return outcomes, writes


def _decide(p: PreparedAppend, state: LogState) -> Outcome | None:
    """The refusal or idempotent replay for an append, or None when it may be written."""
    rid = p.metadata.request_id
    if rid is not None and rid in state.requests:
        stored = state.requests[rid]
        if stored.fingerprint != p.fingerprint:
            return IdempotencyConflict(rid)
        return AppendResult.from_json(json.loads(stored.result_json), replayed=True)
    role, token = p.metadata.fencing_role, p.metadata.fencing_token
    if role is not None and token is not None:
        newest = state.tokens.get(role, 0)
        if token < newest:
            return FencedOut(role, token, newest)
    for s in p.streams:
        actual = state.versions.get(s.stream_id, 0)
        if s.expected_version not in (ANY_VERSION, actual):
            return VersionConflict(s.stream_id, s.expected_version, actual)
    return None


def _accept(p: PreparedAppend, state: LogState, w: BatchWrites, now: datetime) -> AppendResult:
    first = state.head + 1
    versions: dict[str, int] = {}
    for s in p.streams:
        version = state.versions.get(s.stream_id, 0)
        for e in s.events:
            state.head += 1
            version += 1
            w.events.append(
                (
                    state.head,
                    s.stream_id,
                    version,
                    e.event_id,
                    e.type,
                    e.schema_version,
                    e.data_json,
                    p.metadata_json,
                    now,
                )
            )
        state.versions[s.stream_id] = version
        versions[s.stream_id] = version
        w.streams[s.stream_id] = (version, state.head)
    w.head = state.head
    rid = p.metadata.request_id
    result = AppendResult(first, state.head, versions, now, rid, p.response)
    if rid is not None:
        result_json = json.dumps(result.to_json(), sort_keys=True)
        state.requests[rid] = StoredRequest(rid, p.fingerprint, result_json)
        w.requests.append((rid, p.fingerprint, result_json, state.head, now))
    role, token = p.metadata.fencing_role, p.metadata.fencing_token
    if role is not None and token is not None and token > state.tokens.get(role, 0):
        state.tokens[role] = token
        w.tokens[role] = token
    return result


WriteBatch = Callable[[list[PreparedAppend]], Awaitable[list[Outcome]]]


class GroupCommitter:
    """Queues appends and writes them in batches, one transaction at a time.

    A caller cancelled while waiting does not cancel the write: its append may still
    commit, which is why callers retry with the same request id.

    Gathering: a write costs CPU here and in the database whatever the batch's size
    (a round trip, a statement, a commit and its flush, the notification every
    follower handles). When this process's own CPU is the bottleneck, few appends
    queue during one write, so batches stay near one append and that cost is paid
    per append. So before a write the writer first lets the event loop run: up to
    `gather_turns` turns, stopping after `gather_idle_turns` turns in a row that
    queued nothing, once `gather_max_s` has passed, or when the batch is full. An
    idle loop ends that in a few microseconds, so a lone append is not delayed; a
    busy one adds the requests it is already handling to the batch. The writer never
    waits for time to pass. `gather_turns=0` turns it off.
    """

    def __init__(
        self,
        write: WriteBatch,
        *,
        max_appends: int,
        max_events: int,
        gather_turns: int = 0,
        gather_idle_turns: int = 16,
        gather_max_s: float = 0.01,
    ) -> None:
        self._write = write
        self._max_appends = max_appends
        self._max_events = max_events
        self._gather_turns = gather_turns
        self._gather_idle_turns = max(1, gather_idle_turns)
        self._gather_max_s = gather_max_s
        self._queue: deque[tuple[PreparedAppend, asyncio.Future[AppendResult]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, p: PreparedAppend) -> AppendResult:
        if self._closed:
            raise RuntimeError("event log is closed")
        fut: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append((p, fut))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="eventlog-group-commit")
        return await asyncio.shield(fut)

    async def close(self) -> None:
        """Finish what is queued, then stop the writer; safe to call twice."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self._queue or not self._closed:
            if not self._queue:
                self._wake.clear()
                if self._closed:
                    return
                await self._wake.wait()
                continue
            if self._gather_turns > 0:
                await self._gather()
            batch = self._take()
            try:
                outcomes = await self._write([p for p, _ in batch])
            except BaseException as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, fut), outcome in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if isinstance(outcome, BaseException):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)

    async def _gather(self) -> None:
        """Let the loop run while it keeps queueing appends (see the class docstring)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + self._gather_max_s
        idle = 0
        for _ in range(self._gather_turns):
            queued = len(self._queue)
            if queued >= self._max_appends or self._closed:
                return
            await asyncio.sleep(0)
            if len(self._queue) > queued:
                idle = 0
            else:
                idle += 1
                if idle >= self._gather_idle_turns:
                    return
            if loop.time() >= until:
                return

    def _take(self) -> list[tuple[PreparedAppend, asyncio.Future[AppendResult]]]:
        batch = [self._queue.popleft()]
        events = batch[0][0].event_count
        while self._queue and len(batch) < self._max_appends:
            nxt = self._queue[0][0].event_count
            if events + nxt > self._max_events:
                break
            events += nxt
            batch.append(self._queue.popleft())
        return batch
