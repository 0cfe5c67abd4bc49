"""The PostgreSQL backend: psycopg 3 with a connection pool, pipelined statements.

Array parameters go in binary (`%b`): the text format would escape every JSON
string in Python, which was a third of an API node's CPU per allocation. Their
columns are wrapped in `vim.eventlog.pgarrays` types, whose dumpers know the
element type (psycopg's generic list dumper took 2-2.5x as long per batch).

An append batch is first written in one round trip, on the versions its appends
expect (`_write_assuming`): a command decides against a read model that follows
the log, so its expected versions are nearly always the current ones. The
statement is step 2 below with the first expected version of each stream as the
state, plus a guard in the head update: no stream may be behind what an append
expects (that would leave a gap in its versions), else the head is not moved and
nothing is written. A stream ahead of what an append expects collides on the
unique `(stream_id, version)`, a request id already recorded on its primary key:
the statement rolls back. Either way, and whenever that decision refused an append
(a refusal must be decided on what the log holds, not on an assumption), the
batch is decided again as follows. Batches naming a stream at any version
(`ANY_VERSION`) first in the batch go there directly.

Otherwise an append batch is written optimistically, in two round trips of which
only the last holds the log head lock:

1. Without any lock, one statement reads the batch's stream versions and request
   ids. `plan_batch` decides every append against them, with positions counted
   from 0 (offsets), since the head is not known yet.
2. One statement (`_WRITE_BATCH`, a single implicit transaction in autocommit)
   moves the head by the number of events (`UPDATE log_head ... RETURNING`, which
   takes the head row lock), inserts the events at head + offset, moves the
   streams and records the request ids (their stored result gets its positions
   from the head in SQL), and sends a NOTIFY delivered only on commit. The lock
   is held only while PostgreSQL executes and commits that one statement: no
   network round trip and no Python work happens under it.

The read in 1 may be stale, and that is safe: versions and request ids only ever
grow, so a conflict or a replay decided on a stale read is real; an append
decided as writable on a stale read collides in 2 with the unique
`(stream_id, version)` of events or the request id's primary key, the whole
statement rolls back, and the batch is decided again the locked way: BEGIN, lock
the head `FOR UPDATE` and read under it, then write and COMMIT (two pipelined
round trips, `_decide_and_write_locked`). Batches carrying fencing tokens, and
batches repeating a request id within themselves, always take the locked way, so
every fencing token is read and written under the head lock.

Ordering: the head row lock is released only after the commit is visible, so a
transaction that takes positions p+1.. starts after every position <= p is
visible. Readers reading `position > cursor` in order can never skip a late one.

Failures: psycopg's OperationalError (refused, reset, admin shutdown, timeout) is
EventLogUnavailable; after one, the pool's idle connections are checked, since a
restarted server broke all of them at once. COMMIT failing is CommitUnknown.

Reconnecting: psycopg_pool retries a failed connection after 1 s, then 2, 4, 8 s,
which kept the log unavailable 6-10 s after a PostgreSQL restart that took ~1 s.
The pool has no option for it; its backoff class attributes are the knob, set
once at import (`_RECONNECT_*`): 0.1 s growing by 1.5 (attempts at about 0.1,
0.25, 0.5, 0.8, 1.3, 2, 3 s ...), still bounded by the pool's reconnect timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from psycopg_pool.base import AttemptWithBackoff

from vim.errors import EventLogUnavailable
from vim.eventlog import pgarrays
from vim.eventlog.backend import CommitUnknown
from vim.eventlog.batching import (
    BatchWrites,
    EventRow,
    LogState,
    Outcome,
    StoredRequest,
    plan_batch,
)
from vim.eventlog.model import ANY_VERSION, AppendResult, PreparedAppend
from vim.eventlog.pgarrays import Int4Array, Int8Array, TextArray, TimestamptzArray
from vim.eventlog.store import EventLogConfig

log = logging.getLogger(__name__)

pgarrays.register()

_EVENT_COLUMNS = (
    Int8Array,  # position (an offset in `_WRITE_BATCH`)
    TextArray,  # stream_id
    Int4Array,  # version
    TextArray,  # event_id
    TextArray,  # type
    Int4Array,  # schema_version
    TextArray,  # data
    TextArray,  # metadata
    TimestamptzArray,  # recorded_at
)
_STREAM_COLUMNS = (TextArray, Int4Array, Int8Array)  # stream_id, version, position
_REQUEST_COLUMNS = (TextArray, TextArray, TextArray, Int8Array, TimestamptzArray)
"""request_id, fingerprint, result, position, recorded_at."""


def _columns(rows: Collection[Sequence[Any]], kinds: Sequence[type[list[Any]]]) -> list[Any]:
    """Rows as one typed array per column (see `vim.eventlog.pgarrays`)."""
    if not rows:
        return [kind() for kind in kinds]
    return [kind(col) for kind, col in zip(kinds, zip(*rows, strict=True), strict=True)]


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


# Lookups by key go through a scalar subquery, or a LATERAL subquery kept apart
# from the outer query by OFFSET 0, on `unnest` of the keys: the only plan is one
# index probe per key. A join of `unnest` with the table could be planned as a hash
# join over a sequential scan; a prepared statement planned (and kept) while the
# tables are empty, before autovacuum's first ANALYZE, then read every stream on
# every append (7 ms per batch at 50 000 streams).
_STREAM_VERSIONS = (
    "SELECT x.s, (SELECT st.version FROM streams st WHERE st.stream_id = x.s) "
    "FROM unnest(%b::text[]) AS x(s)"
)
"""The version of each stream named; NULL for one not yet written."""
_STORED_REQUESTS = (
    "SELECT x.r, q.fingerprint, q.result FROM unnest(%b::text[]) AS x(r) "
    "CROSS JOIN LATERAL (SELECT fingerprint, result FROM requests "
    "WHERE request_id = x.r OFFSET 0) AS q"
)
_READ_STATE = (
    "SELECT x.s, (SELECT st.version FROM streams st WHERE st.stream_id = x.s), NULL, NULL "
    "FROM unnest(%b::text[]) AS x(s) "
    "UNION ALL SELECT NULL, NULL, x.r, q.fingerprint FROM unnest(%b::text[]) AS x(r) "
    "CROSS JOIN LATERAL (SELECT fingerprint FROM requests WHERE request_id = x.r OFFSET 0) "
    "AS q"
)
"""Step 1 of an optimistic batch: stream versions (NULL for a new stream) and recorded
request ids, no lock. A stored request's result is not read here: a repeat is rare
and is answered by the locked path, which reads it under the lock."""
_WRITE_BATCH = (
    "WITH h AS (UPDATE log_head SET position = position + %b::bigint WHERE id = 1 "
    "AND NOT EXISTS (SELECT 1 FROM unnest(%b::text[], %b::int[]) AS x(s, v) WHERE "
    "coalesce((SELECT st.version FROM streams st WHERE st.stream_id = x.s), 0) < x.v) "
    "RETURNING position - %b::bigint AS base), "
    "ev AS (INSERT INTO events (position, stream_id, version, event_id, type, schema_version, "
    "data, metadata, recorded_at) SELECT h.base + e.o, e.s, e.v, e.i, e.t, e.sv, e.d, e.m, e.a "
    "FROM h, unnest(%b::bigint[], %b::text[], %b::int[], %b::text[], %b::text[], %b::int[], "
    "%b::text[], %b::text[], %b::timestamptz[]) AS e(o, s, v, i, t, sv, d, m, a)), "
    "st AS (INSERT INTO streams (stream_id, version, position) SELECT s.s, s.v, h.base + s.o "
    "FROM h, unnest(%b::text[], %b::int[], %b::bigint[]) AS s(s, v, o) "
    "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, "
    "position = excluded.position), "
    "rq AS (INSERT INTO requests (request_id, fingerprint, result, position, recorded_at) "
    "SELECT r.r, r.f, (r.j::jsonb || jsonb_build_object('first_position', "
    "h.base + (r.j::jsonb->>'first_position')::bigint, 'last_position', h.base + r.o))::text, "
    "h.base + r.o, r.a FROM h, unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], "
    "%b::timestamptz[]) AS r(r, f, j, o, a)) "
    "SELECT h.base, pg_notify('" + NOTIFY_CHANNEL + "', (h.base + %b::bigint)::text) FROM h"
)
"""Step 2 of an optimistic batch: every write, positions from the head, one statement.
Data-modifying CTEs all run to completion, after `h` (they read its base); when
the guard in `h` finds a stream behind an assumed version, `h` is empty and so is
every insert (and the result)."""


_RECONNECT_INITIAL_S = 0.1
_RECONNECT_BACKOFF = 1.5
AttemptWithBackoff.INITIAL_DELAY = _RECONNECT_INITIAL_S
AttemptWithBackoff.DELAY_BACKOFF = _RECONNECT_BACKOFF


class PostgresBackend:
    """`Backend` on PostgreSQL; see the module docstring."""

    announces_head = True

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
            if _optimistic(batch):
                assumed = _assumed_versions(batch)
                if assumed is not None:
                    outcomes = await self._write_assuming(conn, batch, assumed)
                    if outcomes is not None:
                        return outcomes
                outcomes = await self._decide_and_write_optimistic(conn, batch)
                if outcomes is not None:
                    return outcomes
            return await self._decide_and_write_locked(conn, batch)

    async def _write_assuming(
        self,
        conn: psycopg.AsyncConnection[Any],
        batch: Sequence[PreparedAppend],
        assumed: dict[str, int],
    ) -> list[Outcome] | None:
        """The batch written in one statement on the versions its appends expect
        (module docstring); None when it must be decided on what the log holds."""
        outcomes, w = plan_batch(batch, LogState(0, dict(assumed), {}, {}), datetime.now(UTC))
        if not w.events or not all(isinstance(o, AppendResult) for o in outcomes):
            return None
        return await self._write_planned(conn, outcomes, w, assumed)

    async def _write_planned(
        self,
        conn: psycopg.AsyncConnection[Any],
        outcomes: list[Outcome],
        w: BatchWrites,
        assumed: dict[str, int],
    ) -> list[Outcome] | None:
        """`_WRITE_BATCH`; None when nothing was written (a stale read or assumption)."""
        try:
            cur = await conn.execute(_WRITE_BATCH, _write_params(w, assumed))
            row = await cur.fetchone()
        except psycopg.errors.UniqueViolation:
            return None  # the read was stale: nothing was written, decide under the lock
        except psycopg.OperationalError as exc:
            # The connection died while the one statement (and its commit) ran.
            raise CommitUnknown() from exc
        if row is None:
            return None  # the guard: a stream behind what was assumed
        base = int(row[0])
        return [_shifted(o, base) for o in outcomes]

    async def _decide_and_write_optimistic(
        self, conn: psycopg.AsyncConnection[Any], batch: Sequence[PreparedAppend]
    ) -> list[Outcome] | None:
        """Steps 1 and 2 of the module docstring; None when the batch must be decided
        again under the lock (a stale read, or a request id already recorded)."""
        ids = list({s.stream_id for p in batch for s in p.streams})
        rids = [p.metadata.request_id for p in batch if p.metadata.request_id]
        cur = await conn.execute(_READ_STATE, (TextArray(ids), TextArray(rids)))
        versions: dict[str, int] = {}
        for stream_id, version, rid, _fp in await cur.fetchall():
            if rid is not None:
                return None  # a repeat: the locked path reads its stored result
            if version is not None:
                versions[stream_id] = version
        state = LogState(0, versions, {}, {})
        now = datetime.now(UTC)
        outcomes, w = plan_batch(batch, state, now)
        if not w.events:
            return outcomes
        return await self._write_planned(conn, outcomes, w, {})

    async def _decide_and_write_locked(
        self, conn: psycopg.AsyncConnection[Any], batch: Sequence[PreparedAppend]
    ) -> list[Outcome]:
        ids = list({s.stream_id for p in batch for s in p.streams})
        rids = list({p.metadata.request_id for p in batch if p.metadata.request_id})
        roles = list({p.metadata.fencing_role for p in batch if p.metadata.fencing_role})
        head_c, st_c, rq_c, fe_c = (conn.cursor() for _ in range(4))
        async with conn.pipeline():
            await head_c.execute("BEGIN")
            await head_c.execute("SELECT position FROM log_head WHERE id = 1 FOR UPDATE")
            await st_c.execute(_STREAM_VERSIONS, (TextArray(ids),))
            if rids:
                await rq_c.execute(_STORED_REQUESTS, (TextArray(rids),))
            if roles:
                await fe_c.execute("SELECT role, token FROM fencing WHERE role = ANY(%s)", (roles,))
        row = await head_c.fetchone()
        assert row is not None, "log_head row missing: the schema was not migrated"
        versions = {sid: v for sid, v in await st_c.fetchall() if v is not None}
        state = LogState(int(row[0]), versions, {}, {})
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
            await cur.execute(_INSERT_EVENTS, _columns(w.events, _EVENT_COLUMNS))
            streams = [(k, v, p) for k, (v, p) in w.streams.items()]
            await cur.execute(_UPSERT_STREAMS, _columns(streams, _STREAM_COLUMNS))
            if w.requests:
                await cur.execute(_INSERT_REQUESTS, _columns(w.requests, _REQUEST_COLUMNS))
            if w.tokens:
                tokens = (TextArray(w.tokens), Int8Array(w.tokens.values()))
                await cur.execute(_UPSERT_TOKENS, tokens)
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

    async def follow(self, wake: Callable[[int | None], None], stopped: Callable[[], bool]) -> None:
        """LISTEN on a connection of its own; reconnect until stopped. Hints only.

        A notification's payload is the head its transaction committed (every
        position up to it is visible: the head lock is released only at commit)."""
        while not stopped():
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True, connect_timeout=2
                )
                async with conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    wake(None)  # whatever was committed while we were not listening
                    async for n in conn.notifies():
                        wake(int(n.payload) if n.payload.isdigit() else None)
            except (psycopg.Error, OSError) as exc:
                log.debug("event log listener reconnecting: %s", exc)
            await asyncio.sleep(self._config.retry_backoff_s)

    async def close(self) -> None:
        await self._pool.close()


def _optimistic(batch: Sequence[PreparedAppend]) -> bool:
    """Whether a batch may be decided without the lock: no fencing tokens (they are
    only read and written under the head lock) and no request id twice (a repeat
    within the batch would be answered with offsets, not positions)."""
    rids: set[str] = set()
    for p in batch:
        if p.metadata.fencing_role is not None:
            return False
        rid = p.metadata.request_id
        if rid is not None:
            if rid in rids:
                return False
            rids.add(rid)
    return True


def _assumed_versions(batch: Sequence[PreparedAppend]) -> dict[str, int] | None:
    """Each stream at the version the first append naming it expects; None when one
    is first named at any version (nothing to assume)."""
    versions: dict[str, int] = {}
    for p in batch:
        for s in p.streams:
            if s.stream_id not in versions:
                if s.expected_version == ANY_VERSION:
                    return None
                versions[s.stream_id] = s.expected_version
    return versions


def _write_params(w: BatchWrites, assumed: dict[str, int]) -> list[Any]:
    """`_WRITE_BATCH`'s parameters: positions in `w` are offsets from the head."""
    n = w.head
    events = _columns(w.events, _EVENT_COLUMNS)
    streams = _columns([(k, v, p) for k, (v, p) in w.streams.items()], _STREAM_COLUMNS)
    requests = _columns(w.requests, _REQUEST_COLUMNS)
    guard = [TextArray(assumed), Int4Array(assumed.values())]
    return [n, *guard, n, *events, *streams, *requests, n]


def _shifted(outcome: Outcome, base: int) -> Outcome:
    """An outcome planned with offsets, at its real positions (replays already are)."""
    if isinstance(outcome, AppendResult) and not outcome.replayed:
        o = outcome  # built directly: `dataclasses.replace` costs ~10 µs per append
        return AppendResult(
            o.first_position + base,
            o.last_position + base,
            o.versions,
            o.recorded_at,
            o.request_id,
            o.response,
            o.replayed,
        )
    return outcome
