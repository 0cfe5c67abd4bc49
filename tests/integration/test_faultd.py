"""The fault manager end to end: real PostgreSQL, real etcd leases, a real Redfish BMC.

A "host" here is a process holding its liveness lease in etcd (`ha.liveness`),
with servers placed on it in the log. SIGKILLing that process makes etcd expire
the lease; the fault manager must notice, classify (the BMC, sushy-tools'
emulator, still answers: COMPUTE_NODE; a BMC that does not answer: HARDWARE),
fence through Redfish (the emulated system really goes Off), and only then
evacuate: the scheduler places each server on another host with the same id,
MAC and IP addresses, and anti-affinity still holds. Then the fault-manager
leader itself is SIGKILLed in the middle of an evacuation: the standby takes
over and finishes it, with no server evacuated or placed twice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import pytest

from ha.election import EtcdElector
from ha.liveness import LivenessKeeper, LivenessRecord
from tests.redfish_server import RedfishBmc
from tests.unit.test_faultd import Srv, seed, until
from vim.domain import evacuation as ev
from vim.domain import host, server
from vim.eventlog.sql import SqlEventLog
from vim.faultd.liveness import EtcdLiveness
from vim.faultd.service import ROLE, FaultdConfig, FaultManager
from vim.harness.etcd import EtcdCluster
from vim.harness.ports import free_port
from vim.projections.readmodel import Projector, ReadModel, replay
from vim.scheduler.service import SchedulerConfig, SchedulerService

pytestmark = [pytest.mark.postgres, pytest.mark.etcd, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
KEEPER = """
import asyncio, sys
from ha.liveness import LivenessKeeper, LivenessRecord
async def main():
    keepers = [LivenessKeeper([sys.argv[1]], LivenessRecord.here(h)) for h in sys.argv[2:]]
    await asyncio.gather(*(k.run() for k in keepers))
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with EtcdCluster.start(size=1) as cluster:
        yield cluster


