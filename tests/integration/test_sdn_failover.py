"""Two real `vim-sdn` processes on real PostgreSQL and etcd: SIGKILL and SIGSTOP the master.

The test seeds hosts, networks and placed servers straight into the log, starts
two controllers (`python -m vim.sdn.service`, each its own process, event-log
connection, read model and etcd elector), and keeps creating networks, ports
and servers (and terminating some) while it

1. SIGKILLs the master: the follower wins the election and carries on;
2. starts a fresh follower, then SIGSTOPs the new master: the fresh one takes
   over; the paused one is resumed once the newer term holds the lease.

The verdict comes from the log alone: every host's last recorded plan equals the
plan computed from a fresh replay (convergence); no stream records the same plan
twice in a row (a new master recomputing identical plans writes nothing); a
network keeps its local tag on a host while present, across both failovers;
every master's writes carry a larger fencing token than its predecessor's and
no event with an older token lands after a newer one; and an append with the
killed master's token is refused with `FencedOut`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from vim.domain import host, netplan, network, port, server
from vim.domain.base import DomainEvent
from vim.errors import FencedOut, Unavailable
from vim.eventlog.model import (
    ANY_VERSION,
    AppendRequest,
    Metadata,
    NewEvent,
    RecordedEvent,
    StreamAppend,
)
from vim.eventlog.sql import SqlEventLog
from vim.harness.etcd import EtcdCluster
from vim.projections.readmodel import Projector, ReadModel, replay
from vim.sdn.service import ROLE, desired_plans, recorded_plans

pytestmark = [pytest.mark.postgres, pytest.mark.etcd, pytest.mark.slow]

T0 = "2030-01-01T00:00:00.000Z"
SEED = Metadata(actor="test-seed")
HOSTS = [f"cmp-{i:02d}" for i in range(6)]
FLAVOR = server.FlavorCopy("f1", "m1", 1, 512, 1)


# -- seeding straight into the log ----------------------------------------------------


def _new(events: Sequence[DomainEvent]) -> list[NewEvent]:
    return [NewEvent(e.type, e.to_data(), e.SCHEMA_VERSION) for e in events]


async def _append(log: SqlEventLog, streams: list[tuple[str, int, Sequence[DomainEvent]]]) -> None:
    await log.append(
        AppendRequest(
            streams=[StreamAppend(sid, v, _new(evs)) for sid, v, evs in streams], metadata=SEED
        )
    )


class Seeder:
    """Makes hosts, networks and servers with NICs; each one append, like the API does."""

    def __init__(self, log: SqlEventLog) -> None:
        self.log = log
        self.networks: list[str] = []
        self.servers: list[str] = []
        self._n = 0

    async def hosts(self) -> None:
        for i, name in enumerate(HOSTS):
            ip = "" if i == len(HOSTS) - 1 else f"10.9.0.{i + 1}"  # the last one has no tunnel IP
            spec = host.HostSpec("z1", 64, 262144, 1000, tunnel_ip=ip)
            await _append(self.log, [(host.stream(name), 0, host.register(None, name, spec, T0))])

    async def network(self, kind: network.NetworkType) -> str:
        self._n += 1
        nid = f"net-{self._n:04d}"
        seg = 100 + self._n if kind is not network.NetworkType.FLAT else 0
        physnet = "physnet1" if kind is network.NetworkType.VLAN else f"flat{self._n}"
        pool = network.pool_id(kind, physnet)
        created = network.NetworkAllocated(nid, "t1", nid, kind.value, physnet, seg, created_at=T0)
        reserved = network.SegmentReserved(pool, seg, nid)
        await _append(
            self.log,
            [
                (network.stream(nid), 0, [created]),
                (network.pool_stream(pool), ANY_VERSION, [reserved]),
            ],
        )
        self.networks.append(nid)
        return nid

    async def server(self, hostname: str, nets: Sequence[str]) -> str:
        self._n += 1
        sid = f"srv-{self._n:04d}"
        nics, ports = [], []
        for j, nid in enumerate(nets):
            pid = f"port-{self._n:04d}-{j}"
            mac = f"fa:16:3e:{self._n >> 8:02x}:{self._n & 0xFF:02x}:{j:02x}"
            nics.append(server.Nic(pid, nid, mac, ()))
            ports.append(
                (port.stream(pid), 0, [port.allocate(pid, nid, "t1", pid, mac, [], sid, {}, T0)])
            )
        allocated = server.allocate(sid, "t1", sid, FLAVOR, "img", nics, now=T0)
        s = server.evolve(None, allocated)
        scheduled = server.schedule(s, hostname, "z1", T0)
        await _append(self.log, [*ports, (server.stream(sid), 0, [allocated, scheduled])])
        self.servers.append(sid)
        return sid

    async def terminate(self, sid: str) -> None:
        await _append(self.log, [(server.stream(sid), 2, [server.ServerTerminated(sid, T0)])])
        self.servers.remove(sid)


async def _load(seeder: Seeder, steps: int, done: list[int]) -> None:
    """A bounded mix: new networks, servers spread over hosts, some terminations."""
    kinds = [network.NetworkType.VXLAN, network.NetworkType.VXLAN, network.NetworkType.VLAN]
    for i in range(steps):
        if i % 5 == 0:
            await seeder.network(kinds[i % 3])
        nets = seeder.networks
        picked = [nets[(i * 7) % len(nets)], nets[(i * 3 + 1) % len(nets)]]
        await seeder.server(HOSTS[i % len(HOSTS)], sorted(set(picked)))
        if i % 4 == 3:
            await seeder.terminate(seeder.servers[(i * 5) % len(seeder.servers)])
        done[0] = i + 1


# -- the controllers --------------------------------------------------------------------


class Controllers:
    """`vim-sdn` child processes; every one is SIGKILLed and reaped at the end."""

    def __init__(self, url: str, endpoints: list[str], prefix: str, logs: Path) -> None:
        self._args = [
            "--eventlog-url",
            url,
            "--etcd",
            ",".join(endpoints),
            "--election-prefix",
            prefix,
            "--log-level",
            "INFO",
        ]
        self._logs = logs
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str) -> None:
        with (self._logs / f"{name}.log").open("wb") as out:
            self.procs[name] = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "vim.sdn.service",
                *self._args,
                "--name",
                name,
                stdout=out,
                stderr=out,
            )

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.procs[name].pid, sig)

    async def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            await proc.wait()

    def log_of(self, name: str) -> str:
        return (self._logs / f"{name}.log").read_text(errors="replace")

    async def close(self) -> None:
        for name in self.procs:
            await self.kill(name)


@pytest.fixture
def etcd() -> Iterator[EtcdCluster]:
    with EtcdCluster.start(size=1, tuned=True) as cluster:
        yield cluster


@pytest.fixture
async def controllers(pg_url: str, etcd: EtcdCluster, tmp_path: Path) -> AsyncIterator[Controllers]:
    c = Controllers(pg_url, etcd.endpoints, f"/test/{uuid.uuid4().hex}/", tmp_path)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def seed_log(pg_url: str) -> AsyncIterator[SqlEventLog]:
    log = await SqlEventLog.open(pg_url, migrate=False)
    yield log
    await log.close()


async def _until(check: Callable[[], Awaitable[bool] | bool], within: float, what: str) -> float:
    """Poll `check` (20 ms apart) until true; the seconds it took; fail after `within`."""
    start = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() - start > within:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def _converged(model: ReadModel) -> bool:
    recorded = recorded_plans(model)
    return not any(netplan.changed(recorded.get(h), p) for h, p in desired_plans(model).items())


async def _plan_events(log: SqlEventLog) -> list[RecordedEvent]:
    out: list[RecordedEvent] = []
    after = 0
    while batch := await log.read_all(after=after, limit=2000):
        out += [e for e in batch if e.stream_kind == netplan.KIND]
        after = batch[-1].position
    return out


def _writer(e: RecordedEvent) -> str:
    return (e.metadata.actor or "").removeprefix("sdn:")


async def _last_writer(log: SqlEventLog) -> tuple[str, int]:
    events = await _plan_events(log)
    assert events, "no plan recorded yet"
    return _writer(events[-1]), events[-1].metadata.fencing_token or 0


class Scenario:
    """The seeded log, the controllers and a watcher following the log."""

    def __init__(self, log: SqlEventLog, controllers: Controllers) -> None:
        self.log = log
        self.controllers = controllers
        self.seeder = Seeder(log)
        self.watcher = Projector(log)
        self.done = [0]

    async def seed(self) -> None:
        await self.seeder.hosts()
        for kind in (network.NetworkType.VXLAN, network.NetworkType.VLAN, network.NetworkType.FLAT):
            await self.seeder.network(kind)
        for i in range(12):
            await self.seeder.server(HOSTS[i % len(HOSTS)], [self.seeder.networks[i % 3]])
        await self.watcher.catch_up()
        self.watcher.start()

    async def converged(self) -> bool:
        with contextlib.suppress(Unavailable):
            await self.watcher.model.wait_for(await self.log.head(), within_s=1.0)
        return _converged(self.watcher.model)

    async def written_by(self, name: str) -> bool:
        return (await _last_writer(self.log))[0] == name

    async def kill_master_under_load(self, master: str, follower: str) -> float:
        """SIGKILL `master` mid-load; seconds until `follower` writes."""
        load = asyncio.create_task(_load(self.seeder, 40, self.done))
        await _until(lambda: self.done[0] >= 10 or load.done(), 30, "the load to get going")
        await self.controllers.kill(master)
        killed_at = time.monotonic()
        await _until(lambda: self.written_by(follower), 20, f"{follower} to take over")
        takeover_s = time.monotonic() - killed_at
        await load
        await _until(self.converged, 30, "plans to converge after the SIGKILL failover")
        return takeover_s

    async def pause_master_under_load(self, master: str, fresh: str) -> None:
        """SIGSTOP `master`, let `fresh` take over under load, then resume `master`."""
        await self.controllers.start(fresh)
        self.controllers.signal(master, signal.SIGSTOP)
        load = asyncio.create_task(_load(self.seeder, 30, self.done))
        # Resume the paused master once the fresh one holds the term (not once it has
        # written: the paused one may hold a database lock that the first write waits for).
        banner = f"sdn {fresh} is master"
        await _until(lambda: banner in self.controllers.log_of(fresh), 20, banner)
        self.controllers.signal(master, signal.SIGCONT)
        await _until(lambda: self.written_by(fresh), 20, f"{fresh} to take over from {master}")
        await load
        await _until(self.converged, 30, "plans to converge after the SIGSTOP failover")


async def test_master_killed_and_paused_under_load_plans_converge_without_duplicates(
    seed_log: SqlEventLog,
    controllers: Controllers,
    record_property: Callable[[str, object], None],
) -> None:
    sc = Scenario(seed_log, controllers)
    await sc.seed()
    try:
        await controllers.start("a")
        await controllers.start("b")
        await _until(sc.converged, 30, "the first master to record every plan")
        first, first_token = await _last_writer(seed_log)
        second = "b" if first == "a" else "a"
        takeover_s = await sc.kill_master_under_load(first, second)
        writer, second_token = await _last_writer(seed_log)
        assert writer == second and second_token > first_token
        await sc.pause_master_under_load(second, "c")
        last, third_token = await _last_writer(seed_log)
        assert last == "c" and third_token > second_token
    finally:
        await sc.watcher.stop()

    # A write with the killed master's token is refused by the log itself.
    sid = netplan.stream(HOSTS[0])
    stale = AppendRequest(
        streams=[
            StreamAppend(
                sid, await seed_log.stream_version(sid), _new([netplan.HostPlan(HOSTS[0]).event()])
            )
        ],
        metadata=Metadata(actor=f"sdn:{first}", fencing_role=ROLE, fencing_token=first_token),
    )
    with pytest.raises(FencedOut):
        await seed_log.append(stale)

    events = await _verdict(seed_log)
    writers = [_writer(e) for e in events]
    assert {first, second, "c"} <= set(writers)
    record_property("sdn_takeover_after_sigkill_s", round(takeover_s, 3))
    print(
        f"\nsdn failover: takeover after SIGKILL {takeover_s:.2f}s; {len(events)} plan events, "
        f"by writer {{{', '.join(f'{w}: {writers.count(w)}' for w in sorted(set(writers)))}}}"
    )


async def _verdict(log: SqlEventLog) -> list[RecordedEvent]:
    """Check the final plans and the whole plan history from a fresh replay."""
    model = await replay(log, await log.head())
    assert _converged(model)
    plans = recorded_plans(model)
    assert set(plans) == set(HOSTS)
    events = await _plan_events(log)
    _check_history(events)
    for plan in plans.values():
        tags = plan.local_tags()
        assert len(set(tags.values())) == len(tags), plan
        assert plan.hostname not in {t.remote_host for t in plan.tunnels}
        for t in plan.tunnels:
            assert plan.hostname in {r.remote_host for r in plans[t.remote_host].tunnels}
    assert plans[HOSTS[-1]].tunnels == ()  # no tunnel IP: plugged locally only
    return events


def _check_history(events: Sequence[RecordedEvent]) -> None:
    """No repeated plan, tags stable while present, tokens never go backwards."""
    newest_token = 0
    last: dict[str, netplan.HostPlan] = {}
    for e in events:
        token = e.metadata.fencing_token or 0
        assert e.metadata.fencing_role == ROLE and token > 0, e.metadata
        assert token >= newest_token, f"token {token} landed after {newest_token} at {e.position}"
        newest_token = token
        stored = netplan.evolve(None, netplan.HostNetworkPlanned.from_data(e.data))
        before = last.get(e.stream_id)
        assert netplan.changed(before, stored), f"{e.stream_id} recorded the same plan twice"
        if before is not None:
            old = before.local_tags()
            for nid, tag in stored.local_tags().items():
                assert old.get(nid, tag) == tag, f"{nid} changed its tag on {e.stream_id}"
        last[e.stream_id] = stored
