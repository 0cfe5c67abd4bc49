"""Migrations carried out by real agents: a hand-off, never a server on two hosts.

Real `vim-agent` processes (each on its own libvirt `test:///PATH` node, `--ovs
none`), an API node and the scheduler in the test's process on a SQLite log,
a real etcd member for the agents' leases (`tests.integration.test_agent`).
The source agent stops and removes its domain and records
`ServerMigrationSourceReleased`; only then does the target define and start it,
and its report moves the server. A test node lives inside its agent's own
libvirt connection, so "what runs on a host" is read from the agent's status
file, which it rewrites after every pass from a fresh libvirt listing.

Live migration degrades to the same hand-off on these nodes (docs/AGENT.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
import pytest

from tests.e2e.test_agents_api import ADMIN, AUTH, MEMBER, allocation, bearer, violations
from tests.integration.test_agent import (  # noqa: F401  (fixtures)
    AgentProcess,
    Cluster,
    cluster,
    domains,
    etcd,
    until,
)
from vim._gen.vim.v1 import agents_pb2, agents_pb2_grpc, compute_pb2, hosts_pb2, hosts_pb2_grpc
from vim.app.commands import Change, CommandContext, Decision, Principal
from vim.domain import evacuation as ev
from vim.domain import host, server
from vim.faultd.liveness import EtcdLiveness
from vim.faultd.service import FaultdConfig, FaultManager
from vim.projections.readmodel import ReadModel

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

OFFLINE = compute_pb2.MIGRATION_TYPE_OFFLINE
LIVE = compute_pb2.MIGRATION_TYPE_LIVE


def _ms(start: str, end: str) -> float:
    a = datetime.fromisoformat(start.replace("Z", "+00:00"))
    b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    return (b - a).total_seconds() * 1000


async def records(c: Cluster, sid: str) -> list[Any]:
    assert c.node.node is not None
    return list(await c.node.node.log.read_stream(f"server-{sid}"))


async def interruptions(c: Cluster, sid: str) -> list[float]:
    """Per completed hand-off: ms from the source's release to the target's report."""
    out, released = [], ""
    for e in await records(c, sid):
        if e.type == "ServerMigrationSourceReleased":
            released = e.data["released_at"]
        elif e.type == "ServerStateReported" and released:
            out.append(_ms(released, e.data["reported_at"]))
            released = ""
    return out


async def migrate(c: Cluster, sid: str, target: str, kind: int = OFFLINE) -> int:
    """Request the migration; returns the log position of the request."""
    await c.compute.MigrateCompute(
        compute_pb2.MigrateComputeRequest(
            request_id=str(uuid.uuid4()), server_id=sid, type=kind, target_host=target
        ),
        metadata=MEMBER,
    )
    return int(
        max(e.position for e in await records(c, sid) if e.type == "ServerMigrationRequested")
    )


async def force_migrate(c: Cluster, sid: str, target: str) -> None:
    """A migration to `target` appended without the placement filters (test setup only)."""
    assert c.node.node is not None
    ctx = CommandContext(Principal("test", "ops", frozenset({"admin"})), str(uuid.uuid4()), "t")

    def decide(model: ReadModel) -> Decision:
        s: server.Server = model.get(server.stream(sid)).state  # type: ignore[union-attr]
        h = model.get(host.stream(target))
        assert h is not None
        event = server.migrate(s, server.MigrationType.OFFLINE, target, datetime.now().isoformat())
        claim = host.claim(h.state, sid, s.flavor.vcpus, s.flavor.ram_mb, s.flavor.disk_gb)
        return Decision(
            [
                Change(server.stream(sid), model.version(server.stream(sid)), [event]),
                Change(host.stream(target), h.version, [claim]),
            ]
        )

    await c.node.node.runner.run(ctx, decide)


async def settled_on(c: Cluster, sid: str, hostname: str) -> bool:
    s = await c.server(sid)
    return s.host == hostname and s.state == compute_pb2.SERVER_STATE_ACTIVE and not s.task


def running(agent: AgentProcess, sid: str) -> bool:
    status = agent.status()
    return status is not None and status["domains"].get(sid) == "RUNNING"


def saw(agent: AgentProcess, position: int) -> bool:
    """The agent ran a pass on a snapshot at least as new as `position`."""
    status = agent.status()
    return status is not None and status["position"] >= position


class Sampler:
    """Reads both agents' status every 25 ms; keeps the samples where both run the server."""

    def __init__(self, a: AgentProcess, b: AgentProcess, sid: str) -> None:
        self.a, self.b, self.sid = a, b, sid
        self.samples = 0
        self.both: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            on_a, on_b = running(self.a, self.sid), running(self.b, self.sid)
            self.samples += 1
            if on_a and on_b:
                self.both.append(time.monotonic())
            await asyncio.sleep(0.025)

    def __enter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def two_hosts(c: Cluster) -> tuple[AgentProcess, AgentProcess]:
    a, b = c.agent("cmp-1"), c.agent("cmp-2")
    await until("both agents' first pass", lambda: a.status() and b.status())
    return a, b


