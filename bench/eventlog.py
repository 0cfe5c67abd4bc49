"""Event-log benchmark: durable append and catch-up read throughput on PostgreSQL.

Run ``python -m bench.eventlog --quick`` (under 2 minutes) or ``python -m bench.eventlog``
(``make bench``, a few minutes). Method:

* One fresh PostgreSQL 15 server is started by ``vim.harness.postgres`` with durable
  settings (``fsync``, ``synchronous_commit`` and ``full_page_writes`` on; checked with
  ``SHOW`` before measuring), on 127.0.0.1 and a random port, and removed at the end
  (also on error and Ctrl-C). Each contender gets its own database.
* Append contenders, each with 1 and with 8 concurrent writers. A writer appends ONE
  event (about 200 bytes of JSON) and waits for the acknowledgement before the next;
  every acknowledgement means the event is committed and flushed to disk:

  - ``vim``: our ``SqlEventLog`` (asyncio tasks in one process sharing one log, so
    concurrent appends are group-committed). Each writer appends to its own stream
    at the next expected version, so every append also passes a version check.
  - ``eventsourcing``: the ``eventsourcing`` library's ``PostgresApplicationRecorder``
    (threads, as it is synchronous; one pooled connection per thread) inserting one
    ``StoredEvent`` per call at successive versions of the writer's own aggregate.
    It takes an EXCLUSIVE table lock per insert, so its inserts are serialised.
  - ``raw``: the ceiling, psycopg single-row ``INSERT`` into a plain table in
    autocommit mode (one commit per row), one thread and connection per writer
    (synchronous psycopg: on this machine it costs less client CPU per statement
    than the asyncio driver, so it is the higher ceiling). PostgreSQL itself
    groups the WAL flushes of concurrent commits.

  Every run lasts a fixed time: a warm-up that is not counted, then a measurement
  window; only appends acknowledged inside the window count. Runs are interleaved
  (contender order rotates every round) and a rate is the median over rounds.
* Catch-up read: the vim log is filled to a fixed size, then read from position 0
  with ``read_all(after=cursor, limit=500)`` until exhausted (events decoded into
  ``RecordedEvent``), versus a raw psycopg ``SELECT * ... WHERE position > %s ORDER BY
  position LIMIT 500`` scan of the same table returning tuples. An untimed raw scan
  first warms the caches; the figure is the median over passes.
* Consistency is checked at the end: the log head equals the number of events
  acknowledged, and every contender's table holds exactly the rows acknowledged.

Progress goes to stderr; the last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import psycopg

from bench._common import (
    RateResult,
    Sample,
    Window,
    emit_result,
    median,
    progress,
    ratio,
    summarize,
)
from vim.eventlog.model import AppendRequest, NewEvent, StreamAppend, encode_json
from vim.eventlog.sql import SqlEventLog
from vim.harness.postgres import PostgresServer

WRITER_COUNTS = (1, 8)
CONTENDERS = ("vim", "eventsourcing", "raw")
EVENT_TYPE = "BenchServerCreated"
ES_TOPIC = "bench.eventlog:BenchServerCreated"
READ_LIMIT = 500
FILL_EVENTS_PER_APPEND = 500
FILL_CONCURRENCY = 4
MAX_OPS_PER_WRITER = 1_000_000
JOIN_GRACE_S = 30.0
TARGET_VS_EVENTSOURCING_8W = 2.0
TARGET_VS_RAW_INSERT_8W = 0.5
DB_VIM, DB_ES, DB_RAW = "bench_vim", "bench_eventsourcing", "bench_raw"
RAW_TABLE_DDL = (
    "CREATE TABLE raw_events (id bigserial PRIMARY KEY, stream_id text NOT NULL, "
    "version integer NOT NULL, data text NOT NULL)"
)
RAW_INSERT = "INSERT INTO raw_events (stream_id, version, data) VALUES (%s, %s, %s)"
RAW_SELECT = "SELECT * FROM events WHERE position > %s ORDER BY position LIMIT %s"

_STOP = threading.Event()
"""Set on the way out so that writer threads stop even if the main thread is interrupted."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how often; QUICK must finish in under 2 minutes on 2 cores."""

    rounds: int
    warmup_s: float
    measure_s: float
    log_events: int
    read_passes: int


