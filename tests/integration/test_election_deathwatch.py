"""The fast death signal against real etcd (1 and 3 members) and real processes.

The leader is an `EtcdElector` in a child process (`vim.harness.elector_proc`),
killed with SIGKILL or paused with SIGSTOP; the follower runs in this process
so that its counters (`death_signals`, `watching`) can be read. Waits are polls
with deadlines or awaits on the child's reported events, never sleeps.

A longer TTL (5 s) is used where the test tells the fast signal apart from
lease expiry: a failover under TTL / 2 cannot have come from the lease
expiring, whatever the machine's load.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from ha.election import EtcdElector
from ha.election.deathwatch import DeathWatch, LivenessServer, Target
from vim.harness.elector_proc import ElectorProcess, established_connections
from vim.harness.etcd import EtcdCluster

pytestmark = pytest.mark.etcd

ROLE = "scheduler"
SLOW_TTL = 5
TTL = 2


async def _until(predicate: Callable[[], bool], within: float, what: str) -> float:
    """Poll ``predicate`` every 10 ms; the elapsed seconds, or fail after ``within``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def _report(record_property: Callable[[str, object], None], name: str, seconds: float) -> None:
    record_property(name, round(seconds, 3))
    print(f"\n[deathwatch timing] {name}: {seconds:.3f}s")


@pytest.fixture(scope="module", params=[1, 3], ids=["etcd1", "etcd3"])
def cluster(request: pytest.FixtureRequest) -> Iterator[EtcdCluster]:
    size = int(request.param)
    with EtcdCluster.start(size=size, tuned=size == 3) as c:
        yield c


@pytest.fixture
def prefix() -> str:
    return f"/test/{uuid.uuid4().hex}/"


