"""The PostgreSQL backend: psycopg 3 with a connection pool, pipelined statements.

Array parameters go in binary (`%b`): the text format would escape every JSON
string in Python, which was a third of an API node's CPU per allocation.

One append batch is one transaction and two network round trips: the first
pipeline locks the log head row (`FOR UPDATE`, which serialises writers across
every process) and reads the batch's stream versions, request ids and fencing
tokens; the second writes the accepted events as arrays through `unnest`, moves
the streams, the request ids, the tokens and the head, and sends a NOTIFY that
PostgreSQL delivers only if the transaction commits. Then COMMIT.

Ordering: the head row lock is released only after the commit is visible, so a
transaction that takes positions p+1.. starts after every position <= p is
visible. Readers reading `position > cursor` in order can never skip a late one.

Failures: psycopg's OperationalError (refused, reset, admin shutdown, timeout) is
EventLogUnavailable; after one, the pool's idle connections are checked, since a
restarted server broke all of them at once. COMMIT failing is CommitUnknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from vim.errors import EventLogUnavailable
from vim.eventlog.backend import CommitUnknown
from vim.eventlog.batching import (
    BatchWrites,
    EventRow,
    LogState,
    Outcome,
    StoredRequest,
    plan_batch,
)
from vim.eventlog.model import PreparedAppend
from vim.eventlog.store import EventLogConfig

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "vim_events"

_SELECT_EVENTS = (
    "SELECT position, stream_id, version, event_id, type, schema_version, data, metadata, "
    "recorded_at FROM events "
)
_INSERT_EVENTS = (
    "INSERT INTO events (position, stream_id, version, event_id, type, schema_version, data, "
    "metadata, recorded_at) SELECT * FROM unnest(%b::bigint[], %b::text[], %b::int[], "
    "%b::text[], %b::text[], %b::int[], %b::text[], %b::text[], %b::timestamptz[])"
)
_UPSERT_STREAMS = (
    "INSERT INTO streams (stream_id, version, position) "
    "SELECT * FROM unnest(%b::text[], %b::int[], %b::bigint[]) "
    "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, "
    "position = excluded.position"
)
_INSERT_REQUESTS = (
    "INSERT INTO requests (request_id, fingerprint, result, position, recorded_at) "
    "SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], "
    "%b::timestamptz[])"
)
_UPSERT_TOKENS = (
    "INSERT INTO fencing (role, token) SELECT * FROM unnest(%b::text[], %b::bigint[]) "
    "ON CONFLICT (role) DO UPDATE SET token = excluded.token"
)


class PostgresBackend:
    """`Backend` on PostgreSQL; see the module docstring."""

    def __init__(self, dsn: str, config: EventLogConfig) -> None:
        self._dsn = dsn
        self._config = config
        self._pool = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=config.pool_size,
            timeout=config.connect_timeout_s,
            kwargs={"connect_timeout": max(1, int(config.connect_timeout_s)), "autocommit": True},
            open=False,
            name="eventlog",
        )
        self._checks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        try:
            await self._pool.open(wait=True, timeout=self._config.connect_timeout_s)
        except PoolTimeout as exc:
            await self._pool.close()
            raise EventLogUnavailable(f"cannot connect to the event log: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _conn(self, what: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            async with self._pool.connection() as conn:
                yield conn
        except CommitUnknown:
            self._schedule_pool_check()
            raise
        except (psycopg.OperationalError, PoolTimeout, OSError) as exc:
            self._schedule_pool_check()
            raise EventLogUnavailable(f"event log unavailable ({what}): {exc}") from exc

    def _schedule_pool_check(self) -> None:
        task = asyncio.get_running_loop().create_task(self._check_pool())
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check_pool(self) -> None:
        """Drop every idle connection a restarted server broke, not just the one we hit."""
        with contextlib.suppress(Exception):
            await self._pool.check()

    async def write(self, batch: Sequence[PreparedAppend]) -> list[Outcome]:
        """Connections are in autocommit mode: BEGIN and COMMIT travel in the pipelines."""
        async with self._conn("append") as conn:
            return await self._decide_and_write(conn, batch)

    async def _decide_and_write(
        self, conn: psycopg.AsyncConnection[Any], batch: Sequence[PreparedAppend]
    ) -> list[Outcome]:
        ids = list({s.stream_id for p in batch for s in p.streams})
        rids = list({p.metadata.request_id for p in batch if p.metadata.request_id})
        roles = list({p.metadata.fencing_role for p in batch if p.metadata.fencing_role})
        head_c, st_c, rq_c, fe_c = (conn.cursor() for _ in range(4))
        async with conn.pipeline():
            await head_c.execute("BEGIN")
            await head_c.execute("SELECT position FROM log_head WHERE id = 1 FOR UPDATE")
            await st_c.execute(
                "SELECT stream_id, version FROM streams WHERE stream_id = ANY(%s)", (ids,)
            )
            if rids:
                await rq_c.execute(
                    "SELECT request_id, fingerprint, result FROM requests "
                    "WHERE request_id = ANY(%s)",
                    (rids,),
                )
            if roles:
                await fe_c.execute("SELECT role, token FROM fencing WHERE role = ANY(%s)", (roles,))
        row = await head_c.fetchone()
        assert row is not None, "log_head row missing: the schema was not migrated"
        state = LogState(int(row[0]), dict(await st_c.fetchall()), {}, {})
        if rids:
            state.requests = {r[0]: StoredRequest(r[0], r[1], r[2]) for r in await rq_c.fetchall()}
        if roles:
            state.tokens = dict(await fe_c.fetchall())
        outcomes, w = plan_batch(batch, state, datetime.now(UTC))
        if not w.events:
            await conn.execute("ROLLBACK")
            return outcomes
        try:
            await self._write_rows(conn, w)
        except psycopg.OperationalError as exc:
            # The connection died somewhere in the pipeline that ends with COMMIT.
            raise CommitUnknown() from exc
        return outcomes

    async def _write_rows(self, conn: psycopg.AsyncConnection[Any], w: BatchWrites) -> None:
        cur = conn.cursor()
        async with conn.pipeline():
            await cur.execute(_INSERT_EVENTS, [list(col) for col in zip(*w.events, strict=True)])
            streams = [(k, v, p) for k, (v, p) in w.streams.items()]
            await cur.execute(_UPSERT_STREAMS, [list(col) for col in zip(*streams, strict=True)])
            if w.requests:
                cols = [list(col) for col in zip(*w.requests, strict=True)]
                await cur.execute(_INSERT_REQUESTS, cols)
            if w.tokens:
                await cur.execute(_UPSERT_TOKENS, (list(w.tokens), list(w.tokens.values())))
            await cur.execute("UPDATE log_head SET position = %s WHERE id = 1", (w.head,))
            await cur.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, str(w.head)))
            await cur.execute("COMMIT")

    async def _rows(self, what: str, query: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        async with self._conn(what) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    async def events_after(
        self, after: int, limit: int, types: Collection[str] | None
    ) -> list[EventRow]:
        if types:
            q = _SELECT_EVENTS + "WHERE position > %s AND type = ANY(%s) ORDER BY position LIMIT %s"
            return await self._rows("read_all", q, (after, list(types), limit))
        q = _SELECT_EVENTS + "WHERE position > %s ORDER BY position LIMIT %s"
        return await self._rows("read_all", q, (after, limit))

    async def stream_events(
        self, stream_id: str, after_version: int, limit: int | None
    ) -> list[EventRow]:
        q = _SELECT_EVENTS + "WHERE stream_id = %s AND version > %s ORDER BY version LIMIT %s"
        return await self._rows("read_stream", q, (stream_id, after_version, limit))

    async def _scalar(self, what: str, query: str, params: Sequence[Any]) -> Any:
        rows = await self._rows(what, query, params)
        return rows[0][0] if rows else None

    async def stream_version(self, stream_id: str) -> int:
        q = "SELECT version FROM streams WHERE stream_id = %s"
        return int(await self._scalar("stream_version", q, (stream_id,)) or 0)

    async def head(self) -> int:
        return int(await self._scalar("head", "SELECT position FROM log_head WHERE id = 1", ()))

    async def fencing_token(self, role: str) -> int:
        q = "SELECT token FROM fencing WHERE role = %s"
        return int(await self._scalar("fencing", q, (role,)) or 0)

    async def lookup_request(self, request_id: str) -> StoredRequest | None:
        q = "SELECT request_id, fingerprint, result FROM requests WHERE request_id = %s"
        rows = await self._rows("lookup_request", q, (request_id,))
        return StoredRequest(*rows[0]) if rows else None

    async def follow(self, wake: Callable[[], None], stopped: Callable[[], bool]) -> None:
        """LISTEN on a connection of its own; reconnect until stopped. Hints only."""
        while not stopped():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=2
                )
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    wake()  # whatever was committed while we were not listening
                    async for _ in conn.notifies():
                        wake()
            except (psycopg.Error, OSError) as exc:
                log.debug("event log listener reconnecting: %s", exc)
            await asyncio.sleep(self._config.retry_backoff_s)

    async def close(self) -> None:
        await self._pool.close()
