"""LibvirtDriver against per-test libvirt `test:///ABS/node.xml` nodes (no daemon, real libvirt)."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from vim.agent.domain_xml import read_metadata, spec_hash
from vim.agent.drivers import (
    DomainEvent,
    DomainEventKind,
    DomainPower,
    DomainSpec,
    NicSpec,
    WatchdogAction,
)
from vim.agent.errors import HypervisorError, HypervisorUnavailable, InvalidDomainSpec
from vim.agent.libvirt_driver import LibvirtDriver
from vim.errors import InvalidInput, NotFound
from vim.harness.testnode import write_test_node

P = DomainPower
POWERS = [P.RUNNING, P.PAUSED, P.SUSPENDED, P.SHUTDOWN]
EVENT_TIMEOUT = 10.0


def spec(server_id: str = "s1", **kw: object) -> DomainSpec:
    base: dict[str, object] = {
        "server_id": server_id,
        "name": f"name-{server_id}",
        "vcpus": 1,
        "ram_mb": 128,
        "disk_gb": 1,
        "nics": (NicSpec(f"port-{server_id}", "net-1", "52:54:00:00:00:01"),),
        "watchdog": WatchdogAction.RESET,
    }
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[LibvirtDriver]:
    uri = write_test_node(
        tmp_path / "node.xml", cpus=8, memory_mib=16384, foreign_domains=("other",)
    )
    d = LibvirtDriver(uri, tmp_path / "state")
    await d.connect()
    yield d
    await d.close()


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def write(path: Path, text: str) -> None:
    path.write_text(text)


def exists(path: Path) -> bool:
    return path.exists()


async def running_names(d: LibvirtDriver) -> list[str]:
    """Every running domain of the node, ours or not (peeks at the driver's connection)."""
    conn = d._connection()
    return sorted(dom.name() for dom in conn.listAllDomains(0) if dom.isActive())


async def next_event(
    it: AsyncIterator[DomainEvent], pred: Callable[[DomainEvent], bool]
) -> DomainEvent:
    """The first event matching ``pred`` within EVENT_TIMEOUT (others are skipped)."""

    async def scan() -> DomainEvent:
        async for ev in it:
            if pred(ev):
                return ev
        raise AssertionError("event stream ended")

    return await asyncio.wait_for(scan(), EVENT_TIMEOUT)


async def test_node_capacity_comes_from_the_node_file(driver: LibvirtDriver) -> None:
    assert await driver.node_capacity() == (8, 16384)


async def test_ensure_twice_is_one_domain_and_foreign_domains_are_ignored(
    driver: LibvirtDriver,
) -> None:
    first = await driver.ensure_domain(spec(), P.RUNNING)
    second = await driver.ensure_domain(spec(), P.RUNNING)
    assert first.power == second.power == P.RUNNING
    listed = await driver.list_domains()
    assert [(s.server_id, s.power) for s in listed] == [("s1", P.RUNNING)]
    assert await running_names(driver) == ["other", "vim-s1"]  # 'other' exists, unlisted


@pytest.mark.parametrize(("start", "target"), list(itertools.product(POWERS, POWERS)))
async def test_every_power_transition(
    driver: LibvirtDriver, start: DomainPower, target: DomainPower
) -> None:
    assert (await driver.ensure_domain(spec(), start)).power == start
    status = await driver.ensure_domain(spec(), target)
    assert status.power == target
    assert [(s.server_id, s.power) for s in await driver.list_domains()] == [("s1", target)]


async def test_lifecycle_events_arrive_in_order(driver: LibvirtDriver) -> None:
    events = driver.events()
    await driver.ensure_domain(spec(), P.RUNNING)
    await driver.ensure_domain(spec(), P.PAUSED)
    await driver.ensure_domain(spec(), P.RUNNING)
    await driver.ensure_domain(spec(), P.SUSPENDED)
    await driver.ensure_domain(spec(), P.SHUTDOWN)
    await driver.remove_domain("s1")
    seen: list[tuple[DomainPower | None, str]] = []
    while not seen or seen[-1][1] != "UNDEFINED:REMOVED":
        ev = await next_event(events, lambda e: e.kind == DomainEventKind.LIFECYCLE)
        assert ev.server_id == "s1"
        seen.append((ev.power, ev.detail))
    assert seen == [
        (None, "DEFINED:ADDED"),
        (P.RUNNING, "STARTED:BOOTED"),
        (P.PAUSED, "SUSPENDED:PAUSED"),
        (P.RUNNING, "RESUMED:UNPAUSED"),
        (P.SUSPENDED, "STOPPED:SAVED"),
        # SHUTDOWN from SUSPENDED only drops the save image: no lifecycle event
        (None, "UNDEFINED:REMOVED"),
    ]


async def test_two_drivers_in_one_process_have_separate_nodes_and_events(
    tmp_path: Path, driver: LibvirtDriver
) -> None:
    other = LibvirtDriver(write_test_node(tmp_path / "n2.xml", cpus=2), tmp_path / "st2")
    await other.connect()
    try:
        mine, theirs = driver.events(), other.events()
        await other.ensure_domain(spec("t1"), P.RUNNING)
        await driver.ensure_domain(spec("s1"), P.RUNNING)
        assert [s.server_id for s in await driver.list_domains()] == ["s1"]
        assert [s.server_id for s in await other.list_domains()] == ["t1"]
        assert (await next_event(theirs, lambda e: e.power == P.RUNNING)).server_id == "t1"
        assert (await next_event(mine, lambda e: e.power == P.RUNNING)).server_id == "s1"
    finally:
        await other.close()


async def test_a_changed_spec_is_redefined_only_when_shut_off(driver: LibvirtDriver) -> None:
    await driver.ensure_domain(spec(ram_mb=128), P.RUNNING)
    bigger = spec(ram_mb=256)
    status = await driver.ensure_domain(bigger, P.RUNNING)
    assert status.power == P.RUNNING and "spec changed" in status.reason
    running = ET.fromstring(await driver.describe("s1"))
    assert running.findtext("memory") == str(128 * 1024)
    status = await driver.ensure_domain(bigger, P.SHUTDOWN)  # stopped now, not yet redefined
    status = await driver.ensure_domain(bigger, P.RUNNING)
    assert status.power == P.RUNNING and "spec changed" not in status.reason
    xml = await driver.describe("s1")
    assert ET.fromstring(xml).findtext("memory") == str(256 * 1024)
    stored = read_metadata(xml)
    assert stored is not None and stored.spec_hash == spec_hash(bigger)
    assert len(await driver.list_domains()) == 1


async def test_remove_twice_is_fine_and_deletes_files(driver: LibvirtDriver) -> None:
    await driver.ensure_domain(spec(), P.RUNNING)
    console = Path(driver.paths("s1").console_log)
    write(console, "boot\n")
    await driver.remove_domain("s1")
    await driver.remove_domain("s1")
    await driver.remove_domain("never-existed")
    assert await driver.list_domains() == []
    assert not exists(console)
    with pytest.raises(NotFound):
        await driver.describe("s1")


async def test_destroy_all_counts_running_domains_and_spares_foreign_ones(
    driver: LibvirtDriver,
) -> None:
    await driver.ensure_domain(spec("a"), P.RUNNING)
    await driver.ensure_domain(spec("b"), P.PAUSED)
    await driver.ensure_domain(spec("c"), P.SHUTDOWN)
    assert await driver.destroy_all() == 2
    assert {s.server_id: s.power for s in await driver.list_domains()} == {
        "a": P.SHUTDOWN,
        "b": P.SHUTDOWN,
        "c": P.SHUTDOWN,
    }
    assert await running_names(driver) == ["other"]
    assert await driver.destroy_all() == 0


async def test_image_gets_a_qcow2_overlay_removed_with_the_domain(
    driver: LibvirtDriver, tmp_path: Path
) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "16M")
    s = spec(image_path=str(base), disk_gb=1)
    await driver.ensure_domain(s, P.RUNNING)
    overlay = Path(driver.paths("s1").overlay_disk)
    info = json.loads(qemu_img("info", "-U", "--output=json", str(overlay)))
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base)
    assert info["virtual-size"] == 1024**3
    source = ET.fromstring(await driver.describe("s1")).find("devices/disk/source")
    assert source is not None and source.get("file") == str(overlay)
    await driver.ensure_domain(s, P.RUNNING)  # idempotent: the overlay is kept
    await driver.remove_domain("s1")
    assert not exists(overlay)
    with pytest.raises(HypervisorError, match="not found"):
        await driver.ensure_domain(
            spec("s2", image_path=str(tmp_path / "missing.qcow2")), P.RUNNING
        )


