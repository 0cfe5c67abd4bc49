"""EtcdElector against real etcd clusters (1 and 3 members) started by the harness.

Every test uses its own key prefix. Waits are polls with deadlines (``_until``),
never sleeps used as synchronisation. Measured failover times are printed (run
with ``-s``) and recorded as test properties; docs/ELECTION.md quotes them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aetcd
import pytest

from ha.election import EtcdElector, Leadership
from ha.errors import CoordinatorUnavailable
from vim.errors import FencedOut
from vim.eventlog.model import ANY_VERSION, AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.sql import SqlEventLog
from vim.harness.etcd import EtcdCluster

pytestmark = pytest.mark.etcd

ROLE = "scheduler"
REPO = Path(__file__).resolve().parents[2]
TTL = 2


async def _until(
    predicate: Callable[[], bool | Awaitable[bool]], within: float, what: str
) -> float:
    """Poll ``predicate`` every 20 ms; return the elapsed seconds, fail after ``within``."""
    start = time.monotonic()
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def _report(record_property: Callable[[str, object], None], name: str, seconds: float) -> None:
    record_property(name, round(seconds, 3))
    print(f"\n[election timing] {name}: {seconds:.3f}s")


@pytest.fixture(scope="module")
def etcd1() -> Iterator[EtcdCluster]:
    with EtcdCluster.start(size=1) as cluster:
        yield cluster


@pytest.fixture
def etcd3() -> Iterator[EtcdCluster]:
    with EtcdCluster.start(size=3, tuned=True) as cluster:
        yield cluster


@pytest.fixture
def prefix() -> str:
    return f"/test/{uuid.uuid4().hex}/"


@pytest.fixture
async def electors(prefix: str) -> AsyncIterator[Callable[..., EtcdElector]]:
    """Builds electors on this test's prefix and closes them all afterwards."""
    made: list[EtcdElector] = []

    def make(endpoints: list[str], candidate: str, **kw: Any) -> EtcdElector:
        elector = EtcdElector(endpoints, ROLE, candidate, ttl_s=TTL, prefix=prefix, **kw)
        made.append(elector)
        return elector

    yield make
    for elector in made:
        await elector.close()


async def _raw_get(endpoint: str, key: bytes) -> aetcd.KeyValue | None:
    host, port = endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port)) as client:
        return await client.get(key)


