"""Supervision of a real ovs-vswitchd: SIGKILL it, the supervisor restarts it and reports.

The reports go through the real Agents API (an in-process node on SQLite) with
the host's agent token, exactly as `vim-agent --supervise` sends them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ha.election.base import Leadership
from tests.e2e.test_agents_api import AUTH, SECRET
from vim._gen.vim.v1 import hosts_pb2
from vim.agent.apiclient import AgentApi
from vim.agent.supervisor import SupervisedService, Supervisor, process_alive, read_pid
from vim.alarms.reactor import AlarmReactor
from vim.api.server import ApiConfig, ApiNode
from vim.domain import alarm
from vim.harness.ovs import OvsSwitch

pytestmark = pytest.mark.slow


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
    yield n
    await n.stop()


def vswitchd_service(ovs: OvsSwitch) -> SupervisedService:
    d = ovs.base_dir
    return SupervisedService(
        name="ovs-vswitchd",
        pidfile=d / "ovs-vswitchd.pid",
        start=(
            "env",
            f"OVS_RUNDIR={d}",
            f"OVS_DBDIR={d}",
            f"OVS_LOGDIR={d}",
            "ovs-vswitchd",
            ovs.db_url,
            f"--pidfile={d / 'ovs-vswitchd.pid'}",
            f"--unixctl={ovs.vswitchd_ctl}",
            "-vconsole:off",
            f"--log-file={ovs.vswitchd_log}",
            "--detach",
        ),
        probe=("ovs-appctl", "-t", str(ovs.vswitchd_ctl), "--timeout=1", "version"),
    )


async def test_a_killed_vswitchd_is_restarted_and_reported(node: ApiNode, tmp_path: Path) -> None:
    await _kill_and_watch_recovery(node, tmp_path)


async def test_a_hung_vswitchd_is_killed_and_restarted(node: ApiNode, tmp_path: Path) -> None:
    await _kill_and_watch_recovery(node, tmp_path, hang=True)


async def test_the_facts_raise_then_clear_an_alarm(node: ApiNode, tmp_path: Path) -> None:
    """The fault manager's alarm reactor (run here in-process, as its leader) turns the
    supervisor's facts into an alarm on the host, raised and then cleared."""
    assert node.node is not None
    term = Leadership("fault_manager", "test", 1, datetime.now(UTC), 0, 2.0, "local")
    reactor = AlarmReactor(node.node.log, node.node.model, lambda: term)
    task = asyncio.create_task(reactor.run())
    try:
        killed = await _kill_and_watch_recovery(node, tmp_path)
        model = node.node.model
        deadline = time.monotonic() + 20
        found: list[Any] = []
        while time.monotonic() < deadline:
            found = [
                e.state
                for _, e in model.of_kind(alarm.KIND)
                if e.state.managed_object_id == "cmp-1" and "ovs-vswitchd" in e.state.cause
            ]
            if found and found[0].state is alarm.AlarmState.CLEARED:
                break
            await asyncio.sleep(0.05)
        print(f"alarm raised and cleared {time.monotonic() - killed:.2f}s after the SIGKILL")
        assert len(found) == 1, found
        raised = found[0]
        assert raised.state is alarm.AlarmState.CLEARED
        assert raised.raised_at and raised.cleared_at >= raised.raised_at
    finally:
        await reactor.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


async def _kill_and_watch_recovery(node: ApiNode, tmp_path: Path, *, hang: bool = False) -> float:
    """SIGKILL (or SIGSTOP: `hang`) a supervised ovs-vswitchd; assert failed-then-recovered;
    returns when it was killed. A hung daemon still holds its pidfile: the supervisor must
    kill it before starting a new one, which would otherwise refuse to start."""
    api = AgentApi([node.address], "cmp-1", AUTH.mint_agent("cmp-1"))
    await api.register(
        zone="z1",
        vcpus=4,
        ram_mb=4096,
        disk_gb=10,
        management_address="127.0.0.1",
        hypervisor_type=hosts_pb2.HYPERVISOR_TYPE_TEST,
    )
    ovs = OvsSwitch.start(base_dir=tmp_path / "ovs")
    service = vswitchd_service(ovs)
    recovered: list[str] = []
    supervisor = Supervisor([service], api, interval_s=0.1, on_recovered=recovered.append)
    task = asyncio.create_task(supervisor.run())
    assert node.node is not None
    log = node.node.log
    try:
        first = read_pid(service.pidfile)
        assert first is not None and process_alive(first)
        if hang:
            os.kill(first, signal.SIGSTOP)
        else:
            ovs.kill_vswitchd()
        killed = time.monotonic()
        deadline = killed + 20
        types: list[str] = []
        while time.monotonic() < deadline:
            types = [e.type for e in await log.read_stream("host-cmp-1")]
            if "HostServiceRecovered" in types:
                break
            await asyncio.sleep(0.05)
        took = time.monotonic() - killed
        print(f"ovs-vswitchd failed and recovered, both recorded, in {took:.2f}s")
        assert types[-2:] == ["HostServiceFailed", "HostServiceRecovered"], types
        events = await log.read_stream("host-cmp-1")
        assert events[-2].data["service"] == "ovs-vswitchd"
        assert ("probe" if hang else "gone") in events[-2].data["detail"]
        assert events[-1].data["restarts"] == 1
        assert recovered == ["ovs-vswitchd"]
        second = read_pid(service.pidfile)
        assert second is not None and second != first and process_alive(second)
        assert await supervisor.healthy(service) == (True, "")  # the probe answers too
        assert supervisor.states["ovs-vswitchd"].healthy
        return killed
    finally:
        await supervisor.stop()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()
        pid = read_pid(service.pidfile)
        if pid is not None and process_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        ovs.stop()


def test_process_alive_sees_zombies_as_dead() -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] == "Z":
            break
        time.sleep(0.01)
    try:
        assert not process_alive(child.pid)  # exited, not yet reaped: a zombie
    finally:
        child.wait()
    assert not process_alive(child.pid)
    assert process_alive(os.getpid())