async def test_offline_migration_is_a_hand_off_never_on_two_hosts(
    cluster: Cluster,  # noqa: F811
) -> None:
    a, b = await two_hosts(cluster)
    sid = await cluster.allocate("vm")
    await until("the server ACTIVE", lambda: cluster.active(sid))
    before = await cluster.server(sid)
    src, dst = (a, b) if before.host == "cmp-1" else (b, a)
    await until("its domain running", lambda: running(src, sid))

    # Three round trips (six hand-offs) while both hosts are sampled.
    took: list[float] = []
    with Sampler(src, dst, sid) as sampler:
        for there, back in ((dst, src),) * 3:
            for to, frm in ((there, back), (back, there)):
                started, mark = time.monotonic(), sampler.samples
                await migrate(cluster, sid, to.hostname)
                await until(
                    "ACTIVE on the target", lambda h=to.hostname: settled_on(cluster, sid, h)
                )
                took.append((time.monotonic() - started) * 1000)
                await until("the target's domain seen running", lambda to=to: running(to, sid))
                await until("the source's domain seen gone", lambda frm=frm: domains(frm)() == {})
                # A fast hand-off may fall between two samples: make sure the sampler ran
                # across this one (it also sees the state right after it).
                await until("sampled", lambda mark=mark: sampler.samples >= mark + 2)
    assert sampler.both == [], f"running on both hosts in {len(sampler.both)} samples"
    assert sampler.samples >= 12  # sampled through every hand-off

    after = await cluster.server(sid)
    assert after.server_id == before.server_id
    assert [(n.mac_address, list(n.ip_addresses)) for n in after.nics] == [
        (n.mac_address, list(n.ip_addresses)) for n in before.nics
    ]
    types = [e.type for e in await records(cluster, sid)]
    moved = types[types.index("ServerMigrationRequested") :]
    hand_off = ["ServerMigrationRequested", "ServerMigrationSourceReleased", "ServerStateReported"]
    assert moved == hand_off * 6
    gaps = await interruptions(cluster, sid)
    # The release wakes the target's watch at once (its resync period is 2 s).
    assert len(gaps) == 6 and all(0 <= g < 1500 for g in gaps), gaps
    print(
        f"OFFLINE hand-offs: request->ACTIVE ms {[round(x) for x in took]}, "
        f"release->running ms {[round(g) for g in gaps]}, {sampler.samples} samples"
    )

    # Capacity follows the server: claimed on the target by the request, given back on
    # the source in the append that ends the migration.
    assert cluster.node.node is not None
    claims = {
        h: set(cluster.node.node.model.get(host.stream(h)).state.claims)  # type: ignore[union-attr]
        for h in (src.hostname, dst.hostname)
    }
    assert claims == {src.hostname: {sid}, dst.hostname: set()}

    # The release is the source's alone, and said once: the API refuses anyone else.
    async with grpc.aio.insecure_channel(cluster.node.address) as ch:
        stub = agents_pb2_grpc.AgentsStub(ch)
        ask = agents_pb2.ReportMigrationSourceReleasedRequest
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.ReportMigrationSourceReleased(
                ask(request_id=str(uuid.uuid4()), hostname=src.hostname, server_id=sid),
                metadata=bearer(AUTH.mint_agent(src.hostname)),
            )
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.ReportMigrationSourceReleased(
                ask(request_id=str(uuid.uuid4()), hostname=dst.hostname, server_id="not an id"),
                metadata=bearer(AUTH.mint_agent(dst.hostname)),
            )
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(bad.value) == ["server_id"]