QUICK = Settings(rounds=3, warmup_s=0.5, measure_s=2.0, log_events=60_000, read_passes=3)
FULL = Settings(rounds=5, warmup_s=1.5, measure_s=8.0, log_events=300_000, read_passes=5)


@dataclass(slots=True)
class Bench:
    """Everything a run needs: the server, the open stores, and the running totals."""

    pg: PostgresServer
    settings: Settings
    log: SqlEventLog
    es_recorder: Any
    load_start: float = field(default_factory=lambda: round(os.getloadavg()[0], 2))
    vim_events_acked: int = 0
    es_rows_acked: int = 0
    raw_rows_acked: int = 0
    rates: dict[tuple[str, int], list[RateResult]] = field(default_factory=dict)
    appends_per_commit: dict[int, list[float]] = field(default_factory=dict)


# -- payload ---------------------------------------------------------------------------


def _payload(writer: int, seq: int) -> dict[str, Any]:
    """A server-created event of about 200 bytes of canonical JSON."""
    return {
        "server_id": f"srv-{writer:03d}-{seq:09d}",
        "tenant": "tenant-benchmark",
        "name": f"web-{seq:09d}",
        "flavor": "m1.small",
        "image": "debian-12-genericcloud-amd64",
        "host": "compute-01",
        "ports": ["port-mgmt", "port-data"],
        "state": "BUILD",
    }


PAYLOAD_BYTES = len(encode_json(_payload(0, 0)))


def _append_one(stream: str, version: int, writer: int) -> AppendRequest:
    event = NewEvent(EVENT_TYPE, _payload(writer, version))
    return AppendRequest(streams=(StreamAppend(stream, version, (event,)),))


# -- append contenders -----------------------------------------------------------------


async def _bounded_gather(jobs: Sequence[Awaitable[None]], window: Window) -> None:
    """Run the writers; they stop at window.end, so allow only a grace period more."""
    timeout = max(0.0, window.end - time.perf_counter()) + JOIN_GRACE_S
    await asyncio.wait_for(asyncio.gather(*jobs), timeout)


async def _run_vim(b: Bench, writers: int, tag: str) -> list[Sample]:
    samples: list[Sample] = []
    commits: set[datetime] = set()
    window = Window.after_warmup(b.settings.warmup_s, b.settings.measure_s)

    async def writer(i: int) -> None:
        stream = f"bench-{tag}-w{i}"
        for version in range(MAX_OPS_PER_WRITER):
            started = time.perf_counter()
            if started >= window.end:
                return
            result = await b.log.append(_append_one(stream, version, i))
            samples.append((started, time.perf_counter()))
            commits.add(result.recorded_at)

    await _bounded_gather([writer(i) for i in range(writers)], window)
    b.vim_events_acked += len(samples)
    b.appends_per_commit.setdefault(writers, []).append(ratio(len(samples), len(commits)))
    _record(b, "vim", writers, samples, window)
    return samples


WriterOp = Callable[[int], None]
"""One blocking append at the given version (1, 2, ...)."""


def _thread_writers(
    writers: int, window: Window, open_writer: Callable[[int], tuple[WriterOp, Callable[[], None]]]
) -> list[Sample]:
    """Blocking: `writers` threads, each doing ops until window.end; returns their samples.

    `open_writer(i)` runs in thread i before its first op (during the warm-up) and
    returns the op and a function that releases what the writer opened.
    """
    samples: list[Sample] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            op, close = open_writer(i)
            try:
                for version in range(1, MAX_OPS_PER_WRITER + 1):
                    started = time.perf_counter()
                    if started >= window.end or _STOP.is_set():
                        return
                    op(version)
                    samples.append((started, time.perf_counter()))
            finally:
                close()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(i,), name=f"bench-writer-{i}", daemon=True)
        for i in range(writers)
    ]
    for t in threads:
        t.start()
    deadline = window.end + JOIN_GRACE_S
    for t in threads:
        t.join(max(0.0, deadline - time.perf_counter()))
    if any(t.is_alive() for t in threads):
        _STOP.set()
        raise RuntimeError("writer threads did not stop in time")
    if errors:
        raise errors[0]
    return samples


