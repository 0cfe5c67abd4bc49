"""The agent's service loop in-process: fake hypervisor (the driver Protocol), real API.

Covers what the libvirt test driver cannot produce: a guest watchdog firing and a
domain crashing, which must become fault facts on the server's stream, and the
level-triggered loop bringing the crashed domain back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.e2e.test_agents_api import AUTH, MEMBER, SECRET, allocation, populate
from tests.unit.test_agent_reconcile import FakeHypervisor
from tests.waiting import until
from vim._gen.vim.v1 import compute_pb2, compute_pb2_grpc
from vim.agent.drivers import DomainEvent, DomainEventKind, DomainPower
from vim.agent.sdnotify import Notifier
from vim.agent.service import Agent, AgentConfig
from vim.api.server import ApiConfig, ApiNode
from vim.scheduler.service import SchedulerConfig, SchedulerService


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[ApiNode]:
    n = ApiNode(
        ApiConfig(
            listen="127.0.0.1:0",
            eventlog_url=f"sqlite:///{tmp_path}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
        )
    )
    await n.start()
    assert n.node is not None
    scheduler = SchedulerService(n.node.log, n.node.model, config=SchedulerConfig(idle_wait_s=0.2))
    task = asyncio.create_task(scheduler.run())
    yield n
    await scheduler.stop()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    await n.stop()


async def test_watchdog_and_crash_become_facts_and_the_domain_comes_back(
    node: ApiNode, tmp_path: Path
) -> None:
    hv = FakeHypervisor()
    config = AgentConfig(
        hostname="cmp-1",
        api_endpoints=(node.address,),
        token=AUTH.mint_agent("cmp-1"),
        zone="z1",
        state_dir=tmp_path / "agent",
        resync_s=1.0,
        heartbeat_ms=200,
    )
    agent = Agent(config, hv, None, notifier=Notifier(None))
    task = asyncio.create_task(agent.run())
    assert node.node is not None
    log = node.node.log
    try:
        await until("the agent ready", agent.ready.is_set)
        async with grpc.aio.insecure_channel(node.address) as ch:
            compute = compute_pb2_grpc.ComputeStub(ch)
            made = await compute.AllocateCompute(allocation(await populate(ch)), metadata=MEMBER)
            sid = made.server_id
            await until("the domain running", lambda: hv.domains.get(sid, (None, None))[1])
            got = await until(
                "ACTIVE",
                lambda: _active(compute, sid),
            )
            assert got.host == "cmp-1"

            hv.events_queue.put_nowait(
                DomainEvent(DomainEventKind.WATCHDOG, sid, DomainPower.RUNNING, "RESET")
            )
            await until("ServerWatchdogFired", lambda: _types(log, sid, "ServerWatchdogFired"))

            spec, _ = hv.domains[sid]
            hv.domains[sid] = (spec, DomainPower.CRASHED)  # it died on the host
            hv.calls.clear()
            hv.events_queue.put_nowait(
                DomainEvent(DomainEventKind.LIFECYCLE, sid, DomainPower.CRASHED, "crashed")
            )
            await until("ServerCrashed", lambda: _types(log, sid, "ServerCrashed"))
            await until("the domain back", lambda: hv.domains[sid][1] is DomainPower.RUNNING)
            assert ("ensure", sid) in hv.calls
            events = await log.read_stream(f"server-{sid}")
            crashed = next(e for e in events if e.type == "ServerCrashed")
            assert crashed.data["hostname"] == "cmp-1" and crashed.data["reason"] == "crashed"

            # Shut off on the host behind the agent's back (nobody asked): a crash too.
            hv.domains[sid] = (spec, DomainPower.SHUTDOWN)
            hv.events_queue.put_nowait(
                DomainEvent(DomainEventKind.LIFECYCLE, sid, DomainPower.SHUTDOWN, "destroyed")
            )
            await until("a second ServerCrashed", lambda: _count(log, sid, "ServerCrashed", 2))
            await until("the domain back again", lambda: hv.domains[sid][1] is DomainPower.RUNNING)
    finally:
        await agent.stop()
        await asyncio.wait_for(task, 15)


async def _active(compute: compute_pb2_grpc.ComputeStub, sid: str) -> compute_pb2.Server | None:
    s = await compute.GetServer(compute_pb2.GetServerRequest(server_id=sid), metadata=MEMBER)
    return s if s.state == compute_pb2.SERVER_STATE_ACTIVE and not s.task else None


async def _count(log: Any, sid: str, wanted: str, n: int) -> bool:
    return [e.type for e in await log.read_stream(f"server-{sid}")].count(wanted) >= n


async def _types(log: Any, sid: str, wanted: str) -> bool:
    return wanted in [e.type for e in await log.read_stream(f"server-{sid}")]
