"""Evidence: a real QEMU guest stops feeding its i6300esb watchdog; the fault reaches the log.

The guest (vim.harness.guest: Debian kernel + busybox initramfs, built once and
cached) arms /dev/watchdog, feeds it three times and stops. Booted by
LibvirtDriver on a private real libvirtd with watchdog action RESET, the driver's
events() must yield WATCHDOG (action RESET) and then REBOOT. The WATCHDOG event
is mapped by vim.agent.reports and recorded the way the Agents API records it
(vim.app.agents.server_fault through the CommandRunner) in a real SQLite event log,
then read back as ServerWatchdogFired on the server's stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vim.agent.drivers import DomainEvent, DomainEventKind, DomainPower, DomainSpec, WatchdogAction
from vim.agent.libvirt_driver import LibvirtDriver
from vim.agent.reports import ServerStateReport, fault_report, state_report
from vim.app import agents as app_agents
from vim.app.commands import CommandContext, CommandRunner, Principal
from vim.domain import server
from vim.domain.base import parse
from vim.domain.faults import ServerWatchdogFired
from vim.eventlog.model import AppendRequest, NewEvent, StreamAppend
from vim.eventlog.sql import SqlEventLog
from vim.harness.guest import MARK_STOPPED, build_guest
from vim.harness.libvirtd import LibvirtDaemon
from vim.projections.readmodel import Projector, register_kind

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SERVER = "wd-1"
HOST = "host-1"
FIRE_TIMEOUT = 240.0
"""Boot (~15-30 s under emulation on a loaded machine) + 3 feeds + two watchdog stages."""

register_kind(server.KIND, server.evolve)


async def until(
    events: AsyncIterator[DomainEvent], kind: DomainEventKind, deadline: float
) -> DomainEvent:
    """The next event of ``kind`` for SERVER before the monotonic ``deadline``."""

    async def scan() -> DomainEvent:
        async for ev in events:
            if ev.kind == kind and ev.server_id == SERVER:
                return ev
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(scan(), max(0.0, deadline - time.monotonic()))


async def record_fault(log: SqlEventLog, event: DomainEvent) -> None:
    """Place SERVER on HOST in the log, then record the fault as the Agents API does."""
    flavor = {"flavor_id": "f-1", "name": "tiny", "vcpus": 1, "ram_mb": 256, "disk_gb": 0}
    allocated = server.ServerAllocated(SERVER, "tenant-1", "wd", flavor, "", [])
    scheduled = server.ServerScheduled(SERVER, HOST)
    await log.append(
        AppendRequest(
            [
                StreamAppend(
                    server.stream(SERVER),
                    0,
                    [NewEvent(e.type, e.to_data()) for e in (allocated, scheduled)],
                )
            ]
        )
    )
    report = fault_report(event)
    assert report is not None and report.watchdog and report.server_id == SERVER
    projector = Projector(log)
    projector.start()
    try:
        await projector.catch_up()
        ctx = CommandContext(
            Principal(f"agent:{HOST}", "agents", frozenset({"agent"})), "r-1", "fp"
        )
        await CommandRunner(log, projector.model).run(
            ctx,
            lambda m: app_agents.server_fault(
                m, HOST, report.server_id, report.watchdog, report.detail, "2026-11-22T00:00:00Z"
            ),
        )
    finally:
        await projector.stop()


def console_text(path: str) -> str:
    return Path(path).read_text(errors="replace") if Path(path).exists() else ""


async def test_guest_watchdog_fires_and_reaches_the_log(tmp_path: Path) -> None:
    guest = await asyncio.to_thread(build_guest, heartbeat_s=2, feeds=3)
    spec = DomainSpec(
        server_id=SERVER,
        name="watchdog guest",
        vcpus=1,
        ram_mb=256,
        disk_gb=0,
        kernel_path=str(guest.kernel),
        initrd_path=str(guest.initrd),
        kernel_cmdline=guest.cmdline,
        watchdog=WatchdogAction.RESET,
    )
    daemon = await asyncio.to_thread(LibvirtDaemon.start, tmp_path)
    driver = LibvirtDriver(daemon.uri, tmp_path / "state")
    try:
        await driver.connect()
        events = driver.events()
        status = await driver.ensure_domain(spec, DomainPower.RUNNING)
        assert status.power == DomainPower.RUNNING
        deadline = time.monotonic() + FIRE_TIMEOUT
        console = driver.paths(SERVER).console_log
        try:
            fired = await until(events, DomainEventKind.WATCHDOG, deadline)
        except TimeoutError:
            pytest.fail(f"no WATCHDOG event; guest console:\n{console_text(console)}")
        assert fired.detail == "RESET"
        reboot = await until(events, DomainEventKind.REBOOT, time.monotonic() + 30)
        assert state_report(reboot) == ServerStateReport(SERVER, DomainPower.RUNNING)
        # The guest really armed the device and then stopped feeding it.
        assert MARK_STOPPED in console_text(console)
    finally:
        await driver.close()
        await asyncio.to_thread(daemon.stop)

    log = await SqlEventLog.open(f"sqlite:///{tmp_path}/eventlog.db")
    try:
        await record_fault(log, fired)
        stored = await log.read_stream(server.stream(SERVER))
        facts = [parse(r.type, r.data) for r in stored]
        assert isinstance(facts[-1], ServerWatchdogFired)
        assert (facts[-1].server_id, facts[-1].hostname, facts[-1].action) == (
            SERVER,
            HOST,
            "RESET",
        )
    finally:
        await log.close()