class Hosts:
    """Lease holders: some in this process, some in child processes to SIGKILL."""

    def __init__(self, endpoints: list[str]) -> None:
        self.endpoints = endpoints
        self.keepers: list[LivenessKeeper] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    async def keep(self, *names: str) -> None:
        for name in names:
            k = LivenessKeeper(self.endpoints, LivenessRecord.here(name))
            self.keepers.append(k)
            self.tasks.append(asyncio.create_task(k.run()))
        for k in self.keepers:
            await asyncio.wait_for(k.alive.wait(), 10)

    def spawn(self, *names: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-c", KEEPER, self.endpoints[0], *names], env=env)
        self.procs.append(proc)
        return proc

    async def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for k in self.keepers:
            await k.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def hosts(etcd: EtcdCluster) -> AsyncIterator[Hosts]:
    h = Hosts(etcd.endpoints)
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def log(pg_url: str) -> AsyncIterator[SqlEventLog]:
    event_log = await SqlEventLog.open(pg_url, migrate=False)
    yield event_log
    await event_log.close()


async def _leases_seen(etcd: EtcdCluster, names: list[str]) -> None:
    """Until every named host's liveness key is in etcd (the child processes started)."""
    await _keys_present(etcd, [f"/vim/hosts/{name}/liveness" for name in names])


async def _keys_present(etcd: EtcdCluster, keys: list[str], within: float = 30) -> None:
    h, port = etcd.endpoints[0].rsplit(":", 1)
    async with aetcd.Client(host=h, port=int(port)) as client:
        deadline = time.monotonic() + within
        for key in keys:
            while await client.get(key.encode()) is None:
                assert time.monotonic() < deadline, f"no {key} in etcd"
                await asyncio.sleep(0.05)


async def _scheduler(pg_url: str) -> tuple[SchedulerService, Projector]:
    slog = await SqlEventLog.open(pg_url, migrate=False)
    projector = Projector(slog)
    await projector.catch_up()
    projector.start()
    config = SchedulerConfig(static_token=1, idle_wait_s=0.2, name="sched")
    return SchedulerService(slog, projector.model, config=config), projector


def _placed_elsewhere(model: ReadModel, sids: list[str], failed: str) -> bool:
    for sid in sids:
        entry = model.get(server.stream(sid))
        if entry is None or entry.state.host in ("", failed):
            return False
    return True


async def test_sigkilled_host_is_fenced_by_redfish_and_its_servers_rebuilt(
    pg_url: str, log: SqlEventLog, etcd: EtcdCluster, hosts: Hosts
) -> None:
    uid = uuid.uuid4().hex[:6]
    names = [f"h{uid}-{i}" for i in range(5)]
    victim, dead_bmc = names[0], names[4]
    with RedfishBmc.start(names[:4]) as bmc:
        endpoints = {n: ("z1", bmc.endpoint(n)) for n in names[:4]}
        # A BMC nobody answers on: its host's failure is a hardware failure, and
        # it cannot be fenced, so its server must stay where it is.
        endpoints[dead_bmc] = ("z1", f"redfish+http://127.0.0.1:{free_port()}/redfish/v1/Systems/1")
        group = f"g{uid}"
        servers = [
            Srv(f"{uid}-low", victim, 0),
            Srv(f"{uid}-high", victim, 100, group),
            Srv(f"{uid}-mid", victim, 10),
            Srv(f"{uid}-g1", names[1], 0, group),
            Srv(f"{uid}-g2", names[2], 0, group),
            Srv(f"{uid}-stuck", dead_bmc, 0),
        ]
        await seed(log, endpoints, servers, [group])
        await hosts.keep(*names[1:4])
        doomed = hosts.spawn(victim, dead_bmc)
        await _leases_seen(etcd, [victim, dead_bmc])

        projector = Projector(log)
        await projector.catch_up()
        projector.start()
        elector = EtcdElector(etcd.endpoints, ROLE, "faultd-a", prefix=f"/t{uid}/election/")
        liveness = EtcdLiveness(etcd.endpoints)
        config = FaultdConfig(fence_retry_s=0.5, unleased_grace_s=2.0, name="faultd-a")
        faultd = FaultManager(log, projector.model, liveness, elector=elector, config=config)
        sched, sched_projector = await _scheduler(pg_url)
        tasks = [asyncio.create_task(faultd.run()), asyncio.create_task(sched.run())]
        try:
            async with asyncio.timeout(120):  # a hang fails with its traceback
                await until(lambda: faultd.leadership() is not None, 10, "faultd leads")
                await until(lambda: faultd._synced, 10, "liveness synced")
                killed = time.monotonic()
                doomed.send_signal(signal.SIGKILL)
                doomed.wait(10)
                evacuated = [s.sid for s in servers[:3]]
                await until(
                    lambda: _placed_elsewhere(projector.model, evacuated, victim), 30, "recovery"
                )
                recovered_in = time.monotonic() - killed
                await until(
                    lambda: faultd.stats.fence_failed >= 1, 20, "the dead BMC's fence fails"
                )
        finally:
            await faultd.stop()
            await sched.stop()
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 15)
            await elector.close()
            await liveness.close()
            await projector.stop()
            await sched_projector.stop()
            await sched_projector._log.close()  # type: ignore[attr-defined]
        print(f"\n[faultd] lease SIGKILL -> 3 servers rebuilt elsewhere in {recovered_in:.2f}s")

        assert bmc.power_state(victim) == "Off"  # really fenced, out of band
        assert all(bmc.power_state(n) == "On" for n in names[1:4])

    await _check_recovery(log, names, servers, group)