async def test_bad_input_is_refused_before_libvirt(driver: LibvirtDriver) -> None:
    with pytest.raises(InvalidDomainSpec) as err:
        await driver.ensure_domain(spec(server_id="bad/id", vcpus=0, nics=()), P.RUNNING)
    assert {v.field for v in err.value.violations} == {"server_id", "vcpus"}
    with pytest.raises(InvalidInput):
        await driver.ensure_domain(spec(), P.CRASHED)
    assert await driver.list_domains() == []


async def test_reboot(driver: LibvirtDriver) -> None:
    with pytest.raises(NotFound):
        await driver.reboot_domain("s1")
    await driver.ensure_domain(spec(), P.SHUTDOWN)
    with pytest.raises(HypervisorError):
        await driver.reboot_domain("s1")
    await driver.ensure_domain(spec(), P.RUNNING)
    await driver.reboot_domain("s1")
    assert [s.power for s in await driver.list_domains()] == [P.RUNNING]


async def test_not_connected_and_closed_drivers_are_unavailable(tmp_path: Path) -> None:
    d = LibvirtDriver(write_test_node(tmp_path / "n.xml"), tmp_path / "st")
    with pytest.raises(HypervisorUnavailable):
        await d.list_domains()
    await d.connect()
    await d.connect()  # alive: a no-op
    events = d.events()
    await d.close()
    with pytest.raises(StopAsyncIteration):
        await events.__anext__()
    with pytest.raises(HypervisorUnavailable):
        await d.ensure_domain(spec(), P.RUNNING)
    with pytest.raises(HypervisorUnavailable):
        await d.destroy_all()
    await d.close()  # idempotent


async def test_an_unreachable_daemon_is_unavailable(tmp_path: Path) -> None:
    d = LibvirtDriver(f"qemu+unix:///system?socket={tmp_path}/none.sock", tmp_path / "st")
    try:
        with pytest.raises(HypervisorUnavailable, match="cannot connect"):
            await d.connect()
    finally:
        await d.close()
