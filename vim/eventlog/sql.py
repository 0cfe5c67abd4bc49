"""The event log facade: one `EventLog` over PostgreSQL (production) or SQLite (embedded).

Writes go through a `GroupCommitter`: one writer task per process takes every
queued append and hands the batch to the backend, which decides each append under
the log's write lock (`batching.plan_batch`) and commits once. Writers in other
processes queue on the same lock, so positions are assigned and committed
strictly in order, without gaps.

Readers read by position. A subscription catches up in batches, then waits for a
hint that something was appended: the in-process writer's commit, a PostgreSQL
NOTIFY (sent inside the append transaction, so delivered only on commit), or the
polling interval, whichever comes first. Hints can be lost; positions cannot.

What a process appended itself is not read back. After each commit the writer
keeps the batch's events, decoded exactly as a read would decode them, in a
bounded window by position (`_Recent`). A subscription whose next position is in
that window takes it from there; it reads the database only for positions it has
not got: up to the head another process announced (a NOTIFY's payload is the
head its transaction committed), after a hint that carried no head (the listener
reconnected), and at least once every polling interval (hints can be lost). On
SQLite, which announces nothing, every own append also makes them read, so other
processes' appends are seen at the next local append or poll, whichever is first.
An API node answering an append waits for its read model to apply it: on
PostgreSQL this turns that wait from a database round trip and a decode into a
dictionary lookup.

Failures: backends raise `EventLogUnavailable` for a database that cannot be
reached. A batch that failed before COMMIT is retried once (a restarted server
breaks pooled connections, and the second attempt gets a fresh one); a failure
during COMMIT leaves the outcome unknown, so it is reported and the caller
retries with the same request id, which the idempotency record makes safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Collection, Mapping
from datetime import UTC
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from vim.errors import EventLogUnavailable
from vim.eventlog import migrating
from vim.eventlog.backend import Backend, CommitUnknown
from vim.eventlog.batching import EventRow, GroupCommitter, Outcome, StoredRequest
from vim.eventlog.model import (
    AppendRequest,
    AppendResult,
    Metadata,
    PreparedAppend,
    RecordedEvent,
    prepare,
)
from vim.eventlog.store import EventLogConfig
from vim.eventlog.upcasting import Upcasters

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4096)
def _metadata(raw: str) -> Metadata:
    """Every event of one append shares its metadata text: decode it once."""
    return Metadata.from_json(json.loads(raw))


class _Recent:
    """The last events this process appended, by position: a bounded window."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._by_position: dict[int, RecordedEvent] = {}
        self._order: deque[int] = deque()
        """Positions by age: `next(iter(dict))` would walk the deleted slots at the
        front of a dict that only ever loses its oldest entries."""

    def add(self, e: RecordedEvent) -> None:
        if e.position in self._by_position:
            return
        self._by_position[e.position] = e
        self._order.append(e.position)
        if len(self._order) > self._capacity:
            del self._by_position[self._order.popleft()]

    def get(self, position: int) -> RecordedEvent | None:
        return self._by_position.get(position)


