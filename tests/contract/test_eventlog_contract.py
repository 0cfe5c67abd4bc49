"""The event log contract, run against SQLite and a real PostgreSQL (see `log_url`)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

import pytest

from vim.errors import (
    EventLogUnavailable,
    FencedOut,
    IdempotencyConflict,
    InvalidEvent,
    VersionConflict,
)
from vim.eventlog.model import (
    ANY_VERSION,
    NO_STREAM,
    AppendRequest,
    Metadata,
    NewEvent,
    RecordedEvent,
    StreamAppend,
)
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import EventLogConfig
from vim.eventlog.upcasting import Upcasters


def one(stream: str, expected: int, type_: str = "ServerCreated", **data: Any) -> AppendRequest:
    return AppendRequest([StreamAppend(stream, expected, [NewEvent(type_, data)])])


def req(*streams: StreamAppend, **meta: Any) -> AppendRequest:
    return AppendRequest(list(streams), Metadata(**meta))


async def take(log: SqlEventLog, n: int, **kw: Any) -> list[RecordedEvent]:
    sub = log.subscribe(**kw)
    got: list[RecordedEvent] = []
    async with asyncio.timeout(10):
        async for e in sub:
            got.append(e)
            if len(got) == n:
                break
    await sub.close()
    return got


async def test_append_then_read_back_with_envelope(event_log: SqlEventLog) -> None:
    meta = Metadata(
        tenant="t1", actor="alice", request_id="req-1", correlation_id="c1", causation_id="x"
    )
    r = await event_log.append(
        AppendRequest(
            [StreamAppend("server-a", NO_STREAM, [NewEvent("ServerCreated", {"name": "vm"})])],
            meta,
        )
    )
    assert (r.first_position, r.last_position, dict(r.versions)) == (1, 1, {"server-a": 1})
    [e] = await event_log.read_stream("server-a")
    assert (e.position, e.version, e.type, e.schema_version) == (1, 1, "ServerCreated", 1)
    assert e.data == {"name": "vm"}
    assert e.metadata == meta
    assert e.recorded_at.tzinfo is not None
    assert e.stream_kind == "server"
    assert await event_log.stream_version("server-a") == 1
    assert await event_log.stream_version("server-none") == 0
    assert await event_log.head() == 1


async def test_read_stream_from_version_with_limit(event_log: SqlEventLog) -> None:
    events = [NewEvent("ServerUpdated", {"n": i}) for i in range(5)]
    await event_log.append(AppendRequest([StreamAppend("server-a", 0, events)]))
    got = await event_log.read_stream("server-a", after_version=2, limit=2)
    assert [e.version for e in got] == [3, 4]
    assert [e.data["n"] for e in got] == [2, 3]


async def test_wrong_expected_version_is_refused_and_writes_nothing(
    event_log: SqlEventLog,
) -> None:
    await event_log.append(one("server-a", 0))
    with pytest.raises(VersionConflict) as err:
        await event_log.append(one("server-a", 0))
    assert err.value.retryable and err.value.actual == 1
    with pytest.raises(VersionConflict):
        await event_log.append(one("server-a", 5))
    assert await event_log.head() == 1
    await event_log.append(one("server-a", ANY_VERSION, "ServerUpdated"))
    assert await event_log.stream_version("server-a") == 2


async def test_concurrent_appends_at_same_version_exactly_one_wins(
    open_log: Callable[..., Any],
) -> None:
    logs = [await open_log() for _ in range(4)]
    results = await asyncio.gather(
        *(log.append(one("server-race", 0, i=i)) for i, log in enumerate(logs)),
        return_exceptions=True,
    )
    wins = [r for r in results if not isinstance(r, BaseException)]
    losses = [r for r in results if isinstance(r, BaseException)]
    assert len(wins) == 1
    assert all(isinstance(x, VersionConflict) for x in losses)
    assert len(await logs[0].read_stream("server-race")) == 1


async def test_multi_stream_append_is_all_or_nothing(event_log: SqlEventLog) -> None:
    await event_log.append(one("host-h1", 0, "HostRegistered"))
    placement = req(
        StreamAppend("server-a", 0, [NewEvent("ServerScheduled", {"host": "h1"})]),
        StreamAppend("host-h1", 0, [NewEvent("HostCapacityClaimed", {"vcpu": 2})]),
    )
    with pytest.raises(VersionConflict):
        await event_log.append(placement)
    assert await event_log.stream_version("server-a") == 0
    assert await event_log.head() == 1
    ok = req(
        StreamAppend("server-a", 0, [NewEvent("ServerScheduled", {"host": "h1"})]),
        StreamAppend("host-h1", 1, [NewEvent("HostCapacityClaimed", {"vcpu": 2})]),
    )
    r = await event_log.append(ok)
    assert dict(r.versions) == {"server-a": 1, "host-h1": 2}
    assert (r.first_position, r.last_position) == (2, 3)


async def test_a_refused_append_does_not_sink_its_batch(event_log: SqlEventLog) -> None:
    await event_log.append(one("server-taken", 0))
    appends = [one(f"server-{i}", 0) for i in range(20)] + [one("server-taken", 0)]
    results = await asyncio.gather(*map(event_log.append, appends), return_exceptions=True)
    assert isinstance(results[-1], VersionConflict)
    assert all(not isinstance(r, BaseException) for r in results[:-1])
    assert await event_log.head() == 21


async def test_a_stale_append_does_not_refuse_a_current_one_in_its_batch(
    event_log: SqlEventLog,
) -> None:
    """Refusals are decided on what the log holds: a stale append naming a stream
    first in a batch does not make a later, current append on it look stale."""
    await event_log.append(one("server-t", 0))
    await event_log.append(one("server-s", 0))
    stale = req(
        StreamAppend("server-t", 0, [NewEvent("ServerUpdated", {})]),
        StreamAppend("server-s", 0, [NewEvent("ServerUpdated", {})]),
    )
    appends = [one("server-t", 1, "ServerUpdated"), stale, one("server-s", 1, "ServerUpdated")]
    results = await asyncio.gather(*map(event_log.append, appends), return_exceptions=True)
    assert isinstance(results[1], VersionConflict)
    assert not any(isinstance(r, BaseException) for r in (results[0], results[2])), results
    assert await event_log.stream_version("server-s") == 2
    assert await event_log.head() == 4


async def test_repeated_request_id_returns_first_result_and_writes_nothing(
    event_log: SqlEventLog,
) -> None:
    body = StreamAppend("server-a", 0, [NewEvent("ServerCreated", {"name": "vm"})])
    first = await event_log.append(
        AppendRequest([body], Metadata(request_id="r-1"), response={"id": "a"})
    )
    again = await event_log.append(
        AppendRequest([body], Metadata(request_id="r-1"), response={"id": "a"})
    )
    assert not first.replayed and again.replayed
    assert (again.first_position, again.last_position) == (first.first_position, 1)
    assert again.response == {"id": "a"}
    assert await event_log.head() == 1
    stored = await event_log.lookup_request("r-1")
    assert stored is not None and stored.fingerprint


async def test_request_id_reused_with_another_body_is_refused(event_log: SqlEventLog) -> None:
    await event_log.append(req(StreamAppend("server-a", 0, [NewEvent("X", {})]), request_id="r"))
    with pytest.raises(IdempotencyConflict, match="different request"):
        await event_log.append(
            req(StreamAppend("server-b", 0, [NewEvent("X", {})]), request_id="r")
        )
    assert await event_log.head() == 1


async def test_concurrent_repeats_of_one_request_write_once(
    open_log: Callable[..., Any],
) -> None:
    logs = [await open_log() for _ in range(3)]
    body = StreamAppend("server-a", ANY_VERSION, [NewEvent("ServerCreated", {"n": 1})])
    results = await asyncio.gather(
        *(log.append(AppendRequest([body], Metadata(request_id="same"))) for log in logs * 3)
    )
    assert {(r.first_position, r.last_position) for r in results} == {(1, 1)}
    assert sum(not r.replayed for r in results) == 1
    assert await logs[0].head() == 1


async def test_stale_fencing_token_is_refused_per_role(event_log: SqlEventLog) -> None:
    def fenced(stream: str, token: int, role: str = "scheduler") -> AppendRequest:
        return req(
            StreamAppend(stream, ANY_VERSION, [NewEvent("ServerScheduled", {})]),
            fencing_role=role,
            fencing_token=token,
        )

    await event_log.append(fenced("server-a", 5))
    await event_log.append(fenced("server-a", 7))
    await event_log.append(fenced("server-a", 7))
    with pytest.raises(FencedOut) as err:
        await event_log.append(fenced("server-b", 6))
    assert (err.value.token, err.value.newest) == (6, 7)
    assert await event_log.stream_version("server-b") == 0
    await event_log.append(fenced("server-c", 1, role="fault_manager"))
    assert await event_log.fencing_token("scheduler") == 7
    assert await event_log.fencing_token("fault_manager") == 1
    assert await event_log.fencing_token("sdn") == 0


async def test_fencing_race_old_and_new_leader_in_one_batch(event_log: SqlEventLog) -> None:
    appends = [
        req(
            StreamAppend(f"server-{i}", 0, [NewEvent("X", {})]),
            fencing_role="scheduler",
            fencing_token=tok,
        )
        for i, tok in enumerate([3, 4, 3, 4, 3])
    ]
    results = await asyncio.gather(*map(event_log.append, appends), return_exceptions=True)
    # Decided in order within the batch: once 4 is seen, 3 is stale.
    kinds = [type(r).__name__ for r in results]
    assert kinds[:2] == ["AppendResult", "AppendResult"]
    assert kinds[2:] == ["FencedOut", "AppendResult", "FencedOut"]


async def test_subscription_catches_up_then_follows_live(event_log: SqlEventLog) -> None:
    for i in range(3):
        await event_log.append(one(f"server-{i}", 0))
    sub = event_log.subscribe(after=1)
    got: list[int] = []

    async def consume() -> None:
        async for e in sub:
            got.append(e.position)
            if len(got) == 5:
                return

    task = asyncio.create_task(consume())
    for i in range(3, 6):
        await event_log.append(one(f"server-{i}", 0))
    async with asyncio.timeout(10):
        await task
    assert got == [2, 3, 4, 5, 6]
    assert sub.position == 6
    await sub.close()


async def test_subscription_resumes_from_its_cursor(event_log: SqlEventLog) -> None:
    for i in range(10):
        await event_log.append(one(f"server-{i}", 0))
    first = event_log.subscribe()
    seen: list[int] = []
    async for e in first:
        seen.append(e.position)
        if len(seen) == 4:
            break
    cursor = first.position
    await first.close()
    rest = await take(event_log, 6, after=cursor)
    assert seen + [e.position for e in rest] == list(range(1, 11))


async def test_subscription_filters_by_type_and_kind(event_log: SqlEventLog) -> None:
    await event_log.append(one("server-a", 0, "ServerCreated"))
    await event_log.append(one("host-a", 0, "HostRegistered"))
    await event_log.append(one("server-b", 0, "ServerCreated"))
    await event_log.append(one("alarm-a", 0, "AlarmRaised"))
    by_kind = await take(event_log, 1, kinds=["alarm"])
    assert [e.stream_id for e in by_kind] == ["alarm-a"]
    by_type = await take(event_log, 2, types=["ServerCreated"])
    assert [e.stream_id for e in by_type] == ["server-a", "server-b"]
    assert [e.type for e in await event_log.read_all(types=["HostRegistered"])] == [
        "HostRegistered"
    ]


async def test_own_and_other_writers_events_arrive_once_in_order_as_read_back(
    open_log: Callable[..., Any],
) -> None:
    """A subscription takes its own process's appends from memory and reads the
    rest: interleaved with another process's appends it still sees every position
    once, in order, each event equal to what a read returns."""
    here, there = await open_log(), await open_log()
    n = 60
    sub = here.subscribe()
    got: list[RecordedEvent] = []

    async def consume() -> None:
        async for e in sub:
            got.append(e)
            if len(got) == 2 * n:
                return

    task = asyncio.create_task(consume())

    async def write(log: SqlEventLog, name: str) -> None:
        for i in range(n):
            data = {"i": i, "by": name, "nested": {"x": [1, "ü"]}}
            change = StreamAppend(f"server-{name}", ANY_VERSION, [NewEvent("ServerUpdated", data)])
            await log.append(req(change, tenant="t", request_id=f"{name}-{i}", actor=name))

    await asyncio.gather(write(here, "here"), write(there, "there"))
    async with asyncio.timeout(10):
        await task
    await sub.close()
    assert [e.position for e in got] == list(range(1, 2 * n + 1))
    assert got == await here.read_all(limit=2 * n)
    assert got == await there.read_all(limit=2 * n)
    assert all(e.recorded_at.utcoffset() is not None for e in got)


async def test_a_busy_writer_still_sees_another_processes_appends(
    open_log: Callable[..., Any],
) -> None:
    """Appends of its own keep waking a subscription; it still reads what others
    wrote (on SQLite, with no notifications, by the polling interval)."""
    here, there = await open_log(), await open_log()
    sub = here.subscribe(kinds=["host"])
    stop = asyncio.Event()

    async def busy() -> None:
        i = 0
        while not stop.is_set():
            await here.append(one("server-busy", ANY_VERSION, "ServerUpdated", i=i))
            i += 1
            await asyncio.sleep(0.02)

    writer = asyncio.create_task(busy())
    try:
        await asyncio.sleep(0.1)
        await there.append(one("host-a", 0, "HostRegistered"))
        async with asyncio.timeout(5):
            async for e in sub:
                assert e.stream_id == "host-a"
                break
    finally:
        stop.set()
        await writer
        await sub.close()


async def test_upcasters_read_old_schema_versions_forward(
    open_log: Callable[..., Any],
) -> None:
    writer = await open_log()
    await writer.append(
        AppendRequest([StreamAppend("server-a", 0, [NewEvent("ServerCreated", {"ram": 512}, 1)])])
    )
    up = Upcasters()
    up.register("ServerCreated", 1, lambda d: {"ram_mb": d["ram"]})
    up.register("ServerCreated", 2, lambda d: {**d, "disk_gb": 0})
    reader = await open_log(upcasters=up)
    [e] = await reader.read_stream("server-a")
    assert (e.schema_version, dict(e.data)) == (3, {"ram_mb": 512, "disk_gb": 0})
    with pytest.raises(ValueError):
        up.register("ServerCreated", 1, lambda d: d)


BAD_APPENDS: list[tuple[str, AppendRequest, str]] = [
    ("stream id", one("Server A", 0), "streams[0].stream_id"),
    ("stream id without kind", one("12345", 0), "streams[0].stream_id"),
    ("event type", one("server-a", 0, "not a type"), "streams[0].events[0].type"),
    ("NaN", one("server-a", 0, x=math.nan), "streams[0].events[0].data"),
    ("set", one("server-a", 0, x={1, 2}), "streams[0].events[0].data"),
    ("object", one("server-a", 0, x=object()), "streams[0].events[0].data"),
    ("no streams", AppendRequest([]), "streams"),
    ("no events", AppendRequest([StreamAppend("server-a", 0, [])]), "streams[0].events"),
    (
        "stream twice",
        AppendRequest([StreamAppend("server-a", 0, [NewEvent("X", {})])] * 2),
        "streams[1].stream_id",
    ),
    ("version", one("server-a", -7), "streams[0].expected_version"),
    (
        "request id",
        req(StreamAppend("server-a", 0, [NewEvent("X", {})]), request_id="bad id!"),
        "metadata.request_id",
    ),
    (
        "token without role",
        req(StreamAppend("server-a", 0, [NewEvent("X", {})]), fencing_token=3),
        "metadata.fencing_token",
    ),
    ("oversized", one("server-a", 0, blob="x" * 2048), "streams"),
]


@pytest.mark.parametrize(("what", "bad", "field"), BAD_APPENDS, ids=[b[0] for b in BAD_APPENDS])
async def test_bad_input_gets_a_clear_error_and_writes_nothing(
    open_log: Callable[..., Any], what: str, bad: AppendRequest, field: str
) -> None:
    log = await open_log(EventLogConfig(max_payload_bytes=1024))
    with pytest.raises(InvalidEvent) as err:
        await log.append(bad)
    assert field in [v.field for v in err.value.violations], err.value.violations
    assert not err.value.retryable
    assert await log.head() == 0


async def test_default_payload_limit_is_one_mebibyte(event_log: SqlEventLog) -> None:
    assert event_log.config.max_payload_bytes == 1024 * 1024
    with pytest.raises(InvalidEvent, match="exceeds the limit"):
        await event_log.append(one("server-a", 0, blob="x" * (1024 * 1024)))
    r = await event_log.append(one("server-a", 0, blob="x" * 1000_000))
    assert r.last_position == 1


async def test_events_survive_reopening(open_log: Callable[..., Any]) -> None:
    log = await open_log()
    await log.append(one("server-a", 0, name="kept"))
    await log.close()
    again = await open_log()
    [e] = await again.read_stream("server-a")
    assert e.data == {"name": "kept"}
    with pytest.raises(RuntimeError):
        await log.append(one("server-b", 0))


def test_unknown_url_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported"):
        asyncio.run(SqlEventLog.open("mysql://x/y"))


async def test_unreachable_database_is_unavailable_not_a_driver_error() -> None:
    with pytest.raises(EventLogUnavailable):
        await SqlEventLog.open("postgresql://postgres@127.0.0.1:1/none")
