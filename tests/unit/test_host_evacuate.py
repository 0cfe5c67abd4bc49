"""An operator's evacuation request (`vimctl host evacuate`): the domain rule and what the
fault manager decides on it.

The domain half is pure (`host.request_evacuation`, `evacuation.must_evacuate`,
`evacuation_done`, `evacuation_declined`). The fault-manager half runs the loop of
tests/unit/test_faultd.py (SQLite log, in-process liveness, a fake fencing driver,
the real scheduler) with the zone's policy `none`: without a request a fenced host
keeps its servers; with one it is fenced first and then evacuated, and a host whose
agent is alive is never fenced on request.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import pytest

from tests.unit import test_faultd as tf
from vim.domain import evacuation as ev
from vim.domain import host, server
from vim.errors import InvalidTransition, NotFound

NOW = "2026-12-04T12:00:00.000Z"
NONE = {"z1": ev.ZonePolicy(ev.RecoveryPolicy.NONE)}


def registered(state: host.HostState = host.HostState.UP, maintenance: bool = False) -> host.Host:
    spec = host.HostSpec("z1", 8, 32768, 400)
    h = host.evolve(None, host.register(None, "cmp-0", spec, NOW)[0])
    return replace(h, state=state, maintenance=maintenance)


# --- the domain rule ---------------------------------------------------------------------


def test_an_unknown_host_is_not_found() -> None:
    with pytest.raises(NotFound, match="cmp-0"):
        host.request_evacuation(None, "cmp-0", "", False, NOW)


def test_a_running_host_with_a_live_agent_is_refused_with_the_way_out() -> None:
    with pytest.raises(InvalidTransition, match="maintenance enable cmp-0"):
        host.request_evacuation(registered(), "cmp-0", "", True, NOW)
    in_maintenance = registered(host.HostState.MAINTENANCE, maintenance=True)
    with pytest.raises(InvalidTransition, match="being migrated"):
        host.request_evacuation(in_maintenance, "cmp-0", "", True, NOW)


@pytest.mark.parametrize(
    ("state", "alive"),
    [
        (host.HostState.UP, False),  # the lease is gone, not detected yet
        (host.HostState.FAILED, True),  # failed: whatever its lease says now
        (host.HostState.FENCED, True),  # a held (flapping) host
        (host.HostState.FENCED, False),
    ],
)
def test_a_request_is_recorded_once_then_ends(state: host.HostState, alive: bool) -> None:
    h = registered(state)
    events = host.request_evacuation(h, "cmp-0", "psu dead", alive, NOW)
    assert events == [host.HostEvacuationRequested("cmp-0", "psu dead", NOW)]
    pending = host.evolve(h, events[0])
    assert pending.evacuation_requested and pending.evacuation_reason == "psu dead"
    # A second request while one is pending decides nothing, even from a live agent.
    assert host.request_evacuation(pending, "cmp-0", "again", True, NOW) == []
    ended = host.evolve(pending, host.HostEvacuationEnded("cmp-0", "DONE", "", NOW))
    assert not ended.evacuation_requested and ended.evacuation_reason == ""
    assert host.request_evacuation(ended, "cmp-0", "", False, NOW)  # a new one may follow


def test_a_host_back_up_has_no_request_pending() -> None:
    pending = replace(registered(host.HostState.FENCED), evacuation_requested=True)
    up = host.HostStateChanged("cmp-0", "UP", "FENCED", "lease renewed after fence", NOW)
    assert not host.evolve(pending, up).evacuation_requested
    failed = host.HostStateChanged("cmp-0", "FAILED", "UP", "lost", NOW)
    assert host.evolve(pending, failed).evacuation_requested


def test_policy_none_evacuates_only_on_request() -> None:
    fenced = registered(host.HostState.FENCED)
    none = ev.ZonePolicy(ev.RecoveryPolicy.NONE)
    assert not ev.must_evacuate(fenced, none)
    assert ev.must_evacuate(replace(fenced, evacuation_requested=True), none)
    assert ev.must_evacuate(fenced, ev.ZonePolicy(ev.RecoveryPolicy.AUTO))


def test_the_request_ends_done_on_an_empty_fenced_host_and_declined_on_a_live_one() -> None:
    pending = replace(registered(host.HostState.FENCED), evacuation_requested=True)
    flavor = server.FlavorCopy("f1", "m1", 1, 512, 10)
    allocated = server.allocate("vm-1", "t1", "vm-1", flavor, "img-1", [], now=NOW)
    on_host = replace(server.evolve(None, allocated), host="cmp-0")
    assert ev.evacuation_done(pending, [on_host], NOW) == []
    (done,) = ev.evacuation_done(pending, [replace(on_host, host="")], NOW)
    assert isinstance(done, host.HostEvacuationEnded) and done.outcome == "DONE"
    assert ev.evacuation_declined(pending, NOW) == []  # a fenced host is not declined
    up = replace(pending, state=host.HostState.UP)
    (declined,) = ev.evacuation_declined(up, NOW)
    assert isinstance(declined, host.HostEvacuationEnded) and declined.outcome == "DECLINED"
    assert ev.evacuation_done(up, [], NOW) == []  # not fenced: not done


# --- the fault manager's decisions ----------------------------------------------------------

rig = tf.rig  # the loop of tests/unit/test_faultd.py (pytest finds the fixture by this name)


async def request(r: tf.Rig, hostname: str, reason: str = "operator") -> None:
    await tf.append(
        r.log, {host.stream(hostname): [host.HostEvacuationRequested(hostname, reason, NOW)]}
    )


async def ended(r: tf.Rig, hostname: str, within: float = 10) -> list[dict[str, object]]:
    """The HostEvacuationEnded facts on the host's stream, once there is one."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        records = await r.log.read_stream(host.stream(hostname))
        found = [e.data for e in records if e.type == "HostEvacuationEnded"]
        if found:
            return found
        assert asyncio.get_running_loop().time() < deadline, "the request never ended"
        await asyncio.sleep(0.02)


