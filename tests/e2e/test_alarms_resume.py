"""Evidence: an alarm subscription resumed from its cursor after the subscriber and its API
node were SIGKILLed, while alarms kept being raised, misses nothing.

Real components: PostgreSQL (the session's), two `vim-api` processes (A and B), a
subscriber process (a plain gRPC client writing one JSON line per message), and
the alarm reactor following the log in this process (standing in for the elected
fault manager, fenced by its term's token). A producer appends ServerCrashed /
ServerStateReported facts at a steady pace; the reactor turns them into alarm
raises and clears. Mid-stream the subscriber and node A are SIGKILLed; a new
subscriber resumes on node B from the last cursor the first one wrote.

Checked: every alarm change in the log was delivered at least once across the two
subscribers, deduplication by notification id gives exactly the set of alarm
events in the log, and the resumed idle stream keeps sending heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ha.election.base import Leadership
from vim.alarms import AlarmReactor
from vim.api.alarms import CHANGES
from vim.api.auth import Authenticator
from vim.domain import server
from vim.domain.base import DomainEvent
from vim.domain.faults import ServerCrashed
from vim.eventlog.model import ANY_VERSION, AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.sql import SqlEventLog
from vim.harness.apinode import ApiNodeProcess
from vim.projections.readmodel import Projector

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SECRET = b"alarm-resume-secret-of-at-least-32-bytes"
ADMIN = Authenticator(SECRET).mint("mano", "ops", ["admin"])
AT = "2026-11-22T08:00:00.000Z"
SERVERS = 200
"""Servers allocated up front; the producer uses as many as the run needs (bounded)."""
AFTER_KILL = 20
"""Servers crashed after the kill, while the subscription resumes on B."""
PACE_S = 0.03
"""Pause between facts: a steady stream of raises and clears during the kill (load, not sync)."""
DEADLINE_S = 60.0

SUBSCRIBER = """
import json, sys
import grpc
from vim._gen.vim.v1 import alarms_pb2 as pb, alarms_pb2_grpc

address, token, cursor, out = sys.argv[1:5]
with grpc.insecure_channel(address) as ch, open(out, "a", encoding="utf-8") as f:
    stub = alarms_pb2_grpc.AlarmsStub(ch)
    request = pb.SubscribeAlarmsRequest(cursor=cursor, heartbeat_interval_ms=200)
    for m in stub.SubscribeAlarms(request, metadata=[("authorization", "Bearer " + token)]):
        if m.HasField("notification"):
            n = m.notification
            rec = {"kind": "n", "id": n.notification_id, "cursor": n.cursor,
                   "alarm": n.alarm.alarm_id, "change": n.change}
        else:
            rec = {"kind": "h", "cursor": m.heartbeat.cursor}
        f.write(json.dumps(rec) + "\\n")
        f.flush()
"""


def term() -> Leadership:
    return Leadership("faultd", "test", 1, datetime.now(UTC), 1, 10.0, "local")


async def put(log: SqlEventLog, stream_id: str, *events: DomainEvent) -> int:
    result = await log.append(
        AppendRequest(
            [
                StreamAppend(
                    stream_id,
                    ANY_VERSION,
                    [NewEvent(e.type, e.to_data(), e.SCHEMA_VERSION) for e in events],
                )
            ],
            Metadata(actor="test"),
        )
    )
    return result.last_position


def sid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def lines(path: Path) -> list[dict[str, Any]]:
    """Complete JSON lines only (a SIGKILLed writer may leave half a line)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:-1] if line]


