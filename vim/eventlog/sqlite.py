"""The SQLite backend (the embedded default), in SQLAlchemy Core over aiosqlite.

Writers take SQLite's database lock with `BEGIN IMMEDIATE` on a dedicated
one-connection engine, so writers in every process are serialised and positions
commit in order; readers use a second engine and WAL, so they never block the
writer. `synchronous=FULL` makes an acknowledged append durable.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from vim.errors import EventLogUnavailable
from vim.eventlog import schema
from vim.eventlog.backend import EVENT_COLUMNS, REQUEST_COLUMNS, CommitUnknown
from vim.eventlog.batching import EventRow, LogState, Outcome, StoredRequest, plan_batch
from vim.eventlog.model import PreparedAppend
from vim.eventlog.store import EventLogConfig

_ev = schema.events
_st = schema.streams
_rq = schema.requests
_fe = schema.fencing
_hd = schema.log_head
_EVENT_SELECT = sa.select(*(_ev.c[c] for c in EVENT_COLUMNS))


class SqliteBackend:
    """`Backend` on a SQLite file; see the module docstring."""

    announces_head = False

    def __init__(self, async_url: str, config: EventLogConfig) -> None:
        self._write_engine = create_async_engine(async_url, pool_size=1, max_overflow=0)
        self._read_engine = create_async_engine(async_url, pool_size=config.pool_size)
        _pragmas(self._write_engine, immediate=True)
        _pragmas(self._read_engine, immediate=False)

    @contextlib.asynccontextmanager
    async def _translate(self, what: str) -> AsyncIterator[None]:
        try:
            yield
        except (sa_exc.OperationalError, sa_exc.InterfaceError, OSError) as exc:
            raise EventLogUnavailable(f"event log unavailable ({what}): {exc}") from exc

    async def write(self, batch: Sequence[PreparedAppend]) -> list[Outcome]:
        async with self._translate("append"), self._write_engine.connect() as conn:
            tx = await conn.begin()
            outcomes, wrote = await self._decide_and_write(conn, batch)
            if not wrote:
                await tx.rollback()
                return outcomes
            try:
                await tx.commit()
            except sa_exc.OperationalError as exc:
                raise CommitUnknown() from exc
            return outcomes

    async def _decide_and_write(
        self, conn: AsyncConnection, batch: Sequence[PreparedAppend]
    ) -> tuple[list[Outcome], bool]:
        head = (await conn.execute(sa.select(_hd.c.position).where(_hd.c.id == 1))).scalar_one()
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
        await conn.execute(
            _ev.insert(), [dict(zip(EVENT_COLUMNS, e, strict=True)) for e in w.events]
        )
        await conn.execute(
            _upsert(_st, "stream_id", ("version", "position")),
            [{"stream_id": k, "version": v, "position": p} for k, (v, p) in w.streams.items()],
        )
        if w.requests:
            rows_ = [dict(zip(REQUEST_COLUMNS, r, strict=True)) for r in w.requests]
            await conn.execute(_rq.insert(), rows_)
        if w.tokens:
            await conn.execute(
                _upsert(_fe, "role", ("token",)),
                [{"role": k, "token": v} for k, v in w.tokens.items()],
            )
        await conn.execute(sa.update(_hd).where(_hd.c.id == 1).values(position=w.head))
        return outcomes, True

    async def _fetch(self, query: Any, what: str) -> Sequence[sa.Row[Any]]:
        async with self._translate(what), self._read_engine.connect() as conn:
            return (await conn.execute(query)).all()

    async def events_after(
        self, after: int, limit: int, types: Collection[str] | None
    ) -> list[EventRow]:
        q = _EVENT_SELECT.where(_ev.c.position > after).order_by(_ev.c.position).limit(limit)
        if types:
            q = q.where(_ev.c.type.in_(list(types)))
        return [_row(r) for r in await self._fetch(q, "read_all")]

    async def stream_events(
        self, stream_id: str, after_version: int, limit: int | None
    ) -> list[EventRow]:
        q = _EVENT_SELECT.where(_ev.c.stream_id == stream_id, _ev.c.version > after_version)
        q = q.order_by(_ev.c.version).limit(limit)
        return [_row(r) for r in await self._fetch(q, "read_stream")]

    async def stream_version(self, stream_id: str) -> int:
        q = sa.select(_st.c.version).where(_st.c.stream_id == stream_id)
        rows = await self._fetch(q, "stream_version")
        return int(rows[0][0]) if rows else 0

    async def head(self) -> int:
        rows = await self._fetch(sa.select(_hd.c.position).where(_hd.c.id == 1), "head")
        return int(rows[0][0])

    async def fencing_token(self, role: str) -> int:
        rows = await self._fetch(sa.select(_fe.c.token).where(_fe.c.role == role), "fencing")
        return int(rows[0][0]) if rows else 0

    async def lookup_request(self, request_id: str) -> StoredRequest | None:
        q = sa.select(_rq.c.request_id, _rq.c.fingerprint, _rq.c.result).where(
            _rq.c.request_id == request_id
        )
        rows = await self._fetch(q, "lookup_request")
        if not rows:
            return None
        rid, fingerprint, result = tuple(rows[0])
        return StoredRequest(rid, fingerprint, result)

    async def follow(self, wake: Callable[[int | None], None], stopped: Callable[[], bool]) -> None:
        """SQLite has no notifications: other processes are seen by polling alone."""

    async def close(self) -> None:
        await self._write_engine.dispose()
        await self._read_engine.dispose()


def _row(r: sa.Row[Any]) -> EventRow:
    t: tuple[Any, ...] = tuple(r)
    at = t[8] if t[8].tzinfo else t[8].replace(tzinfo=UTC)
    return (t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], at)


def _upsert(table: sa.Table, key: str, cols: Sequence[str]) -> Any:
    ins = sqlite_dialect.insert(table)
    return ins.on_conflict_do_update(index_elements=[key], set_={c: ins.excluded[c] for c in cols})


def _pragmas(engine: AsyncEngine, *, immediate: bool) -> None:
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