async def _run_raw(b: Bench, writers: int, tag: str) -> list[Sample]:
    dsn = b.pg.dsn(DB_RAW)

    def open_writer(i: int) -> tuple[WriterOp, Callable[[], None]]:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        stream = f"bench-{tag}-w{i}"

        def op(version: int) -> None:
            conn.execute(RAW_INSERT, (stream, version, encode_json(_payload(i, version))))

        return op, conn.close

    window = Window.after_warmup(b.settings.warmup_s, b.settings.measure_s)
    samples = await asyncio.to_thread(_thread_writers, writers, window, open_writer)
    b.raw_rows_acked += len(samples)
    _record(b, "raw", writers, samples, window)
    return samples


async def _run_es(b: Bench, writers: int, tag: str) -> list[Sample]:
    from eventsourcing.persistence import StoredEvent

    del tag  # each writer appends to a fresh aggregate id
    recorder = b.es_recorder

    def open_writer(i: int) -> tuple[WriterOp, Callable[[], None]]:
        originator = uuid.uuid4()

        def op(version: int) -> None:
            state = encode_json(_payload(i, version)).encode()
            recorder.insert_events([StoredEvent(originator, version, ES_TOPIC, state)])

        return op, lambda: None

    window = Window.after_warmup(b.settings.warmup_s, b.settings.measure_s)
    samples = await asyncio.to_thread(_thread_writers, writers, window, open_writer)
    b.es_rows_acked += len(samples)
    _record(b, "eventsourcing", writers, samples, window)
    return samples


def _record(b: Bench, contender: str, writers: int, samples: list[Sample], w: Window) -> None:
    result = summarize(samples, w)
    b.rates.setdefault((contender, writers), []).append(result)
    progress(
        f"  {contender:>13} {writers}w: {result.per_s:9.1f} appends/s "
        f"(p50 {result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, {result.ops} in window)"
    )


RUNNERS: dict[str, Callable[[Bench, int, str], Awaitable[list[Sample]]]] = {
    "vim": _run_vim,
    "eventsourcing": _run_es,
    "raw": _run_raw,
}


async def _append_rounds(b: Bench) -> None:
    for rnd in range(b.settings.rounds):
        order = CONTENDERS[rnd % len(CONTENDERS) :] + CONTENDERS[: rnd % len(CONTENDERS)]
        for writers in WRITER_COUNTS:
            progress(f"round {rnd + 1}/{b.settings.rounds}, {writers} writer(s): {order}")
            for contender in order:
                await RUNNERS[contender](b, writers, f"r{rnd}n{writers}")


# -- catch-up read ---------------------------------------------------------------------


async def _fill(b: Bench) -> int:
    """Append big multi-event appends until the log holds settings.log_events events."""
    missing = max(0, b.settings.log_events - await b.log.head())
    chunks = math.ceil(missing / FILL_EVENTS_PER_APPEND)
    progress(f"filling the vim log with {missing} events ({chunks} appends)")
    queue = list(range(chunks))

    async def filler() -> None:
        for _ in range(chunks):
            if not queue:
                return
            chunk = queue.pop()
            n = min(FILL_EVENTS_PER_APPEND, missing - chunk * FILL_EVENTS_PER_APPEND)
            events = tuple(NewEvent(EVENT_TYPE, _payload(chunk, i)) for i in range(n))
            await b.log.append(AppendRequest(streams=(StreamAppend(f"fill-{chunk}", 0, events),)))
            b.vim_events_acked += n

    await asyncio.wait_for(asyncio.gather(*(filler() for _ in range(FILL_CONCURRENCY))), 600)
    return missing