async def test_crashes_at_any_point_converge_without_two_copies(
    cluster: Cluster,  # noqa: F811
) -> None:
    a, b = await two_hosts(cluster)
    sid = await cluster.allocate("vm")
    await until("the server ACTIVE", lambda: cluster.active(sid))
    src, dst = (a, b) if (await cluster.server(sid)).host == "cmp-1" else (b, a)
    await until("its domain running", lambda: running(src, sid))

    # The source dies before it released: the target holds; the restarted source releases.
    src.kill()
    position = await migrate(cluster, sid, dst.hostname)
    await until("the target to see the migration", lambda: saw(dst, position))
    assert not running(dst, sid)
    types = [e.type for e in await records(cluster, sid)]
    assert "ServerMigrationSourceReleased" not in types
    src.start()
    await until("the server ACTIVE on the target", lambda: settled_on(cluster, sid, dst.hostname))
    await until("the target running it", lambda: running(dst, sid))

    # Back again, with the target dead: the source releases and is SIGKILLed after it;
    # the target, restarted, starts the server.
    src, dst = dst, src
    dst.kill()
    await migrate(cluster, sid, dst.hostname)
    await until(
        "the release",
        lambda: _has(records(cluster, sid), "ServerMigrationSourceReleased", after=position),
    )
    await until("the source's domain gone", lambda: not running(src, sid))
    src.kill()
    dst.start()
    await until("the server ACTIVE on the target", lambda: settled_on(cluster, sid, dst.hostname))
    await until("the target running it", lambda: running(dst, sid))
    src.start()
    await until("the restarted source's pass", src.status)
    assert not running(src, sid)
    assert len(await interruptions(cluster, sid)) == 2


async def _has(coro: Any, kind: str, *, after: int) -> bool:
    return any(e.type == kind and e.position > after for e in await coro)


@pytest.fixture
async def faultd(cluster: Cluster) -> AsyncIterator[FaultManager]:  # noqa: F811
    """The fault manager, leading alone (static fencing token), on the agents' etcd."""
    assert cluster.node.node is not None
    manager = FaultManager(
        cluster.node.node.log,
        cluster.node.node.model,
        EtcdLiveness(cluster.etcd.endpoints),
        config=FaultdConfig(
            static_token=1,
            unleased_grace_s=None,
            reconcile_interval_s=0.2,
            drain=ev.DrainPolicy(max_per_group=1),
        ),
    )
    task = asyncio.create_task(manager.run())
    try:
        yield manager
    finally:
        await manager.stop()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)


