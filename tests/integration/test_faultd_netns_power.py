"""NetnsPowerDriver on a real network namespace: links cut, every process in it SIGKILLed."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from ha.fencing import FenceTarget, PowerState
from ha.fencing.netns import NetnsPowerDriver, pids_in


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def namespace() -> Iterator[str]:
    name = f"fh-{uuid.uuid4().hex[:8]}"
    outer, inner = f"vo{name[3:]}", f"vi{name[3:]}"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", name)
        _ip("-n", name, "link", "set", inner, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", outer], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def test_power_off_kills_everything_in_the_host_and_cuts_its_links(namespace: str) -> None:
    procs = [subprocess.Popen(["ip", "netns", "exec", namespace, "sleep", "300"]) for _ in range(2)]
    # A grandchild too (as an agent's domains would be): a shell that forks a sleep.
    procs.append(
        subprocess.Popen(["ip", "netns", "exec", namespace, "sh", "-c", "sleep 300 & wait"])
    )
    driver = NetnsPowerDriver(deadline_s=10)
    target = FenceTarget("h1", f"netns://{namespace}")
    try:

        async def scenario() -> None:
            deadline = asyncio.get_running_loop().time() + 10
            while len(pids_in(namespace)) < 4:  # 2 sleeps + sh + its sleep
                assert asyncio.get_running_loop().time() < deadline, pids_in(namespace)
                await asyncio.sleep(0.02)
            assert await driver.answers(target)
            assert await driver.status(target) is PowerState.ON
            result = await driver.power_off(target)
            assert result.confirmed, result
            assert await driver.status(target) is PowerState.OFF
            again = await driver.power_off(target)
            assert again.confirmed  # idempotent

        asyncio.run(scenario())
        for p in procs:
            assert p.wait(10) == -9  # SIGKILLed, not exited
        assert pids_in(namespace) == []
        links = _ip("-n", namespace, "-o", "link", "show")
        assert "state UP" not in links and ",UP" not in links, links
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def test_a_host_without_its_namespace_is_gone(namespace: str) -> None:
    driver = NetnsPowerDriver(deadline_s=2)
    target = FenceTarget("h1", f"netns://{namespace}-gone")

    async def scenario() -> None:
        assert not await driver.answers(target)  # hardware failure: nothing answers
        assert await driver.status(target) is PowerState.UNKNOWN
        result = await driver.power_off(target)
        assert not result.confirmed and "does not exist" in result.reason

    asyncio.run(scenario())