async def _pending(task: asyncio.Future[Any], seconds: float) -> bool:
    """True if ``task`` is still running after waiting up to ``seconds`` for it."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    return not done


# ------------------------------------------------------------------ 1 member
async def test_one_leads_the_other_observes_and_takes_over_on_resign(
    etcd1: EtcdCluster,
    electors: Callable[..., EtcdElector],
    record_property: Callable[[str, object], None],
) -> None:
    a = electors(etcd1.endpoints, "a")
    b = electors(etcd1.endpoints, "b")
    first = await asyncio.wait_for(a.campaign(), 5)
    assert (first.role, first.holder, first.backend) == (ROLE, "a", "etcd")
    assert a.is_leader() and a.leadership == first

    kv = await _raw_get(etcd1.endpoints[0], a.key)
    assert kv is not None
    assert first.token == kv.create_revision  # the fencing token is the create revision
    assert first.lease_id == kv.lease

    waiting = asyncio.create_task(b.campaign())
    assert await _pending(waiting, 2 * TTL)  # a keeps its lease alive past the TTL
    assert a.is_leader() and not b.is_leader()
    assert await b.observe() == first

    start = time.monotonic()
    await a.resign()
    assert a.leader_lost.is_set() and not a.is_leader() and a.leadership is None
    second = await asyncio.wait_for(waiting, 5)
    _report(record_property, "handover_after_resign", time.monotonic() - start)
    assert second.holder == "b" and second.token > first.token
    assert b.is_leader() and not b.leader_lost.is_set()
    assert await a.observe() == second

    # A new term for a: it waits for b, and gets a still larger token.
    again = asyncio.create_task(a.campaign())
    await b.resign()
    third = await asyncio.wait_for(again, 5)
    assert third.token > second.token
    assert not a.leader_lost.is_set()


async def test_leader_steps_down_when_its_key_is_deleted(
    etcd1: EtcdCluster, electors: Callable[..., EtcdElector]
) -> None:
    a = electors(etcd1.endpoints, "a")
    await asyncio.wait_for(a.campaign(), 5)
    host, port = etcd1.endpoints[0].rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port)) as client:
        await client.delete(a.key)  # e.g. an operator forcing a step-down
    await _until(a.leader_lost.is_set, TTL, "leader_lost after the key was deleted")
    assert not a.is_leader()
    assert await a.observe() is None


async def test_watch_reports_each_change(
    etcd1: EtcdCluster, electors: Callable[..., EtcdElector]
) -> None:
    a = electors(etcd1.endpoints, "a")
    b = electors(etcd1.endpoints, "b")
    observer = electors(etcd1.endpoints, "observer")
    seen: list[Leadership | None] = []

    async def follow() -> None:
        async for leadership in observer.watch():
            seen.append(leadership)

    watcher = asyncio.create_task(follow())
    try:
        await _until(lambda: len(seen) == 1, 5, "the initial state")
        first = await asyncio.wait_for(a.campaign(), 5)
        await _until(lambda: seen[-1] == first, 5, "a's term")
        await a.resign()
        await _until(lambda: seen[-1] is None, 5, "no leader")
        second = await asyncio.wait_for(b.campaign(), 5)
        await _until(lambda: seen[-1] == second, 5, "b's term")
    finally:
        watcher.cancel()
    assert seen == [None, first, None, second]


@pytest.mark.slow
async def test_unreachable_etcd_ends_the_term_by_the_local_deadline(
    electors: Callable[..., EtcdElector],
    record_property: Callable[[str, object], None],
) -> None:
    with EtcdCluster.start(size=1) as cluster:
        a = electors(cluster.endpoints, "a")
        await asyncio.wait_for(a.campaign(), 5)
        assert a.deadline_remaining() > 0
        cluster.kill_member(0)
        killed = time.monotonic()
        await _until(lambda: not a.is_leader(), TTL, "the deadline to pass")
        lost_after = time.monotonic() - killed
        _report(record_property, "step_down_after_etcd_unreachable", lost_after)
        assert lost_after <= TTL - TTL / 4 + 0.1  # never later than ttl - margin
        assert a.leader_lost.is_set()
        with pytest.raises(CoordinatorUnavailable):
            await a.observe()


@pytest.mark.slow
async def test_paused_leader_is_refused_by_the_event_log(
    etcd1: EtcdCluster,
    electors: Callable[..., EtcdElector],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
) -> None:
    log = await SqlEventLog.open(f"sqlite:///{tmp_path}/log.db")

    def planned(server: str, leadership: Leadership) -> AppendRequest:
        return AppendRequest(
            streams=[StreamAppend(server, ANY_VERSION, [NewEvent("ServerScheduled", {})])],
            metadata=Metadata(fencing_role=ROLE, fencing_token=leadership.token),
        )

    try:
        a = electors(etcd1.endpoints, "a")
        b = electors(etcd1.endpoints, "b")
        old = await asyncio.wait_for(a.campaign(), 5)
        await log.append(planned("server-1", old))
        waiting = asyncio.create_task(b.campaign())

        # Pause a: its refreshes hang, and a paused process cannot release anything.
        async def hang(*_: object) -> None:
            await asyncio.Event().wait()

        monkeypatch.setattr(a, "_refresh", hang)
        monkeypatch.setattr(a, "_release", hang)
        paused = time.monotonic()

        await _until(lambda: not a.is_leader(), TTL, "a's own deadline")
        lost = time.monotonic() - paused
        assert a.leader_lost.is_set()
        assert not waiting.done()  # etcd still holds a's lease: nobody leads yet
        new = await asyncio.wait_for(waiting, TTL + 2)
        elected = time.monotonic() - paused
        _report(record_property, "paused_leader_stops_believing", lost)
        _report(record_property, "new_leader_after_pause", elected)
        assert lost < elected  # never two leaders that believe it
        assert new.token > old.token

        await log.append(planned("server-2", new))
        with pytest.raises(FencedOut) as refused:
            await log.append(planned("server-3", old))  # the resumed old leader writes
        assert (refused.value.token, refused.value.newest) == (old.token, new.token)
        assert await log.stream_version("server-3") == 0
        assert await log.fencing_token(ROLE) == new.token
    finally:
        await log.close()


# ----------------------------------------------------------------- 3 members
_CHILD = """
import asyncio, json, sys
from ha.election import EtcdElector