class _Notifier:
    """Wakes every waiting subscriber; a waiter takes `current()` before it reads."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        ev, self._event = self._event, asyncio.Event()
        ev.set()


def _open_backend(url: str, config: EventLogConfig) -> tuple[Backend, str]:
    """The backend for a URL, and the synchronous SQLAlchemy URL to migrate with."""
    u = sa.engine.make_url(url)
    backend = u.get_backend_name()
    if backend == "postgresql":
        from vim.eventlog.postgres import PostgresBackend

        dsn = u.set(drivername="postgresql").render_as_string(hide_password=False)
        sync = u.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return PostgresBackend(dsn, config), sync
    if backend == "sqlite":
        if u.database in (None, "", ":memory:"):
            raise ValueError("the SQLite event log needs a file path, not :memory:")
        from vim.eventlog.sqlite import SqliteBackend

        aio = u.set(drivername="sqlite+aiosqlite").render_as_string()
        return SqliteBackend(aio, config), u.set(drivername="sqlite").render_as_string()
    raise ValueError(f"unsupported event log URL {url!r}: use postgresql:// or sqlite:///")


class SqlEventLog:
    """`EventLog` over a SQL backend; see the module docstring for the protocol."""

    def __init__(
        self, backend: Backend, *, config: EventLogConfig, upcasters: Upcasters | None = None
    ) -> None:
        self.config = config
        self._backend = backend
        self._upcasters = upcasters or Upcasters()
        self._notifier = _Notifier()
        self._committer = GroupCommitter(
            self._write_batch,
            max_appends=config.max_batch_appends,
            max_events=config.max_batch_events,
            gather_turns=config.commit_gather_turns,
            gather_idle_turns=config.commit_gather_idle_turns,
            gather_max_s=config.commit_gather_max_s,
        )
        self._recent = _Recent(config.recent_events)
        self._known_head = 0
        """The highest head this process knows committed: its own, or a NOTIFY's."""
        self._read_epoch = 0
        """Moves on a hint without a head: every subscription then reads."""
        self._closed = False
        self._follower = asyncio.create_task(
            backend.follow(self._hinted, lambda: self._closed), name="eventlog-follow"
        )

    def _hinted(self, head: int | None) -> None:
        if head is None:
            self._read_epoch += 1
        elif head > self._known_head:
            self._known_head = head
        self._notifier.notify()

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        config: EventLogConfig | None = None,
        upcasters: Upcasters | None = None,
        migrate: bool = True,
    ) -> SqlEventLog:
        """Connect (and by default migrate) an event log at a postgresql:// or sqlite:/// URL."""
        config = config or EventLogConfig()
        backend, sync_url = _open_backend(url, config)
        if migrate:
            try:
                await asyncio.to_thread(migrating.upgrade, sync_url)
            except (sa_exc.OperationalError, sa_exc.InterfaceError, OSError) as exc:
                await backend.close()
                raise EventLogUnavailable(f"cannot migrate the event log: {exc}") from exc
        opener = getattr(backend, "open", None)
        if opener is not None:
            await opener()
        return cls(backend, config=config, upcasters=upcasters)

    # -- writing ---------------------------------------------------------------------

    async def append(self, request: AppendRequest) -> AppendResult:
        """Validate, queue for the next group commit, and wait until it is durable."""
        prepared = prepare(request, max_payload_bytes=self.config.max_payload_bytes)
        return await self._committer.submit(prepared)

    async def _write_batch(self, batch: list[PreparedAppend]) -> list[Outcome]:
        for attempt in (1, 2):
            try:
                outcomes = await self._backend.write(batch)
            except CommitUnknown as exc:
                raise EventLogUnavailable(
                    "the event log connection failed during commit; the outcome is unknown: "
                    "retry with the same request id"
                ) from exc.__cause__
            except EventLogUnavailable:
                if attempt == 2 or self._closed:
                    raise
                continue
            self._remember(batch, outcomes)
            if not self._backend.announces_head:
                # Other processes' appends are not announced (SQLite): read after
                # each own append, as well as every polling interval.
                self._read_epoch += 1
            self._notifier.notify()
            return outcomes
        raise AssertionError("unreachable")

    def _remember(self, batch: list[PreparedAppend], outcomes: list[Outcome]) -> None:
        """Keep a committed batch's events for this process's subscriptions, built
        from the rows it wrote (positions and versions as `plan_batch` gave them)."""
        for p, o in zip(batch, outcomes, strict=True):
            if not isinstance(o, AppendResult) or o.replayed:
                continue
            rows: list[EventRow] = []
            position = o.first_position
            for s in p.streams:
                version = o.versions[s.stream_id] - len(s.events)
                for e in s.events:
                    version += 1
                    rows.append(
                        (
                            position,
                            s.stream_id,
                            version,
                            e.event_id,
                            e.type,
                            e.schema_version,
                            e.data_json,
                            p.metadata_json,
                            o.recorded_at,
                        )
                    )
                    position += 1
            if position != o.last_position + 1:  # not as planned: let readers read it
                log.error("append result %s does not match its events; not kept", o)
                continue
            for row in rows:
                self._recent.add(self._decode(row))
            self._known_head = max(self._known_head, o.last_position)

    # -- reading ---------------------------------------------------------------------

    async def read_stream(
        self, stream_id: str, *, after_version: int = 0, limit: int | None = None
    ) -> list[RecordedEvent]:
        rows = await self._retry(self._backend.stream_events, stream_id, after_version, limit)
        return [self._decode(r) for r in rows]

    async def read_all(
        self, *, after: int = 0, limit: int = 500, types: Collection[str] | None = None
    ) -> list[RecordedEvent]:
        rows = await self._retry(self._backend.events_after, after, limit, types)
        return [self._decode(r) for r in rows]

    async def stream_version(self, stream_id: str) -> int:
        return int(await self._retry(self._backend.stream_version, stream_id))

    async def head(self) -> int:
        return int(await self._retry(self._backend.head))

    async def fencing_token(self, role: str) -> int:
        return int(await self._retry(self._backend.fencing_token, role))

    async def lookup_request(self, request_id: str) -> StoredRequest | None:
        found: StoredRequest | None = await self._retry(self._backend.lookup_request, request_id)
        return found

    def subscribe(
        self,
        *,
        after: int = 0,
        types: Collection[str] | None = None,
        kinds: Collection[str] | None = None,
    ) -> _Subscription:
        """Every event after `after` (optionally only some types or stream kinds), live."""
        return _Subscription(self, after, frozenset(types or ()), frozenset(kinds or ()))

    async def _retry(self, fn: Any, *args: Any) -> Any:
        """Reads are idempotent: one retry rides over connections broken by a restart."""
        try:
            return await fn(*args)
        except EventLogUnavailable:
            if self._closed:
                raise
            return await fn(*args)

    async def _read_after(self, after: int, limit: int) -> list[RecordedEvent]:
        """`read_all` for subscriptions: events this process wrote are not decoded again."""
        rows = await self._retry(self._backend.events_after, after, limit, None)
        recent = self._recent
        return [recent.get(r[0]) or self._decode(r) for r in rows]

    def _decode(self, r: EventRow) -> RecordedEvent:
        data: Mapping[str, Any] = json.loads(r[6])
        version = r[5]
        if self._upcasters:
            version, data = self._upcasters.upcast(r[4], version, data)
        at = r[8]
        if at.tzinfo is not UTC:  # the session's time zone: one representation everywhere
            at = at.astimezone(UTC)
        return RecordedEvent(
            position=r[0],
            stream_id=r[1],
            version=r[2],
            event_id=r[3],
            type=r[4],
            schema_version=version,
            data=data,
            metadata=_metadata(r[7]),
            recorded_at=at,
        )

    async def close(self) -> None:
        """Drain queued appends, stop following, close the pools; idempotent."""
        if self._closed:
            return
        await self._committer.close()
        self._closed = True
        self._notifier.notify()
        self._follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._follower
        await self._backend.close()


