"""Driver events -> the agent's reports: libvirt codes mapped, real test-driver events reported."""

from __future__ import annotations

import asyncio
from pathlib import Path

import libvirt
import pytest

from vim.agent.drivers import DomainEvent, DomainEventKind, DomainPower, DomainSpec
from vim.agent.libvirt_driver import LibvirtDriver, lifecycle_event, power_of_state
from vim.agent.reports import (
    ServerFaultReport,
    ServerStateReport,
    fault_report,
    state_report,
)
from vim.harness.testnode import write_test_node

P = DomainPower
K = DomainEventKind


@pytest.mark.parametrize(
    ("event", "detail", "power"),
    [
        ("STARTED", "BOOTED", P.RUNNING),
        ("STARTED", "RESTORED", P.RUNNING),
        ("SUSPENDED", "PAUSED", P.PAUSED),
        ("RESUMED", "UNPAUSED", P.RUNNING),
        ("STOPPED", "DESTROYED", P.SHUTDOWN),
        ("STOPPED", "SHUTDOWN", P.SHUTDOWN),
        ("STOPPED", "SAVED", P.SUSPENDED),
        ("STOPPED", "CRASHED", P.CRASHED),
        ("STOPPED", "FAILED", P.CRASHED),
        ("CRASHED", "PANICKED", P.CRASHED),
        ("DEFINED", "ADDED", None),
        ("UNDEFINED", "REMOVED", None),
    ],
)
def test_lifecycle_codes(event: str, detail: str, power: DomainPower | None) -> None:
    code = getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}")
    detail_code = getattr(libvirt, f"VIR_DOMAIN_EVENT_{event}_{detail}")
    expected = DomainEvent(K.LIFECYCLE, "s1", power, f"{event}:{detail}")
    assert lifecycle_event("s1", code, detail_code) == expected


def test_states() -> None:
    assert power_of_state(libvirt.VIR_DOMAIN_RUNNING, 1, False) == (P.RUNNING, "RUNNING:BOOTED")
    assert power_of_state(libvirt.VIR_DOMAIN_SHUTOFF, 0, True)[0] == P.SUSPENDED
    crashed = power_of_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, False)
    assert crashed[0] == P.CRASHED
    assert power_of_state(libvirt.VIR_DOMAIN_PAUSED, 1, False)[0] == P.PAUSED


def test_reports_of_each_kind() -> None:
    watchdog = DomainEvent(K.WATCHDOG, "s1", None, "RESET")
    assert fault_report(watchdog) == ServerFaultReport("s1", True, "RESET")
    assert state_report(watchdog) is None
    crash = DomainEvent(K.LIFECYCLE, "s1", P.CRASHED, "STOPPED:FAILED")
    assert fault_report(crash) == ServerFaultReport("s1", False, "STOPPED:FAILED")
    assert state_report(crash) == ServerStateReport("s1", P.CRASHED, "STOPPED:FAILED")
    assert state_report(DomainEvent(K.REBOOT, "s1", P.RUNNING)) == ServerStateReport(
        "s1", P.RUNNING
    )
    defined = DomainEvent(K.LIFECYCLE, "s1", None, "DEFINED:ADDED")
    assert fault_report(defined) is None and state_report(defined) is None
    lost = DomainEvent(K.CONNECTION_LOST, "", None, "eof")
    assert fault_report(lost) is None and state_report(lost) is None
    long = DomainEvent(K.WATCHDOG, "s1", None, "x" * 1000)
    report = fault_report(long)
    assert report is not None and len(report.detail) == 255


async def test_real_driver_events_become_state_reports(tmp_path: Path) -> None:
    driver = LibvirtDriver(write_test_node(tmp_path / "node.xml"), tmp_path / "state")
    await driver.connect()
    try:
        events = driver.events()
        spec = DomainSpec("s1", "one", 1, 64, 0)
        for power in (P.RUNNING, P.PAUSED, P.RUNNING, P.SHUTDOWN):
            await driver.ensure_domain(spec, power)
        reports: list[ServerStateReport] = []
        while len(reports) < 4:
            ev = await asyncio.wait_for(anext(events), 10)
            report = state_report(ev)
            assert fault_report(ev) is None
            if report is not None:
                reports.append(report)
        assert [r.power for r in reports] == [P.RUNNING, P.PAUSED, P.RUNNING, P.SHUTDOWN]
    finally:
        await driver.close()