async def _scan_vim(b: Bench, head: int) -> tuple[int, float]:
    cursor, count = 0, 0
    started = time.perf_counter()
    for _ in range(head // READ_LIMIT + 2):
        batch = await b.log.read_all(after=cursor, limit=READ_LIMIT)
        if not batch:
            break
        count += len(batch)
        cursor = batch[-1].position
    return count, time.perf_counter() - started


async def _scan_raw(b: Bench, head: int) -> tuple[int, float]:
    async with await psycopg.AsyncConnection.connect(
        b.pg.dsn(DB_VIM), autocommit=True, connect_timeout=10
    ) as conn:
        cursor, count = 0, 0
        started = time.perf_counter()
        for _ in range(head // READ_LIMIT + 2):
            cur = await conn.execute(RAW_SELECT, (cursor, READ_LIMIT))
            rows = await cur.fetchall()
            if not rows:
                break
            count += len(rows)
            cursor = rows[-1][0]
        return count, time.perf_counter() - started


async def _catch_up(b: Bench) -> dict[str, Any]:
    await _fill(b)
    head = await b.log.head()
    await _scan_raw(b, head)  # untimed: brings the table into the caches
    ours: list[float] = []
    raw: list[float] = []
    for p in range(b.settings.read_passes):
        for name, scan, rates in (("vim", _scan_vim, ours), ("raw", _scan_raw, raw)):
            count, seconds = await scan(b, head)
            if count != head:
                raise RuntimeError(f"{name} scan read {count} events, the log holds {head}")
            rates.append(count / seconds)
            progress(
                f"  read pass {p + 1} {name:>3}: {count} events in {seconds:.2f} s "
                f"= {count / seconds:9.0f} events/s"
            )
    return {"log_events": head, "catchup": ours, "raw_select": raw}


# -- set-up, checks, result ------------------------------------------------------------


def _server_facts(pg: PostgresServer) -> dict[str, str]:
    names = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_sync_method")
    with psycopg.connect(pg.dsn(DB_RAW), autocommit=True, connect_timeout=10) as conn:
        facts = {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[index]
    if facts["fsync"] != "on" or facts["synchronous_commit"] != "on":
        raise RuntimeError(f"PostgreSQL is not durable, refusing to measure: {facts}")
    return facts


def _count_rows(pg: PostgresServer, db: str, table: str) -> int:
    with psycopg.connect(pg.dsn(db), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else -1


def _open_es(pg: PostgresServer) -> Any:
    from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore

    datastore = PostgresDatastore(
        dbname=DB_ES,
        host=pg.host,
        port=pg.port,
        user=pg.user,
        password="",
        pool_size=max(WRITER_COUNTS),
    )
    recorder = PostgresApplicationRecorder(datastore)
    recorder.create_table()
    return recorder


async def _measure(pg: PostgresServer, settings: Settings) -> dict[str, Any]:
    for db in (DB_VIM, DB_ES, DB_RAW):
        pg.create_database(db)
    with psycopg.connect(pg.dsn(DB_RAW), autocommit=True, connect_timeout=10) as conn:
        conn.execute(RAW_TABLE_DDL)
    facts = _server_facts(pg)
    progress(f"PostgreSQL {facts['server_version']} on 127.0.0.1:{pg.port}, durable: {facts}")
    es_recorder = await asyncio.to_thread(_open_es, pg)
    log = await SqlEventLog.open(pg.sqlalchemy_url(DB_VIM))
    b = Bench(pg=pg, settings=settings, log=log, es_recorder=es_recorder)
    try:
        await _append_rounds(b)
        reads = await _catch_up(b)
        head = await log.head()
    except BaseException:
        _STOP.set()  # writer threads still running give up at their next op
        raise
    finally:
        await log.close()
        es_recorder.datastore.close()
    checks = {
        "vim_head_equals_acked": head == b.vim_events_acked,
        "eventsourcing_rows_equal_acked": _count_rows(pg, DB_ES, "stored_events")
        == b.es_rows_acked,
        "raw_rows_equal_acked": _count_rows(pg, DB_RAW, "raw_events") == b.raw_rows_acked,
    }
    if not all(checks.values()):
        raise RuntimeError(f"consistency check failed: {checks}")
    return _result(b, facts, reads, checks)


def _result(
    b: Bench, facts: dict[str, str], reads: dict[str, Any], checks: dict[str, bool]
) -> dict[str, Any]:
    def rate(contender: str, writers: int) -> float:
        return median([r.per_s for r in b.rates[(contender, writers)]])

    out: dict[str, Any] = {}
    names = {
        "vim": "events_per_s",
        "eventsourcing": "eventsourcing_events_per_s",
        "raw": "raw_insert_per_s",
    }
    for contender, prefix in names.items():
        for writers in WRITER_COUNTS:
            out[f"{prefix}_{writers}w"] = round(rate(contender, writers), 1)
    for writers in WRITER_COUNTS:
        ours = rate("vim", writers)
        out[f"ratio_vs_eventsourcing_{writers}w"] = round(
            ratio(ours, rate("eventsourcing", writers)), 3
        )
        out[f"ratio_vs_raw_insert_{writers}w"] = round(ratio(ours, rate("raw", writers)), 3)
        out[f"appends_per_commit_{writers}w"] = round(median(b.appends_per_commit[writers]), 2)
    catchup, raw_select = median(reads["catchup"]), median(reads["raw_select"])
    out["catchup_events_per_s"] = round(catchup, 1)
    out["raw_select_rows_per_s"] = round(raw_select, 1)
    out["ratio_catchup_vs_raw_select"] = round(ratio(catchup, raw_select), 3)
    out["targets_met"] = {
        "ratio_vs_eventsourcing_8w>=2.0": out["ratio_vs_eventsourcing_8w"]
        >= TARGET_VS_EVENTSOURCING_8W,
        "ratio_vs_raw_insert_8w>=0.5": out["ratio_vs_raw_insert_8w"] >= TARGET_VS_RAW_INSERT_8W,
    }
    out["latency_ms"] = {
        f"{c}_{w}w": {
            "p50": round(median([r.p50_ms for r in rs]), 3),
            "p99": round(median([r.p99_ms for r in rs]), 3),
        }
        for (c, w), rs in sorted(b.rates.items())
    }
    out["runs"] = {f"{c}_{w}w": [r.to_json() for r in rs] for (c, w), rs in sorted(b.rates.items())}
    out["settings"] = {
        "rounds": b.settings.rounds,
        "warmup_s": b.settings.warmup_s,
        "measure_s": b.settings.measure_s,
        "read_passes": b.settings.read_passes,
        "read_limit": READ_LIMIT,
        "payload_bytes": PAYLOAD_BYTES,
        "log_events": reads["log_events"],
        "cpus": os.cpu_count(),
    }
    out["postgres"] = facts
    out["loadavg_1m"] = {"start": b.load_start, "end": round(os.getloadavg()[0], 2)}
    out["checks"] = checks
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.eventlog", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="short run, under 2 minutes")
    parser.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    parser.add_argument("--seconds", type=float, help="override the measured seconds per run")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = replace(settings, rounds=max(1, min(args.rounds, 20)))
    if args.seconds is not None:
        settings = replace(settings, measure_s=max(1.0, min(args.seconds, 120.0)))
    started = time.perf_counter()
    progress(f"event-log benchmark ({'quick' if args.quick else 'full'}): {settings}")
    pg: PostgresServer | None = None
    try:
        pg = PostgresServer.start(fsync=True)
        result = asyncio.run(_measure(pg, settings))
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    finally:
        _STOP.set()
        if pg is not None:
            progress("stopping PostgreSQL")
            pg.cleanup()
    result["quick"] = bool(args.quick)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    progress(f"done in {result['elapsed_s']} s")
    emit_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