async def _check_recovery(
    log: SqlEventLog, names: list[str], servers: list[Srv], group: str
) -> None:
    """The verdict of the SIGKILL test, from a fresh replay of the log."""
    victim, dead_bmc, uid = names[0], names[4], servers[0].sid.split("-")[0]
    model = await replay(log, await log.head())
    records = await log.read_all(after=0, limit=100_000)
    victim_facts = {e.type: e.data for e in records if e.stream_id == host.stream(victim)}
    assert victim_facts["HostFailureDetected"]["kind"] == "COMPUTE_NODE"
    assert victim_facts["HostFenceConfirmed"]["method"] == "redfish"
    fenced_at = next(
        e.position
        for e in records
        if e.type == "HostFenceConfirmed" and e.data["hostname"] == victim
    )
    evac = [e for e in records if e.type == "ServerEvacuationRequested"]
    assert all(e.position > fenced_at for e in evac)  # never before the fence
    assert [e.data["server_id"] for e in evac] == [f"{uid}-high", f"{uid}-mid", f"{uid}-low"]
    assert {e.metadata.fencing_role for e in evac} == {ROLE}

    for s in servers[:3]:
        st = model.get(server.stream(s.sid)).state  # type: ignore[union-attr]
        assert st.host in names[1:4] and st.recovery == ev.PLACED, (s.sid, st.host)
        assert (st.nics[0].mac_address, st.nics[0].ip_addresses) == (s.mac, (s.ip,))
        assert st.name == f"name-{s.sid}" and st.image_id == "img-1"
    hosts_of_group = [
        model.get(server.stream(s.sid)).state.host  # type: ignore[union-attr]
        for s in servers
        if s.group == group
    ]
    assert len(set(hosts_of_group)) == 3, hosts_of_group  # anti-affinity holds
    assert model.get(host.stream(victim)).state.claims == {}  # type: ignore[union-attr]

    stuck = {e.type: e.data for e in records if e.stream_id == host.stream(dead_bmc)}
    assert stuck["HostFailureDetected"]["kind"] == "HARDWARE"
    assert "ConnectError" in stuck["HostFenceFailed"]["reason"]
    assert "HostFenceConfirmed" not in stuck
    still = model.get(server.stream(f"{uid}-stuck")).state  # type: ignore[union-attr]
    assert still.host == dead_bmc  # no recovery without a confirmed fence


def _faultd(
    pg_url: str, etcd: EtcdCluster, name: str, uid: str, tmp: Path
) -> subprocess.Popen[bytes]:
    args = [
        str(REPO / ".venv" / "bin" / "vim-faultd"),
        "--eventlog-url",
        pg_url,
        "--etcd",
        ",".join(etcd.endpoints),
        "--election-prefix",
        f"/t{uid}/election/",
        "--evacuation-interval",
        "0.25",
        "--unleased-grace",
        "2",  # a term that starts after the loss finds the host without a lease
        "--name",
        name,
        "--log-level",
        "INFO",
    ]
    out = (tmp / f"{name}.log").open("wb")
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


