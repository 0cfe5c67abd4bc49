"""Fencing pieces that need no BMC: endpoint parsing, driver routing, self-fence confirmation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from ha.fencing import Credentials, FencingUnsupported, default_drivers
from ha.fencing.netns import namespace_of
from ha.fencing.redfish import parse_endpoint
from ha.fencing.selffence import METHOD, SelfFencePolicy, SelfFenceTimeout

T0 = datetime(2030, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("endpoint", "base", "path"),
    [
        (
            "redfish://bmc.example/redfish/v1/Systems/1",
            "https://bmc.example",
            "/redfish/v1/Systems/1",
        ),
        ("redfish+https://10.0.0.9:8443/abc", "https://10.0.0.9:8443", "/redfish/v1/Systems/abc"),
        ("redfish+http://127.0.0.1:8000/", "http://127.0.0.1:8000", ""),
    ],
)
def test_redfish_endpoints(endpoint: str, base: str, path: str) -> None:
    where = parse_endpoint(endpoint)
    assert (where.base, where.system_path) == (base, path)


@pytest.mark.parametrize("endpoint", ["ipmi://10.0.0.1", "http://10.0.0.1/x", "redfish://"])
def test_not_redfish(endpoint: str) -> None:
    with pytest.raises(FencingUnsupported):
        parse_endpoint(endpoint)


def test_netns_endpoints() -> None:
    assert namespace_of("netns://host-a") == "host-a"
    for bad in ("netns://", "netns://../etc", "redfish://x"):
        with pytest.raises(FencingUnsupported):
            namespace_of(bad)


def test_drivers_by_scheme() -> None:
    d = default_drivers()
    assert {"redfish", "redfish+http", "redfish+https", "netns"} <= d.schemes
    netns = d.for_endpoint("netns://h1")
    assert netns is not None and netns.method == "netns-power"
    assert d.for_endpoint("ipmi://10.0.0.1") is None


def test_credentials_never_print_the_password() -> None:
    assert "hunter2" not in repr(Credentials("root", "hunter2"))


def test_self_fence_policy_is_ttl_plus_margin_or_a_report() -> None:
    p = SelfFencePolicy(ttl_s=2, margin_s=3)
    assert p.due(T0) == T0 + timedelta(seconds=5)
    assert not p.confirmed(T0, T0 + timedelta(seconds=4.9), self_fenced=False)
    assert p.confirmed(T0, T0 + timedelta(seconds=5), self_fenced=False)
    assert p.confirmed(T0, T0 + timedelta(seconds=1), self_fenced=True)


class FakeClock:
    """Wall time that moves only when the waiter sleeps (asyncio.sleep is real but 0)."""

    def __init__(self) -> None:
        self.now = T0
        self.reads = 0

    def __call__(self) -> datetime:
        self.reads += 1
        self.now += timedelta(seconds=0.5)
        return self.now


async def test_self_fence_timeout_waits_for_the_deadline() -> None:
    clock = FakeClock()
    waiter = SelfFenceTimeout(SelfFencePolicy(2, 3), clock=clock, poll_interval_s=0)
    result = await asyncio.wait_for(waiter.confirm("cmp-1", T0, lambda: False), 5)
    assert result.confirmed and result.method == METHOD
    assert clock.now >= T0 + timedelta(seconds=5) and "TTL" in result.detail
    assert clock.reads == 10  # polled until the deadline, not confirmed earlier


async def test_self_fence_report_confirms_early() -> None:
    clock = FakeClock()
    waiter = SelfFenceTimeout(SelfFencePolicy(2, 3), clock=clock, poll_interval_s=0)
    reports = iter([False, False, True])
    result = await asyncio.wait_for(waiter.confirm("cmp-1", T0, lambda: next(reports)), 5)
    assert result.confirmed and "HostSelfFenced" in result.detail
    assert clock.now < T0 + timedelta(seconds=5)
