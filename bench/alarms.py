"""Alarm benchmark: the reactor's throughput and the alarm stream's cost, side by side.

Run ``python -m bench.alarms --quick`` (under a minute) or ``python -m bench.alarms``.
Method (one fresh durable PostgreSQL 15 from ``vim.harness.postgres``, one migrated
database, one ``vim-api`` process on it, the alarm reactor in this process):

* Reactor: ``facts`` fault facts are appended first (per server a ``ServerCrashed``,
  which raises an alarm, then a ``ServerStateReported`` RUNNING, which clears it),
  then ``AlarmReactor.catch_up()`` decides all of them (one fenced append per fact).
  Baseline in the same run: the same number of single-event appends by one writer
  (what each reactor step costs at least). Ratio: reactor facts/s over appends/s.
* Replay: every alarm notification from cursor 0 through ``Alarms.SubscribeAlarms``
  against the same events through ``EventLog.Watch`` (kind ``alarm``) on the same node.
  Ratio: SubscribeAlarms events/s over Watch events/s.
* Live latency: ``probes`` crashes appended one at a time; for each, the time until its
  fact arrives on a ``Watch`` and until its alarm notification arrives on a
  ``SubscribeAlarms`` (the reactor following the log meanwhile). p50 and p99 of both.

Progress goes to stderr; the last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import grpc

from bench._common import emit_result, median, percentile, progress, ratio
from ha.election.base import Leadership
from vim._gen.vim.v1 import alarms_pb2, alarms_pb2_grpc, events_pb2, events_pb2_grpc
from vim.alarms import AlarmReactor
from vim.api.auth import Authenticator
from vim.domain import server
from vim.domain.base import DomainEvent
from vim.domain.faults import ServerCrashed
from vim.eventlog import migrating
from vim.eventlog.model import ANY_VERSION, AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.sql import SqlEventLog
from vim.harness.apinode import ApiNodeProcess
from vim.harness.postgres import PostgresServer
from vim.projections.readmodel import Projector

SECRET = b"alarm-bench-secret-of-at-least-32-bytes!"
TOKEN = Authenticator(SECRET).mint("bench", "ops", ["admin"])
MD = (("authorization", f"Bearer {TOKEN}"),)
AT = "2026-11-22T08:00:00.000Z"


def sid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


async def put(log: SqlEventLog, stream_id: str, event: DomainEvent) -> int:
    new = NewEvent(event.type, event.to_data(), event.SCHEMA_VERSION)
    req = AppendRequest([StreamAppend(stream_id, ANY_VERSION, [new])], Metadata(actor="bench"))
    return (await log.append(req)).last_position


def term() -> Leadership:
    return Leadership("faultd", "bench", 1, datetime.now(UTC), 1, 10.0, "local")


async def reactor_phase(log: SqlEventLog, reactor: AlarmReactor, facts: int) -> dict[str, float]:
    flavor = server.FlavorCopy("f", "m1", 1, 512, 1)
    servers = facts // 2
    for i in range(servers):
        await put(
            log, server.stream(sid(i)), server.allocate(sid(i), "t", "vm", flavor, "i", [], now=AT)
        )
    t0 = time.perf_counter()
    for i in range(servers):
        await put(log, server.stream(sid(i)), ServerCrashed(sid(i), "cmp-1", "bench", AT))
        report = server.ServerStateReported(sid(i), "cmp-1", "ACTIVE", "RUNNING", reported_at=AT)
        await put(log, server.stream(sid(i)), report)
    appends_s = time.perf_counter() - t0
    progress(f"{2 * servers} facts appended in {appends_s:.2f} s; reactor deciding")
    t0 = time.perf_counter()
    await reactor.catch_up()
    reactor_s = time.perf_counter() - t0
    appends_per_s = 2 * servers / appends_s
    facts_per_s = 2 * servers / reactor_s
    return {
        "facts": 2 * servers,
        "single_appends_per_s": appends_per_s,
        "reactor_facts_per_s": facts_per_s,
        "reactor_over_appends": ratio(facts_per_s, appends_per_s),
    }


async def replay_phase(channel: grpc.aio.Channel, expected: int) -> dict[str, float]:
    alarms = alarms_pb2_grpc.AlarmsStub(channel)
    events = events_pb2_grpc.EventLogStub(channel)

    async def subscribe() -> float:
        t0, n = time.perf_counter(), 0
        call = alarms.SubscribeAlarms(alarms_pb2.SubscribeAlarmsRequest(), metadata=MD)
        async for msg in call:
            n += msg.HasField("notification")
            if n == expected:
                break
        call.cancel()
        return time.perf_counter() - t0

    async def watch() -> float:
        t0, n = time.perf_counter(), 0
        call = events.Watch(events_pb2.WatchEventsRequest(stream_kinds=["alarm"]), metadata=MD)
        async for _ in call:
            n += 1
            if n == expected:
                break
        call.cancel()
        return time.perf_counter() - t0

    watch_s, sub_s = await watch(), await subscribe()
    return {
        "notifications": expected,
        "watch_events_per_s": expected / watch_s,
        "subscribe_notifications_per_s": expected / sub_s,
        "subscribe_over_watch": ratio(expected / sub_s, expected / watch_s),
    }


async def latency_phase(
    log: SqlEventLog, channel: grpc.aio.Channel, base: int, probes: int
) -> dict[str, float]:
    alarms = alarms_pb2_grpc.AlarmsStub(channel)
    events = events_pb2_grpc.EventLogStub(channel)
    head = await log.head()
    seen_fact: dict[str, float] = {}
    seen_alarm: dict[str, float] = {}
    arrived = asyncio.Event()

    async def follow_watch() -> None:
        req = events_pb2.WatchEventsRequest(from_position=head, types=["ServerCrashed"])
        async for e in events.Watch(req, metadata=MD):
            seen_fact[e.stream_id.split("-", 1)[1]] = time.perf_counter()
            arrived.set()

    async def follow_alarms() -> None:
        req = alarms_pb2.SubscribeAlarmsRequest(cursor=str(head))
        async for m in alarms.SubscribeAlarms(req, metadata=MD):
            if m.notification.change == alarms_pb2.ALARM_CHANGE_RAISED:
                seen_alarm[m.notification.alarm.managed_object_id] = time.perf_counter()
                arrived.set()

    tasks = [asyncio.create_task(follow_watch()), asyncio.create_task(follow_alarms())]
    fact_ms: list[float] = []
    alarm_ms: list[float] = []
    flavor = server.FlavorCopy("f", "m1", 1, 512, 1)
    try:
        await asyncio.sleep(0.2)  # both streams established (a bench warm-up, not a test)
        for i in range(base, base + probes):
            await put(
                log,
                server.stream(sid(i)),
                server.allocate(sid(i), "t", "vm", flavor, "i", [], now=AT),
            )
            t0 = time.perf_counter()
            await put(log, server.stream(sid(i)), ServerCrashed(sid(i), "cmp-1", "bench", AT))
            async with asyncio.timeout(10):
                while sid(i) not in seen_alarm or sid(i) not in seen_fact:
                    await arrived.wait()
                    arrived.clear()
            fact_ms.append((seen_fact[sid(i)] - t0) * 1000)
            alarm_ms.append((seen_alarm[sid(i)] - t0) * 1000)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "probes": probes,
        "watch_fact_p50_ms": median(fact_ms),
        "watch_fact_p99_ms": percentile(fact_ms, 99),
        "alarm_notification_p50_ms": median(alarm_ms),
        "alarm_notification_p99_ms": percentile(alarm_ms, 99),
        "alarm_over_watch_p50": ratio(median(alarm_ms), median(fact_ms)),
    }


async def run(url: str, node: ApiNodeProcess, facts: int, probes: int) -> dict[str, object]:
    log = await SqlEventLog.open(url)
    projector = Projector(log)
    await projector.catch_up()
    projector.start()
    reactor = AlarmReactor(log, projector.model, term)
    result: dict[str, object] = {}
    try:
        result["reactor"] = await reactor_phase(log, reactor, facts)
        alarm_events = len(
            await log.read_all(after=0, limit=100_000, types=["AlarmRaised", "AlarmCleared"])
        )
        async with grpc.aio.insecure_channel(node.address) as channel:
            progress(f"replaying {alarm_events} alarm events")
            result["replay"] = await replay_phase(channel, alarm_events)
            following = asyncio.create_task(reactor.run())
            progress(f"live latency over {probes} crashes")
            try:
                result["latency"] = await latency_phase(log, channel, facts, probes)
            finally:
                await reactor.stop()
                with contextlib.suppress(asyncio.CancelledError):
                    await following
    finally:
        task = projector._task
        for _ in range(50):  # see docs/ALARMS.md: a cancellation may be swallowed once
            if task is None or task.done():
                break
            task.cancel()
            await asyncio.wait({task}, timeout=0.2)
        await log.close()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller run, under a minute")
    args = parser.parse_args(argv)
    facts, probes = (400, 50) if args.quick else (2000, 200)
    workdir = Path(tempfile.mkdtemp(prefix="vim-bench-alarms-"))
    pg = PostgresServer.start(fsync=True)
    node: ApiNodeProcess | None = None
    try:
        pg.create_database("bench")
        url = pg.sqlalchemy_url("bench")
        migrating.upgrade(url)
        secret = workdir / "secret"
        secret.write_bytes(SECRET)
        node = ApiNodeProcess("api", workdir, url, secret)
        node.start()
        progress(f"alarm benchmark ({'quick' if args.quick else 'full'}): {facts} facts")
        result = asyncio.run(run(url, node, facts, probes))
    finally:
        if node is not None:
            node.kill()
        pg.cleanup()
    emit_result({"benchmark": "alarms", "quick": args.quick, **result})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