async def test_leader_killed_mid_evacuation_the_standby_finishes_without_duplicates(
    pg_url: str, log: SqlEventLog, etcd: EtcdCluster, hosts: Hosts, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:6]
    names = [f"k{uid}-{i}" for i in range(4)]
    victim = names[0]
    count = 16
    with RedfishBmc.start(names) as bmc:
        servers = [Srv(f"{uid}-{i:02d}", victim, i % 4) for i in range(count)]
        await seed(log, {n: ("z1", bmc.endpoint(n)) for n in names}, servers, vcpus=16)
        await hosts.keep(*names[1:])
        doomed = hosts.spawn(victim)
        await _leases_seen(etcd, [victim])
        a = _faultd(pg_url, etcd, "fa", uid, tmp_path)
        b = _faultd(pg_url, etcd, "fb", uid, tmp_path)
        procs = {"fa": a, "fb": b}
        sched, sched_projector = await _scheduler(pg_url)
        sched_task = asyncio.create_task(sched.run())
        try:
            async with asyncio.timeout(120):  # a hang fails with its traceback
                # One of the two candidates holds the election key: the term has begun.
                await _keys_present(etcd, [f"/t{uid}/election/{ROLE}"])
                doomed.send_signal(signal.SIGKILL)
                doomed.wait(10)

                async def evacuations() -> list[object]:
                    return [
                        e
                        for e in await log.read_all(after=0, limit=100_000)
                        if e.type == "ServerEvacuationRequested"
                    ]

                deadline = time.monotonic() + 30
                while not (first := await evacuations()):
                    assert time.monotonic() < deadline, "no evacuation started"
                    await asyncio.sleep(0.05)
                leader = str(first[0].metadata.actor).split(":", 1)[1]  # type: ignore[attr-defined]
                procs[leader].send_signal(signal.SIGKILL)
                procs[leader].wait(10)
                at_kill = len(await evacuations())
                assert at_kill < count, "the evacuation finished before the leader was killed"

                model = sched_projector.model
                sids = [s.sid for s in servers]
                await until(lambda: _placed_elsewhere(model, sids, victim), 60, "all rebuilt")
        finally:
            await sched.stop()
            await asyncio.wait_for(sched_task, 15)
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                p.wait(10)
            await sched_projector.stop()
            await sched_projector._log.close()  # type: ignore[attr-defined]
        assert bmc.power_state(victim) == "Off"

    await _check_no_duplicates(log, servers, victim)
    print(f"\n[faultd] leader killed after {at_kill}/{count} evacuations; standby finished")


async def _check_no_duplicates(log: SqlEventLog, servers: list[Srv], victim: str) -> None:
    """Each server evacuated once and placed once after it; both terms wrote, in order."""
    records = await log.read_all(after=0, limit=100_000)
    evac = [e for e in records if e.type == "ServerEvacuationRequested"]
    per_server = Counter(e.data["server_id"] for e in evac)
    assert per_server == Counter({s.sid: 1 for s in servers}), per_server  # no duplicates
    scheduled = Counter(
        e.data["server_id"]
        for e in records
        if e.type == "ServerScheduled" and e.position > evac[0].position
    )
    assert scheduled == Counter({s.sid: 1 for s in servers}), scheduled
    tokens = [e.metadata.fencing_token for e in evac]
    assert len(set(tokens)) == 2 and tokens == sorted(tokens)  # two terms, the newer one last
    writers = {str(e.metadata.actor) for e in evac}
    assert writers == {"faultd:fa", "faultd:fb"}
    assert (
        Counter(e.type for e in records if e.stream_id == host.stream(victim))[
            "HostFailureDetected"
        ]
        == 1
    )


async def test_liveness_watch_sees_puts_deletions_and_resyncs(etcd: EtcdCluster) -> None:
    uid = uuid.uuid4().hex[:6]
    prefix = f"/t{uid}/hosts/"
    source = EtcdLiveness(etcd.endpoints, prefix=prefix, resync_s=0.5)
    h, port = etcd.endpoints[0].rsplit(":", 1)
    views = source.watch()
    async with aetcd.Client(host=h, port=int(port)) as client:
        await client.put(f"{prefix}a/liveness".encode(), LivenessRecord.here("a").encode())
        await client.put(f"{prefix}a/other".encode(), b"ignored")
        async with asyncio.timeout(20):
            first = await anext(views)
            assert first.reset and set(first.alive) == {"a"} and first.alive["a"].pid == os.getpid()
            await client.put(f"{prefix}b/liveness".encode(), b"not json")
            put = await anext(views)
            assert not put.reset and set(put.alive) == {"b"}  # a bad value still means alive
            await client.delete(f"{prefix}a/liveness".encode())
            lost = await anext(views)
            assert lost.lost == frozenset({"a"}) and not lost.alive
            resync = await anext(views)  # nothing happens for resync_s: a full view again
            assert resync.reset and set(resync.alive) == {"b"}
    await views.aclose()
    await source.close()
