"""The event log on PostgreSQL (production) and SQLite (embedded default), one code path.

Writes go through a `GroupCommitter`: one writer task per process takes every
queued append, locks the log head row (`SELECT ... FOR UPDATE` on PostgreSQL,
`BEGIN IMMEDIATE` on SQLite), reads stream versions, request ids and fencing
tokens for the batch, decides each append with `batching.plan_batch`, writes
the accepted ones and commits. Writers in other processes queue on the same row
lock, so positions are assigned and committed strictly in order, without gaps.

Readers read by position. A subscription catches up in batches, then waits for a
hint that something was appended: the in-process writer's commit, a PostgreSQL
NOTIFY (sent inside the append transaction, so delivered only on commit), or the
polling interval, whichever comes first. Hints can be lost; positions cannot.

Driver errors are translated here and nowhere else: a lost connection, a
restarting server or a busy SQLite file become `EventLogUnavailable`. A failure
before COMMIT was sent is retried once on a fresh connection; a failure during
COMMIT leaves the outcome unknown, so it is reported and the caller retries with
the same request id, which the idempotency record makes safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from vim.errors import EventLogUnavailable
from vim.eventlog import migrating, schema
from vim.eventlog.batching import GroupCommitter, LogState, Outcome, StoredRequest, plan_batch
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

NOTIFY_CHANNEL = "vim_events"

_ev = schema.events
_st = schema.streams
_rq = schema.requests
_fe = schema.fencing
_hd = schema.log_head


class _CommitUnknown(Exception):
    """Raised inside the writer when COMMIT itself failed: the outcome is unknown."""


class _Notifier:
    """Wakes every waiting subscriber; a waiter takes `current()` before it reads."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def notify(self) -> None:
        ev, self._event = self._event, asyncio.Event()
        ev.set()


def _urls(url: str) -> tuple[str, str, str | None]:
    """(async SQLAlchemy URL, sync SQLAlchemy URL, libpq DSN for LISTEN or None)."""
    u = sa.engine.make_url(url)
    backend = u.get_backend_name()
    if backend == "postgresql":
        pg = u.set(drivername="postgresql+psycopg")
        dsn = u.set(drivername="postgresql").render_as_string(hide_password=False)
        return (pg.render_as_string(hide_password=False),) * 2 + (dsn,)  # type: ignore[return-value]
    if backend == "sqlite":
        if u.database in (None, "", ":memory:"):
            raise ValueError("the SQLite event log needs a file path, not :memory:")
        return (
            u.set(drivername="sqlite+aiosqlite").render_as_string(),
            u.set(drivername="sqlite").render_as_string(),
            None,
        )
    raise ValueError(f"unsupported event log URL {url!r}: use postgresql:// or sqlite:///")