async def until(what: str, probe: Callable[[], bool]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not probe():
        if loop.time() > deadline:
            raise AssertionError(f"no {what} within {DEADLINE_S} s")
        await asyncio.sleep(0.05)


@dataclass
class Cluster:
    workdir: Path
    a: ApiNodeProcess
    b: ApiNodeProcess
    log: SqlEventLog
    projector: Projector
    reactor: AlarmReactor
    subscribers: list[subprocess.Popen[bytes]]

    def subscribe(self, node: ApiNodeProcess, cursor: str, out: Path) -> subprocess.Popen[bytes]:
        script = self.workdir / "subscriber.py"
        script.write_text(SUBSCRIBER, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIM_")}
        with (self.workdir / f"{out.stem}.stderr").open("ab") as err:
            proc = subprocess.Popen(
                [sys.executable, str(script), node.address, ADMIN, cursor, str(out)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
            )
        self.subscribers.append(proc)
        return proc


@pytest.fixture
async def cluster(pg_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    """Nodes A and B, and the alarm reactor following the log in this process."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    a = ApiNodeProcess("api-a", tmp_path, pg_url, secret)
    b = ApiNodeProcess("api-b", tmp_path, pg_url, secret)
    log = await SqlEventLog.open(pg_url)
    flavor = server.FlavorCopy("f-1", "m1", 1, 512, 1)
    for i in range(SERVERS):
        vm = server.allocate(sid(i), "acme", f"vm{i}", flavor, "img", [], now=AT)
        await put(log, server.stream(sid(i)), vm)
    projector = Projector(log)
    reactor = AlarmReactor(log, projector.model, term)
    c = Cluster(tmp_path, a, b, log, projector, reactor, [])
    running: asyncio.Task[None] | None = None
    try:
        a.start()
        b.start()
        await projector.catch_up()
        projector.start()
        running = asyncio.create_task(reactor.run())
        yield c
    finally:
        for proc in c.subscribers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        a.kill()
        b.kill()
        await reactor.stop()
        if running is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await running
        await stop_projector(projector)
        await log.close()


async def stop_projector(projector: Projector) -> None:
    """Stop a projector; cancel again if a cancellation was swallowed (see docs/ALARMS.md)."""
    task = projector._task
    for _ in range(50):
        if task is None or task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    projector._task = None


async def produce(log: SqlEventLog, produced: list[int], killed: asyncio.Event) -> None:
    """Per server a crash (raise), and every other one the previous server runs again
    (clear); until AFTER_KILL servers after `killed` is set (bounded by SERVERS)."""
    after = 0
    for i in range(SERVERS):
        crash = ServerCrashed(sid(i), "cmp-1", "killed", AT)
        produced.append(await put(log, server.stream(sid(i)), crash))
        if i % 2 == 1:
            report = server.ServerStateReported(
                sid(i - 1), "cmp-2", "ACTIVE", "RUNNING", reported_at=AT
            )
            produced.append(await put(log, server.stream(sid(i - 1)), report))
        if killed.is_set():
            after += 1
            if after >= AFTER_KILL:
                return
        await asyncio.sleep(PACE_S)
    raise AssertionError("the producer ran out of servers before the kill")


def seen(path: Path) -> set[str]:
    return {r["id"] for r in lines(path) if r["kind"] == "n"}


async def test_resumed_subscription_misses_nothing_after_subscriber_and_node_die(
    cluster: Cluster,
) -> None:
    log, reactor, model = cluster.log, cluster.reactor, cluster.projector.model
    first, second = cluster.workdir / "first.jsonl", cluster.workdir / "second.jsonl"
    produced: list[int] = []
    killed = asyncio.Event()
    sub1 = cluster.subscribe(cluster.a, "", first)
    await until("the subscription on A", lambda: len(lines(first)) >= 1)  # its first heartbeat
    producer = asyncio.create_task(produce(log, produced, killed))
    try:
        await until("notifications on A", lambda: sum(r["kind"] == "n" for r in lines(first)) >= 8)
        assert not producer.done(), "the kill must happen while alarms are still being raised"
        sub1.kill()
        sub1.wait(timeout=10)
        cluster.a.kill()
        killed.set()
        sub2 = cluster.subscribe(cluster.b, lines(first)[-1]["cursor"], second)
        await producer
    finally:
        producer.cancel()
    await until("the reactor to decide every fact", lambda: reactor.position >= produced[-1])
    await model.wait_for(await log.head())
    expected = {
        e.event_id for e in await log.read_all(after=0, limit=10_000, types=sorted(CHANGES))
    }
    assert len(expected) == len(produced)  # one alarm raise or clear per fact
    await until("every notification on B", lambda: expected <= seen(first) | seen(second))
    assert not expected <= seen(first)  # the first subscriber really missed some
    # At least once: duplicates are allowed; dropping them by id leaves exactly the set.
    all_ids = [r["id"] for p in (first, second) for r in lines(p) if r["kind"] == "n"]
    assert set(all_ids) == expected
    # The idle resumed stream keeps beating, with a cursor covering everything.
    settled = len(lines(second))
    await until("heartbeats on the idle stream", lambda: len(lines(second)) >= settled + 3)
    tail = lines(second)[settled:]
    assert all(r["kind"] == "h" for r in tail)
    last_note = max(int(r["cursor"]) for r in lines(second) if r["kind"] == "n")
    assert int(tail[-1]["cursor"]) >= last_note
    assert sub2.poll() is None