VICTIMS = ["vm-high", "vm-mid", "vm-low"]


@pytest.mark.faultd(zone_policies=NONE)
async def test_policy_none_a_fenced_host_is_evacuated_on_request(rig: tf.Rig) -> None:
    rig.liveness.lose("cmp-0")
    await tf.until(lambda: rig.host("cmp-0").state is host.HostState.FENCED, 5, "fenced")
    await tf.until(lambda: "cmp-0" not in rig.faultd._workers, 5, "worker settled")
    assert rig.server("vm-high").host == "cmp-0"  # policy none: left for an operator
    await request(rig, "cmp-0", "psu dead")
    await tf.until(tf.all_placed(rig, VICTIMS, "cmp-0"), 10, "evacuated and placed")
    records = await rig.log.read_all(after=0, limit=10_000)
    requested = [e.data for e in records if e.type == "ServerEvacuationRequested"]
    assert [e["server_id"] for e in requested] == VICTIMS  # priority order, each once
    assert all("psu dead" in e["reason"] for e in requested)
    assert [e["outcome"] for e in await ended(rig, "cmp-0")] == ["DONE"]
    assert rig.server("vm-high").host == "cmp-3"  # anti-affinity as for any evacuation
    assert Counter(e.type for e in records)["HostFailureDetected"] == 1  # fenced once


@pytest.mark.faultd(zone_policies=NONE, silent=["cmp-0"])
async def test_a_host_without_a_lease_is_fenced_first_then_evacuated(rig: tf.Rig) -> None:
    # cmp-0 never shows a lease and no grace is configured: nothing suspects it...
    assert rig.host("cmp-0").state is host.HostState.UP
    await request(rig, "cmp-0", "rack gone")  # ...until an operator says it is gone
    await tf.until(tf.all_placed(rig, VICTIMS, "cmp-0"), 10, "evacuated and placed")
    assert rig.driver.calls == ["answers cmp-0", "off cmp-0"]  # the usual fencing path
    types = [t for t in await rig.types(host.stream("cmp-0")) if t.startswith("HostFa")]
    assert types == ["HostFailureDetected"]
    records = await rig.log.read_stream(host.stream("cmp-0"))
    facts = [e.type for e in records if e.type != "HostResourcesClaimed"]
    fenced_at = facts.index("HostFenceConfirmed")
    assert fenced_at < facts.index("HostResourcesReleased")  # fenced before anything moved
    (detected,) = [e.data for e in records if e.type == "HostFailureDetected"]
    assert "operator (rack gone)" in detected["detail"]
    assert [e["outcome"] for e in await ended(rig, "cmp-0")] == ["DONE"]
    assert rig.host("cmp-0").state is host.HostState.FENCED


@pytest.mark.faultd(zone_policies=NONE)
async def test_a_host_whose_agent_is_alive_is_never_fenced_on_request(rig: tf.Rig) -> None:
    await request(rig, "cmp-0")  # recorded behind the API's back (it would refuse)
    assert [e["outcome"] for e in await ended(rig, "cmp-0")] == ["DECLINED"]
    assert rig.host("cmp-0").state is host.HostState.UP
    assert rig.driver.calls == []
    assert rig.server("vm-high").host == "cmp-0"