async def main() -> None:
    elector = EtcdElector(sys.argv[1].split(","), sys.argv[2], "child", ttl_s=int(sys.argv[4]),
                          prefix=sys.argv[3])
    won = await elector.campaign()
    print(json.dumps({"token": won.token}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.slow
async def test_sigkilled_leader_process_is_replaced_within_ttl(
    etcd3: EtcdCluster,
    electors: Callable[..., EtcdElector],
    prefix: str,
    record_property: Callable[[str, object], None],
) -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        ",".join(etcd3.endpoints),
        ROLE,
        prefix,
        str(TTL),
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 15)
        child_token = int(line.decode().split(":")[1].strip(" }\n"))
        follower = electors(list(reversed(etcd3.endpoints)), "follower")
        waiting = asyncio.create_task(follower.campaign())
        assert await _pending(waiting, 1.5 * TTL)  # the child keeps its lease
        held = await follower.observe()
        assert held is not None and (held.holder, held.token) == ("child", child_token)

        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        new = await asyncio.wait_for(waiting, TTL + 3)
        failover = time.monotonic() - killed
        _report(record_property, "failover_after_leader_sigkill", failover)
        assert failover <= TTL + 1.0
        assert new.holder == "follower" and new.token > child_token
        assert follower.is_leader()
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()


@pytest.mark.slow
async def test_elector_survives_the_loss_of_the_etcd_leader(
    etcd3: EtcdCluster,
    electors: Callable[..., EtcdElector],
    record_property: Callable[[str, object], None],
) -> None:
    leader = etcd3.leader_index()
    assert leader is not None
    # The etcd leader first, so the elector's current endpoint is the one that dies.
    endpoints = [etcd3.endpoints[leader]] + [
        e for i, e in enumerate(etcd3.endpoints) if i != leader
    ]
    a = electors(endpoints, "a")
    first = await asyncio.wait_for(a.campaign(), 5)

    etcd3.kill_member(leader)
    killed = time.monotonic()
    await _until(
        lambda: asyncio.to_thread(lambda: etcd3.leader_index() not in (None, leader)),
        10,
        "a new etcd leader",
    )
    _report(record_property, "etcd_leader_reelected", time.monotonic() - killed)

    # Either the term survived (refreshes moved to another member in time) or the
    # elector stepped down by its deadline and wins a new term once etcd is back.
    if a.leader_lost.is_set():
        term = await asyncio.wait_for(a.campaign(), TTL + 5)
        assert term.token > first.token
        outcome = "regained"
    else:
        term = first
        outcome = "kept"
    await _until(a.is_leader, 5, "a to lead")
    _report(
        record_property, f"leadership_{outcome}_after_etcd_leader_loss", time.monotonic() - killed
    )
    # It keeps refreshing through the surviving members for several TTLs.
    lost = asyncio.create_task(a.leader_lost.wait())
    assert await _pending(lost, 2 * TTL)
    lost.cancel()
    assert a.is_leader() and a.leadership == term
    current = await a.observe()
    assert current is not None and current.token == term.token