class _Subscription:
    """Catch up by position, then follow; survives outages by retrying from its cursor."""

    def __init__(
        self, log: SqlEventLog, after: int, types: frozenset[str], kinds: frozenset[str]
    ) -> None:
        self._log = log
        self._position = after
        self._types = types
        self._kinds = kinds
        self._closed = False

    @property
    def position(self) -> int:
        return self._position

    def __aiter__(self) -> AsyncIterator[RecordedEvent]:
        return self._iterate()

    async def close(self) -> None:
        self._closed = True
        self._log._notifier.notify()

    def _wanted(self, e: RecordedEvent) -> bool:
        return (not self._types or e.type in self._types) and (
            not self._kinds or e.stream_kind in self._kinds
        )

    async def _iterate(self) -> AsyncIterator[RecordedEvent]:
        log_ = self._log
        cfg = log_.config
        recent = log_._recent
        must_read = True  # catch up from the database first
        epoch = log_._read_epoch
        last_read = 0.0
        while not (self._closed or log_._closed):
            hint = log_._notifier.current()  # taken before reading: no lost wake-up
            # What this process appended itself, when it continues the cursor.
            e = recent.get(self._position + 1)
            while e is not None:
                self._position = e.position
                if self._wanted(e):
                    yield e
                    if self._closed:
                        return
                e = recent.get(self._position + 1)
            now = time.monotonic()
            if epoch != log_._read_epoch or now - last_read >= cfg.poll_interval_s:
                epoch = log_._read_epoch
                must_read = True
            if must_read or self._position < log_._known_head:
                last_read = now
                try:
                    batch = await log_._read_after(self._position, cfg.read_batch)
                except EventLogUnavailable as exc:
                    log.warning(
                        "subscription at %d waits for the event log: %s", self._position, exc
                    )
                    await asyncio.sleep(cfg.retry_backoff_s)
                    continue
                for e in batch:
                    if self._wanted(e):
                        self._position = e.position
                        yield e
                        if self._closed:
                            return
                if batch:
                    self._position = batch[-1].position
                if len(batch) == cfg.read_batch:
                    continue  # more to catch up
                must_read = False
            # asyncio.timeout, not wait_for: wait_for (3.11) can swallow a cancellation
            # that races with the hint, leaving a closed stream's task running.
            try:
                async with asyncio.timeout(cfg.poll_interval_s):
                    await hint.wait()
            except TimeoutError:
                must_read = True  # hints can be lost: poll
