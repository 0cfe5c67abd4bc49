"""RedfishDriver against a real Redfish endpoint: sushy-tools' emulator (libvirt test driver).

Real HTTP, real resets, real polling of PowerState; the emulator is a separate
process (tests/redfish_server.py), SIGKILLed to make a BMC that no longer answers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ha.fencing import Credentials, FenceTarget, PowerState, default_drivers
from ha.fencing.redfish import RedfishConfig, RedfishDriver
from tests.redfish_server import RedfishBmc

pytestmark = pytest.mark.slow

AUTH = ("fence", "s3cret-pw")


@pytest.fixture(scope="module")
def bmc() -> Iterator[RedfishBmc]:
    with RedfishBmc.start(["cmp-a", "cmp-b", "cmp-c", "cmp-d"]) as b:
        yield b


@pytest.fixture
def driver() -> RedfishDriver:
    return RedfishDriver(RedfishConfig(request_timeout_s=2.0, deadline_s=10.0))


async def test_force_off_is_observed_and_repeatable(bmc: RedfishBmc, driver: RedfishDriver) -> None:
    target = FenceTarget("cmp-a", bmc.endpoint("cmp-a"))
    assert await driver.answers(target)
    assert await driver.status(target) is PowerState.ON
    result = await driver.power_off(target)
    assert result.confirmed and result.method == "redfish", result
    assert "ForceOff" in result.detail
    assert bmc.power_state("cmp-a") == "Off"  # the emulator's own view, read independently
    assert await driver.status(target) is PowerState.OFF
    again = await driver.power_off(target)
    assert again.confirmed and "already Off" in again.detail
    assert bmc.power_state("cmp-b") == "On"  # only the named system was touched


async def test_endpoint_with_a_bare_system_id(bmc: RedfishBmc, driver: RedfishDriver) -> None:
    target = FenceTarget("cmp-b", f"redfish+http://127.0.0.1:{bmc.port}/{bmc.systems['cmp-b']}")
    assert (await driver.power_off(target)).confirmed
    assert bmc.power_state("cmp-b") == "Off"


async def test_unknown_system_is_a_clear_failure(bmc: RedfishBmc, driver: RedfishDriver) -> None:
    target = FenceTarget("ghost", f"redfish+http://127.0.0.1:{bmc.port}/no-such-system")
    assert await driver.answers(target)  # the BMC answers...
    result = await driver.power_off(target)  # ...but there is nothing to power off
    assert not result.confirmed and "HTTP 404" in result.reason, result
    assert await driver.status(target) is PowerState.UNKNOWN


async def test_several_systems_need_a_system_in_the_endpoint(
    bmc: RedfishBmc, driver: RedfishDriver
) -> None:
    result = await driver.power_off(FenceTarget("x", f"redfish+http://127.0.0.1:{bmc.port}"))
    assert not result.confirmed and "4 systems" in result.reason, result
    assert bmc.power_state("cmp-c") == "On"


async def test_the_default_drivers_route_redfish_schemes(bmc: RedfishBmc) -> None:
    drivers = default_drivers()
    d = drivers.for_endpoint(bmc.endpoint("cmp-c"))
    assert d is not None and d.method == "redfish"
    assert drivers.for_endpoint("ipmi://10.0.0.1") is None  # no IPMI driver: self-fence only
    assert drivers.for_endpoint("") is None


async def test_basic_auth_and_a_dead_bmc(driver: RedfishDriver) -> None:
    with RedfishBmc.start(["solo"], auth=AUTH) as bmc:
        good = FenceTarget("solo", bmc.endpoint("solo"), Credentials(*AUTH))
        bad = FenceTarget("solo", bmc.endpoint("solo"), Credentials(AUTH[0], "wrong"))
        refused = await driver.power_off(bad)
        assert not refused.confirmed and "HTTP 401" in refused.reason, refused
        assert bmc.power_state("solo", auth=AUTH) == "On"
        # With no path the BMC's only system is meant.
        only = FenceTarget("solo", f"redfish+http://127.0.0.1:{bmc.port}", Credentials(*AUTH))
        assert await driver.status(only) is PowerState.ON
        assert (await driver.power_off(good)).confirmed
        assert bmc.power_state("solo", auth=AUTH) == "Off"
        bmc.kill()
        assert not await driver.answers(good)
        assert await driver.status(good) is PowerState.UNKNOWN
        dead = await driver.power_off(good)
        assert not dead.confirmed and "ConnectError" in dead.reason, dead
