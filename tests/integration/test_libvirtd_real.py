"""LibvirtDriver against a private, real libvirtd running QEMU (TCG) domains; libvirtd killed.

Each test starts its own libvirtd + virtlogd (vim.harness.libvirtd, ~0.3 s; the
first QEMU use on a machine probes QEMU for ~5 s, then it is cached) and stops it,
with every QEMU it started, at the end. Failures are real: SIGKILL (the socket
closes), SIGSTOP (only the keepalive notices), and a restart by the agent's own
Supervisor whose reports reach a real event log through the Agents API.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.test_agents_api import AUTH, SECRET
from vim._gen.vim.v1 import hosts_pb2
from vim.agent.apiclient import AgentApi
from vim.agent.drivers import DomainEvent, DomainEventKind, DomainPower, DomainSpec
from vim.agent.errors import HypervisorError, HypervisorUnavailable
from vim.agent.libvirt_driver import LibvirtDriver
from vim.agent.reports import ServerFaultReport, fault_report
from vim.agent.supervisor import SupervisedService, Supervisor
from vim.api.server import ApiConfig, ApiNode
from vim.harness.libvirtd import LibvirtDaemon
from vim.harness.ports import wait_until

pytestmark = pytest.mark.slow

P = DomainPower
EVENT_TIMEOUT = 30.0  # a loaded 2-core machine emulating a guest can be slow


def diskless(server_id: str) -> DomainSpec:
    """A domain with no disk and no kernel: SeaBIOS runs, finds nothing, keeps running."""
    return DomainSpec(server_id=server_id, name=server_id, vcpus=1, ram_mb=64, disk_gb=0)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[LibvirtDaemon]:
    with LibvirtDaemon.start(base_dir=tmp_path) as d:
        yield d


@pytest.fixture
async def driver(daemon: LibvirtDaemon, tmp_path: Path) -> AsyncIterator[LibvirtDriver]:
    d = LibvirtDriver(daemon.uri, tmp_path / "state")
    await d.connect()
    yield d
    await d.close()


async def next_event(
    it: AsyncIterator[DomainEvent], pred: Callable[[DomainEvent], bool]
) -> DomainEvent:
    async def scan() -> DomainEvent:
        async for ev in it:
            if pred(ev):
                return ev
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(scan(), EVENT_TIMEOUT)


def lifecycle(server_id: str, power: DomainPower) -> Callable[[DomainEvent], bool]:
    return lambda e: (
        e.kind == DomainEventKind.LIFECYCLE and e.server_id == server_id and e.power == power
    )


async def test_a_qemu_domain_is_defined_started_and_destroyed(
    driver: LibvirtDriver, daemon: LibvirtDaemon
) -> None:
    events = driver.events()
    status = await driver.ensure_domain(diskless("q1"), P.RUNNING)
    assert status.power == P.RUNNING
    await next_event(events, lifecycle("q1", P.RUNNING))
    assert len(daemon.qemu_pids()) == 1  # a real emulator process
    vcpus, ram = await driver.node_capacity()
    assert vcpus >= 1 and ram > 0
    status = await driver.ensure_domain(diskless("q1"), P.SHUTDOWN)
    assert status.power == P.SHUTDOWN
    await next_event(events, lifecycle("q1", P.SHUTDOWN))
    assert daemon.qemu_pids() == []
    await driver.remove_domain("q1")
    assert await driver.list_domains() == []


async def test_a_qemu_killed_on_the_host_is_a_crash(
    driver: LibvirtDriver, daemon: LibvirtDaemon
) -> None:
    events = driver.events()
    await driver.ensure_domain(diskless("c1"), P.RUNNING)
    (qemu,) = daemon.qemu_pids()
    os.kill(qemu, signal.SIGKILL)
    crashed = await next_event(events, lifecycle("c1", P.CRASHED))
    assert crashed.detail == "STOPPED:FAILED"
    assert fault_report(crashed) == ServerFaultReport("c1", False, "STOPPED:FAILED")
    assert [(s.server_id, s.power) for s in await driver.list_domains()] == [("c1", P.CRASHED)]
    status = await driver.ensure_domain(diskless("c1"), P.RUNNING)  # recovers in place
    assert status.power == P.RUNNING


async def test_a_spec_libvirt_cannot_start_is_an_error_not_an_outage(
    driver: LibvirtDriver, tmp_path: Path
) -> None:
    bad = DomainSpec("b1", "b1", 1, 64, 0, kernel_path=str(tmp_path / "no-such-kernel"))
    with pytest.raises(HypervisorError):
        await driver.ensure_domain(bad, P.RUNNING)
    assert [(s.server_id, s.power) for s in await driver.list_domains()] == [("b1", P.SHUTDOWN)]


async def test_libvirtd_sigkilled_connection_lost_then_reconnected(
    driver: LibvirtDriver, daemon: LibvirtDaemon
) -> None:
    events = driver.events()
    await driver.ensure_domain(diskless("k1"), P.RUNNING)  # running through the kill
    await driver.ensure_domain(diskless("k2"), P.SHUTDOWN)  # defined only
    qemu = daemon.qemu_pids()
    assert len(qemu) == 1

    daemon.kill()
    lost = await next_event(events, lambda e: e.kind == DomainEventKind.CONNECTION_LOST)
    assert lost.server_id == "" and lost.detail in {"eof", "error"}
    with pytest.raises(HypervisorUnavailable):
        await driver.list_domains()
    with pytest.raises(HypervisorUnavailable):
        await driver.connect()  # nothing listens yet

    # Restarted the way the agent's supervisor does it: the daemonizing command line.
    await asyncio.to_thread(subprocess.run, daemon.start_argv(), check=True, timeout=60)
    await asyncio.to_thread(wait_until, daemon.answers, 60.0, what="restarted libvirtd")
    assert daemon.pid is not None
    await driver.connect()
    listed = {s.server_id: s.power for s in await driver.list_domains()}
    assert listed == {"k1": P.RUNNING, "k2": P.SHUTDOWN}
    assert daemon.qemu_pids() == qemu  # the guest survived its manager's death

    # The same iterator carries the new connection's events.
    await driver.ensure_domain(diskless("k1"), P.SHUTDOWN)
    await next_event(events, lifecycle("k1", P.SHUTDOWN))
    assert await driver.destroy_all() == 0

    # The harness kills a libvirtd it did not start, too; restart() brings its own back.
    daemon.kill()
    await next_event(events, lambda e: e.kind == DomainEventKind.CONNECTION_LOST)
    await asyncio.to_thread(daemon.restart)
    await driver.connect()
    assert len(await driver.list_domains()) == 2


async def test_libvirtd_sigstopped_keepalive_declares_the_connection_lost(
    driver: LibvirtDriver, daemon: LibvirtDaemon
) -> None:
    events = driver.events()
    await driver.ensure_domain(diskless("f1"), P.SHUTDOWN)
    daemon.freeze()
    try:
        # No socket closes: only the keepalive (2 s x 3 unanswered) can tell.
        lost = await next_event(events, lambda e: e.kind == DomainEventKind.CONNECTION_LOST)
        assert lost.detail == "keepalive"
    finally:
        daemon.thaw()
    await driver.connect()
    assert [s.server_id for s in await driver.list_domains()] == ["f1"]


async def test_supervisor_restarts_a_killed_libvirtd_recorded_in_the_log(
    driver: LibvirtDriver, daemon: LibvirtDaemon, tmp_path: Path
) -> None:
    """The issue's scenario end to end: the agent's Supervisor (vim.agent.supervisor)
    restarts the SIGKILLed libvirtd, HostServiceFailed/Recovered reach a real log
    through the Agents API, and the driver reconnects to the new daemon."""
    node = ApiNode(
        ApiConfig(
            listen="127.0.0.1:0",
            eventlog_url=f"sqlite:///{tmp_path}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
        )
    )
    await node.start()
    api = AgentApi([node.address], "cmp-1", AUTH.mint_agent("cmp-1"))
    service = SupervisedService(
        name="libvirtd",
        pidfile=daemon.pidfile,
        start=tuple(daemon.start_argv()),
        probe=("virsh", "-c", daemon.uri, "version"),
        probe_timeout_s=5.0,
        ready_timeout_s=60.0,
    )
    supervisor = Supervisor([service], api, interval_s=0.1)
    task = asyncio.create_task(supervisor.run())
    try:
        await api.register(
            zone="z1",
            vcpus=4,
            ram_mb=4096,
            disk_gb=10,
            management_address="127.0.0.1",
            hypervisor_type=hosts_pb2.HYPERVISOR_TYPE_QEMU,
        )
        events = driver.events()
        await driver.ensure_domain(diskless("s1"), P.SHUTDOWN)
        first = daemon.pid
        daemon.kill()
        await next_event(events, lambda e: e.kind == DomainEventKind.CONNECTION_LOST)
        assert node.node is not None
        log = node.node.log

        async def recorded() -> list[str]:
            while True:
                types = [e.type for e in await log.read_stream("host-cmp-1")]
                if "HostServiceRecovered" in types:
                    return types
                await asyncio.sleep(0.1)

        types = await asyncio.wait_for(recorded(), 60)
        assert types[-2:] == ["HostServiceFailed", "HostServiceRecovered"]
        assert daemon.pid is not None and daemon.pid != first
        await driver.connect()
        assert [s.server_id for s in await driver.list_domains()] == ["s1"]
    finally:
        await supervisor.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()
        await node.stop()