class Spawner:
    """Starts elector children and in-process followers on one prefix; closes them all."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.children: list[ElectorProcess] = []
        self.local: list[EtcdElector] = []

    async def child(self, endpoints: list[str], name: str, ttl_s: int) -> ElectorProcess:
        proc = await ElectorProcess.start(endpoints, ROLE, self.prefix, name, ttl_s=ttl_s)
        self.children.append(proc)
        return proc

    def follower(self, endpoints: list[str], name: str, ttl_s: int) -> EtcdElector:
        elector = EtcdElector(endpoints, ROLE, name, ttl_s=ttl_s, prefix=self.prefix)
        self.local.append(elector)
        return elector

    async def close(self) -> None:
        for proc in self.children:
            await proc.close()
        for elector in self.local:
            await elector.close()


@pytest.fixture
async def spawn(prefix: str) -> AsyncIterator[Spawner]:
    spawner = Spawner(prefix)
    yield spawner
    await spawner.close()


async def _leader_and_follower(
    spawn: Spawner, endpoints: list[str], ttl_s: int
) -> tuple[ElectorProcess, dict[str, Any], EtcdElector, asyncio.Task[Any]]:
    """A child that leads and an in-process follower connected to its liveness endpoint."""
    child = await spawn.child(endpoints, "child", ttl_s)
    won = await child.until("leading", 20)
    follower = spawn.follower(list(reversed(endpoints)), "follower", ttl_s)
    waiting = asyncio.create_task(follower.campaign())
    await _until(lambda: follower.watching == "child", 10, "the follower to watch the child")
    port = int(won["liveness"].rsplit(":", 1)[1])
    assert established_connections(port) >= 1
    assert not waiting.done()
    return child, won, follower, waiting


@pytest.mark.slow
async def test_sigkilled_leader_is_replaced_well_before_the_ttl(
    cluster: EtcdCluster, spawn: Spawner, record_property: Callable[[str, object], None]
) -> None:
    child, won, follower, waiting = await _leader_and_follower(spawn, cluster.endpoints, SLOW_TTL)
    held = await follower.observe()
    assert held is not None and (held.holder, held.token) == ("child", won["token"])

    child.signal(signal.SIGKILL)
    killed = time.monotonic()
    new = await asyncio.wait_for(waiting, SLOW_TTL + 3)
    failover = time.monotonic() - killed
    _report(record_property, f"deathwatch_failover_etcd{len(cluster.members)}", failover)
    assert follower.death_signals == 1  # the fast signal, not the lease, ended the term
    assert failover < SLOW_TTL / 2  # lease expiry takes >= TTL - TTL/3 (3.3 s) here
    assert new.holder == "follower" and new.token > won["token"]
    assert follower.is_leader()


@pytest.mark.slow
async def test_paused_leader_is_not_taken_for_dead_and_goes_by_lease_expiry(
    cluster: EtcdCluster, spawn: Spawner, record_property: Callable[[str, object], None]
) -> None:
    child, won, follower, waiting = await _leader_and_follower(spawn, cluster.endpoints, TTL)

    child.signal(signal.SIGSTOP)
    stopped = time.monotonic()
    new = await asyncio.wait_for(waiting, TTL + 3)
    elapsed = time.monotonic() - stopped
    _report(record_property, f"paused_leader_replaced_etcd{len(cluster.members)}", elapsed)
    assert follower.death_signals == 0  # a stopped process's connection stays up
    assert elapsed <= TTL + 1.0
    assert new.token > won["token"]

    # Resumed, the old leader finds out by its own deadline and steps down.
    child.signal(signal.SIGCONT)
    lost = await child.until("lost", TTL + 3)
    assert lost["token"] == won["token"]
    assert follower.is_leader()
    current = await follower.observe()
    assert current is not None and current.token == new.token


@pytest.mark.slow
async def test_leader_killed_with_its_etcd_member_is_replaced_fast(
    spawn: Spawner, record_property: Callable[[str, object], None]
) -> None:
    """The member the leader talks to dies first; the leader keeps its term through the
    others, and when the leader process dies too the follower revokes through the rest."""
    with EtcdCluster.start(size=3, tuned=True) as etcd:
        first = etcd.leader_index()
        assert first is not None
        own = [etcd.endpoints[first]] + [e for i, e in enumerate(etcd.endpoints) if i != first]
        child, won, follower, waiting = await _leader_and_follower(spawn, own, SLOW_TTL)

        etcd.kill_member(first)
        # The term is kept (refreshes move on) or lost and won again; either way a child leads.
        lost_or_kept = asyncio.create_task(child.until("lost", SLOW_TTL))
        done, _ = await asyncio.wait({lost_or_kept}, timeout=SLOW_TTL)
        if done:
            won = await child.until("leading", SLOW_TTL + 5)
        else:
            lost_or_kept.cancel()
        await _until(lambda: follower.watching == "child", 10, "the follower to watch again")
        assert not waiting.done()

        child.signal(signal.SIGKILL)
        killed = time.monotonic()
        new = await asyncio.wait_for(waiting, SLOW_TTL + 3)
        failover = time.monotonic() - killed
        _report(record_property, "deathwatch_failover_after_member_loss", failover)
        assert follower.death_signals >= 1
        assert failover < SLOW_TTL / 2
        assert new.token > won["token"]


# ------------------------------------------------- the signal itself (no etcd)
async def _stranger(greeting: bytes) -> tuple[asyncio.Server, str, list[asyncio.StreamWriter]]:
    """A TCP server that greets with ``greeting`` and keeps connections until told."""
    held: list[asyncio.StreamWriter] = []

    async def serve(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(greeting)
        await w.drain()
        held.append(w)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}", held


async def test_closed_endpoint_is_a_death_signal() -> None:
    server = LivenessServer("127.0.0.1", "leader")
    address = await server.start()
    watch = DeathWatch(connect_timeout_s=1.0)
    try:
        dead = watch.follow(Target("leader", address, lease_id=7, token=3))
        await _until(lambda: watch.connected is not None, 5, "the connection")
        await _until(lambda: server.peers == 1, 5, "the server to count its peer")
        assert not dead.is_set()
        await server.close()  # what the kernel does for a process that is gone
        await asyncio.wait_for(dead.wait(), 5)
    finally:
        await watch.close()
        await server.close()


async def test_refused_connect_is_not_a_death_signal() -> None:
    server = LivenessServer("127.0.0.1", "leader")
    address = await server.start()
    await server.close()  # nothing listens there any more
    watch = DeathWatch(connect_timeout_s=1.0)
    try:
        target = Target("leader", address, lease_id=7, token=3)
        dead = watch.follow(target)
        task = watch._task
        assert task is not None
        await asyncio.wait_for(task, 5)  # the attempt is over
        assert not dead.is_set() and watch.connected is None
        assert watch.follow(target) is dead  # a later follow retries the same target
    finally:
        await watch.close()


async def test_a_stranger_on_the_port_is_not_watched() -> None:
    server, address, held = await _stranger(b"HTTP/1.1 400 Bad Request\r\n")
    watch = DeathWatch(connect_timeout_s=1.0)
    try:
        dead = watch.follow(Target("leader", address, lease_id=7, token=3))
        await _until(lambda: bool(held), 5, "the stranger to accept")
        task = watch._task
        assert task is not None
        await asyncio.wait_for(task, 5)  # gave up on the wrong greeting
        for w in held:
            w.close()
        assert not dead.is_set() and watch.connected is None
    finally:
        await watch.close()
        server.close()
        await server.wait_closed()


async def test_a_silent_endpoint_is_not_a_death_signal() -> None:
    """Accepted but never greeted (a stopped process's kernel): watched, never signalled."""
    server, address, held = await _stranger(b"")
    watch = DeathWatch(connect_timeout_s=1.0)
    try:
        dead = watch.follow(Target("leader", address, lease_id=7, token=3))
        await _until(lambda: bool(held), 5, "the endpoint to accept")
        task = watch._task
        assert task is not None
        done, _ = await asyncio.wait({task}, timeout=0.5)
        assert not done and not dead.is_set()  # still holding the connection
    finally:
        await watch.close()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