async def test_maintenance_drains_a_host_through_the_agents(
    cluster: Cluster,  # noqa: F811
    faultd: FaultManager,
) -> None:
    first = cluster.agent("cmp-1")
    await until("cmp-1's first pass", first.status)
    c = cluster.compute
    group = await c.CreateAffinityGroup(
        compute_pb2.CreateAffinityGroupRequest(
            request_id=str(uuid.uuid4()),
            name="vnf",
            policy=compute_pb2.AFFINITY_POLICY_ANTI_AFFINITY,
            scope=compute_pb2.AFFINITY_SCOPE_HOST,
        ),
        metadata=MEMBER,
    )

    async def make(name: str, live: bool = True, max_ms: int = 0, grouped: bool = False) -> str:
        req = allocation(cluster.catalogue, name)
        req.migration.live_migration_allowed = live
        req.migration.max_interruption_ms = max_ms
        if grouped:
            req.affinity_group_id = group.group_id
        return str((await c.AllocateCompute(req, metadata=MEMBER)).server_id)

    cold = await make("cold", live=False)
    stuck = await make("stuck", live=False, max_ms=300)
    g1 = await make("g1", grouped=True)
    await until("all on cmp-1", lambda: cluster.active(cold, stuck, g1))
    others = [cluster.agent(h) for h in ("cmp-2", "cmp-3")]
    await until("the other agents' first pass", lambda: all(o.status() for o in others))
    g2 = await make("g2", grouped=True)
    await until("g2 ACTIVE elsewhere", lambda: cluster.active(g2))
    # Two members of the anti-affinity group share the host to drain: a placement the
    # API refuses (an explicit target passes the same filters), so it is written straight
    # to the log, as a state inherited from before the group's rules applied.
    await force_migrate(cluster, g2, "cmp-1")
    await until("g2 on cmp-1", lambda: settled_on(cluster, g2, "cmp-1"))
    await until("cmp-1 running all four", lambda: len(domains(first)() or {}) == 4)

    async with grpc.aio.insecure_channel(cluster.node.address) as ch:
        await hosts_pb2_grpc.HostsStub(ch).EnableMaintenance(
            hosts_pb2.EnableMaintenanceRequest(
                request_id=str(uuid.uuid4()), hostname="cmp-1", reason="firmware"
            ),
            metadata=ADMIN,
        )
    started = time.monotonic()
    for sid in (cold, g1, g2):
        await until(
            f"{sid} moved off cmp-1",
            lambda sid=sid: _settled_off(cluster, sid, "cmp-1"),
            timeout_s=30,
        )
    took = time.monotonic() - started
    await until(
        "only the blocked server left on cmp-1", lambda: domains(first)() == {stuck: "RUNNING"}
    )
    assert (await cluster.server(stuck)).host == "cmp-1"

    assert cluster.node.node is not None
    log = await cluster.node.node.log.read_all(after=0, limit=100_000)
    kinds = {
        e.data["server_id"]: e.data["migration_type"]
        for e in log
        if e.type == "ServerMigrationRequested" and e.data["source_host"] == "cmp-1"
    }
    assert kinds == {cold: "OFFLINE", g1: "LIVE", g2: "LIVE"}
    assert [e.data["server_id"] for e in log if e.type == "ServerDrainBlocked"] == [stuck]
    # K=1: a group member's migration starts only after the other one's ended.
    inflight, most = set(), 0
    for e in log:
        sid = e.data.get("server_id")
        if sid not in (g1, g2):
            continue
        if e.type == "ServerMigrationRequested" and e.data["source_host"] == "cmp-1":
            inflight.add(sid)
        elif e.type == "ServerStateReported" and sid in inflight and e.data["host"] != "cmp-1":
            inflight.discard(sid)
        most = max(most, len(inflight))
    assert most == 1
    g_hosts = {(await cluster.server(s)).host for s in (g1, g2)}
    assert len(g_hosts) == 2 and "cmp-1" not in g_hosts  # anti-affinity restored
    gaps = [g for s in (cold, g1, g2) for g in (await interruptions(cluster, s))[-1:]]
    print(f"drain: 3 moved in {took:.2f} s; release->running ms: {[round(g) for g in gaps]}")

    # The blocked server is deleted by the operator: the host reports itself empty.
    await c.TerminateCompute(
        compute_pb2.TerminateComputeRequest(request_id=str(uuid.uuid4()), server_id=stuck),
        metadata=MEMBER,
    )
    await until("HostDrained", lambda: _contains(cluster.events("host-cmp-1"), "HostDrained"))
    await until("cmp-1 empty", lambda: domains(first)() == {})


async def _settled_off(c: Cluster, sid: str, hostname: str) -> bool:
    s = await c.server(sid)
    return s.host != hostname and s.state == compute_pb2.SERVER_STATE_ACTIVE and not s.task


async def _contains(coro: Any, item: str) -> bool:
    return item in await coro