class SqlEventLog:
    """`EventLog` over SQLAlchemy Core; see the module docstring for the protocol."""

    def __init__(
        self,
        write_engine: AsyncEngine,
        read_engine: AsyncEngine,
        *,
        config: EventLogConfig,
        upcasters: Upcasters | None,
        listen_dsn: str | None,
    ) -> None:
        self.config = config
        self._write_engine = write_engine
        self._read_engine = read_engine
        self._pg = write_engine.dialect.name == "postgresql"
        self._upcasters = upcasters or Upcasters()
        self._listen_dsn = listen_dsn
        self._notifier = _Notifier()
        self._committer = GroupCommitter(
            self._write_batch,
            max_appends=config.max_batch_appends,
            max_events=config.max_batch_events,
        )
        self._listener: asyncio.Task[None] | None = None
        self._closed = False

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
        async_url, sync_url, dsn = _urls(url)
        if migrate:
            try:
                await asyncio.to_thread(migrating.upgrade, sync_url)
            except (sa_exc.OperationalError, sa_exc.InterfaceError, OSError) as exc:
                raise EventLogUnavailable(f"cannot migrate the event log: {exc}") from exc
        if dsn is not None:
            engine = create_async_engine(
                async_url,
                pool_size=config.pool_size,
                max_overflow=config.pool_size,
                pool_timeout=config.connect_timeout_s,
                connect_args={"connect_timeout": max(1, int(config.connect_timeout_s))},
            )
            self = cls(engine, engine, config=config, upcasters=upcasters, listen_dsn=dsn)
            self._listener = asyncio.create_task(self._listen(), name="eventlog-listen")
            return self
        write = create_async_engine(async_url, pool_size=1, max_overflow=0)
        read = create_async_engine(async_url, pool_size=config.pool_size)
        _sqlite_pragmas(write, immediate=True)
        _sqlite_pragmas(read, immediate=False)
        return cls(write, read, config=config, upcasters=upcasters, listen_dsn=None)

    # -- writing ---------------------------------------------------------------------

    async def append(self, request: AppendRequest) -> AppendResult:
        """Validate, queue for the next group commit, and wait until it is durable."""
        prepared = prepare(request, max_payload_bytes=self.config.max_payload_bytes)
        return await self._committer.submit(prepared)

    async def _write_batch(self, batch: list[PreparedAppend]) -> list[Outcome]:
        for attempt in (1, 2):
            try:
                outcomes = await self._write_once(batch)
            except _CommitUnknown as exc:
                raise EventLogUnavailable(
                    "the event log connection failed during commit; the outcome is unknown: "
                    "retry with the same request id"
                ) from exc.__cause__
            except sa_exc.IntegrityError:
                # Cannot happen while the head lock is honoured; isolate the culprit anyway.
                if len(batch) == 1:
                    raise
                return [o for p in batch for o in await self._write_batch([p])]
            except EventLogUnavailable:
                if attempt == 2 or self._closed:
                    raise
                continue
            self._notifier.notify()
            return outcomes
        raise AssertionError("unreachable")

    async def _write_once(self, batch: Sequence[PreparedAppend]) -> list[Outcome]:
        async with self._translate("append"), self._write_engine.connect() as conn:
            tx = await conn.begin()
            outcomes, wrote = await self._decide_and_write(conn, batch)
            if not wrote:
                await tx.rollback()
                return outcomes
            try:
                await tx.commit()
            except sa_exc.DBAPIError as exc:
                if isinstance(exc, sa_exc.IntegrityError):
                    raise
                raise _CommitUnknown() from exc
            return outcomes

    async def _decide_and_write(
        self, conn: AsyncConnection, batch: Sequence[PreparedAppend]
    ) -> tuple[list[Outcome], bool]:
        head_q = sa.select(_hd.c.position).where(_hd.c.id == 1).with_for_update()
        head = (await conn.execute(head_q)).scalar_one()
        state = LogState(head, {}, {}, {})
        ids = {s.stream_id for p in batch for s in p.streams}
        rows = await conn.execute(
            sa.select(_st.c.stream_id, _st.c.version).where(_st.c.stream_id.in_(ids))
        )
        state.versions = {r.stream_id: r.version for r in rows}
        rids = {p.metadata.request_id for p in batch if p.metadata.request_id}
        if rids:
            rows = await conn.execute(sa.select(_rq).where(_rq.c.request_id.in_(rids)))
            state.requests = {
                r.request_id: StoredRequest(r.request_id, r.fingerprint, r.result) for r in rows
            }
        roles = {p.metadata.fencing_role for p in batch if p.metadata.fencing_role}
        if roles:
            rows = await conn.execute(sa.select(_fe).where(_fe.c.role.in_(roles)))
            state.tokens = {r.role: r.token for r in rows}
        outcomes, w = plan_batch(batch, state, datetime.now(UTC))
        if not w.events:
            return outcomes, False
        await conn.execute(_ev.insert(), [dict(zip(_EVENT_COLS, e, strict=True)) for e in w.events])
        await conn.execute(
            self._upsert(_st, "stream_id", ("version", "position")),
            [{"stream_id": k, "version": v, "position": p} for k, (v, p) in w.streams.items()],
        )
        if w.requests:
            await conn.execute(_rq.insert(), [dict(zip(_REQUEST_COLS, r, strict=True))
                                              for r in w.requests])
        if w.tokens:
            await conn.execute(
                self._upsert(_fe, "role", ("token",)),
                [{"role": k, "token": v} for k, v in w.tokens.items()],
            )
        await conn.execute(sa.update(_hd).where(_hd.c.id == 1).values(position=w.head))
        if self._pg:
            await conn.execute(sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, str(w.head))))
        return outcomes, True

    def _upsert(self, table: sa.Table, key: str, cols: Sequence[str]) -> Any:
        ins = pg_dialect.insert(table) if self._pg else sqlite_dialect.insert(table)
        return ins.on_conflict_do_update(
            index_elements=[key], set_={c: ins.excluded[c] for c in cols}
        )

    # -- reading ---------------------------------------------------------------------

    async def read_stream(
        self, stream_id: str, *, after_version: int = 0, limit: int | None = None
    ) -> list[RecordedEvent]:
        q = (
            sa.select(_ev)
            .where(_ev.c.stream_id == stream_id, _ev.c.version > after_version)
            .order_by(_ev.c.version)
        )
        if limit is not None:
            q = q.limit(limit)
        return [self._decode(r) for r in await self._fetch(q, "read_stream")]

    async def read_all(
        self, *, after: int = 0, limit: int = 500, types: Collection[str] | None = None
    ) -> list[RecordedEvent]:
        q = sa.select(_ev).where(_ev.c.position > after).order_by(_ev.c.position).limit(limit)
        if types:
            q = q.where(_ev.c.type.in_(list(types)))
        return [self._decode(r) for r in await self._fetch(q, "read_all")]

    async def stream_version(self, stream_id: str) -> int:
        q = sa.select(_st.c.version).where(_st.c.stream_id == stream_id)
        rows = await self._fetch(q, "stream_version")
        return int(rows[0].version) if rows else 0

    async def head(self) -> int:
        rows = await self._fetch(sa.select(_hd.c.position).where(_hd.c.id == 1), "head")
        return int(rows[0].position)

    async def fencing_token(self, role: str) -> int:
        rows = await self._fetch(sa.select(_fe.c.token).where(_fe.c.role == role), "fencing")
        return int(rows[0].token) if rows else 0

    async def lookup_request(self, request_id: str) -> StoredRequest | None:
        q = sa.select(_rq).where(_rq.c.request_id == request_id)
        rows = await self._fetch(q, "lookup_request")
        return StoredRequest(rows[0].request_id, rows[0].fingerprint, rows[0].result) if rows else None

    def subscribe(
        self,
        *,
        after: int = 0,
        types: Collection[str] | None = None,
        kinds: Collection[str] | None = None,
    ) -> _Subscription:
        """Every event after `after` (optionally only some types or stream kinds), live."""
        return _Subscription(self, after, frozenset(types or ()), frozenset(kinds or ()))

    async def _fetch(self, query: Any, what: str) -> Sequence[sa.Row[Any]]:
        for attempt in (1, 2):
            try:
                async with self._translate(what), self._read_engine.connect() as conn:
                    return (await conn.execute(query)).all()
            except EventLogUnavailable:
                if attempt == 2 or self._closed:
                    raise
        raise AssertionError("unreachable")

    def _decode(self, r: sa.Row[Any]) -> RecordedEvent:
        data: Mapping[str, Any] = json.loads(r.data)
        version = r.schema_version
        if self._upcasters:
            version, data = self._upcasters.upcast(r.type, version, data)
        at = r.recorded_at if r.recorded_at.tzinfo else r.recorded_at.replace(tzinfo=UTC)
        return RecordedEvent(
            position=r.position,
            stream_id=r.stream_id,
            version=r.version,
            event_id=r.event_id,
            type=r.type,
            schema_version=version,
            data=data,
            metadata=Metadata.from_json(json.loads(r.metadata)),
            recorded_at=at,
        )

    # -- plumbing --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _translate(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            raise EventLogUnavailable(f"event log unavailable ({what}): {exc.orig}") from exc
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise EventLogUnavailable(f"event log connection lost ({what})") from exc
            raise
        except (sa_exc.TimeoutError, OSError, psycopg.OperationalError) as exc:
            raise EventLogUnavailable(f"event log unavailable ({what}): {exc}") from exc

    async def _listen(self) -> None:
        """Turn PostgreSQL notifications into wake-ups; reconnect forever until closed."""
        assert self._listen_dsn is not None
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._listen_dsn, autocommit=True, connect_timeout=2
                )
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    self._notifier.notify()  # anything committed while we were away
                    async for _ in conn.notifies():
                        self._notifier.notify()
            except (psycopg.Error, OSError) as exc:
                log.debug("event log listener reconnecting: %s", exc)
            await asyncio.sleep(self.config.retry_backoff_s)

    async def close(self) -> None:
        """Drain queued appends, stop the listener, close the pools; idempotent."""
        if self._closed:
            return
        await self._committer.close()
        self._closed = True
        self._notifier.notify()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        await self._write_engine.dispose()
        if self._read_engine is not self._write_engine:
            await self._read_engine.dispose()


_EVENT_COLS = (
    "position",
    "stream_id",
    "version",
    "event_id",
    "type",
    "schema_version",
    "data",
    "metadata",
    "recorded_at",
)
_REQUEST_COLS = ("request_id", "fingerprint", "result", "position", "recorded_at")


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
        cfg = self._log.config
        while not (self._closed or self._log._closed):
            hint = self._log._notifier.current()  # taken before reading: no lost wake-up
            try:
                batch = await self._log.read_all(after=self._position, limit=cfg.read_batch)
            except EventLogUnavailable as exc:
                log.warning("subscription at %d waiting for the event log: %s", self._position,
                            exc)
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
            if len(batch) < cfg.read_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hint.wait(), cfg.poll_interval_s)


def _sqlite_pragmas(engine: AsyncEngine, *, immediate: bool) -> None:
    """WAL for concurrent readers, a busy timeout, durable commits; BEGIN IMMEDIATE to write."""

    @sa_event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_conn: Any, _rec: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        for pragma in ("journal_mode=WAL", "busy_timeout=10000", "synchronous=FULL"):
            cur.execute(f"PRAGMA {pragma}")
        cur.close()

    if immediate:

        @sa_event.listens_for(engine.sync_engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
