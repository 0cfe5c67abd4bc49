"""Heartbeat suspicion: the table on a fake clock, the wire, the agent's responder on
loopback UDP, and the fault manager taking a silent host down the lease-loss path.

The fault-manager tests reuse the SQLite rig pieces of tests/unit/test_faultd.py
(`seed`, `Fake`) with a scripted monitor standing in for the UDP one (the real
monitor against real agents in namespaces: tests/integration/test_heartbeat.py).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import pytest

from ha.fencing import Drivers, FenceResult, FenceTarget
from ha.liveness import (
    HEARTBEAT_ANSWER,
    HEARTBEAT_PROBE,
    LivenessRecord,
    answer_datagram,
    parse_heartbeat,
    parse_udp_endpoint,
    probe_datagram,
)
from vim.agent import heartbeat as agent_hb
from vim.domain import host, server
from vim.eventlog.sql import SqlEventLog
from vim.faultd.cli import _parse
from vim.faultd.heartbeat import HeartbeatMonitor, Heartbeats, destination, probe_socket
from vim.faultd.liveness import LocalLiveness
from vim.faultd.service import FaultdConfig, FaultManager
from vim.projections.readmodel import Projector, ReadModel

from .test_faultd import NOW, SERVERS, Fake, Srv, seed, until

# --- the table, on a fake clock ---------------------------------------------------------


def rec(name: str, endpoint: str = "", pid: int = 1) -> LivenessRecord:
    return LivenessRecord(name, pid, "boot", NOW, endpoint or f"udp://10.0.0.{pid}:4700")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Net:
    """Delivers the table's probes to scripted hosts, which answer when `up`."""

    hb: Heartbeats
    clock: Clock
    up: dict[str, bool] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)

    def tick(self) -> None:
        """One interval: evaluate (as the monitor does before probing), probe, answer."""
        if self.hb.evaluate(self.clock.now):
            self.changes.append(f"suspect@{self.clock.now:.1f}")
        for _, datagram in self.hb.probes(self.clock.now):
            parsed = parse_heartbeat(datagram, HEARTBEAT_PROBE)
            assert parsed is not None
            nonce, name = parsed
            if self.up.get(name, False) and self.hb.answered(
                answer_datagram(nonce, name), self.clock.now + 0.001
            ):
                self.changes.append(f"clear@{self.clock.now:.1f}")
        self.clock.now = round(self.clock.now + self.hb.interval_s, 6)

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / self.hb.interval_s)):
            self.tick()


def net(interval: float = 0.2, suspect_after: float = 0.8) -> Net:
    clock = Clock()
    ids = count()
    hb = Heartbeats(interval, suspect_after, nonce=lambda: next(ids).to_bytes(8, "big"))
    return Net(hb, clock)


def test_a_host_that_stops_answering_is_suspected_within_suspect_after_plus_interval() -> None:
    n = net()
    n.hb.set_targets({"a": rec("a"), "b": rec("b", pid=2)})
    n.up = {"a": True, "b": True}
    n.run(2.0)
    assert n.hb.suspected() == {} and n.changes == []
    cut = n.clock.now
    n.up["a"] = False
    n.run(2.0)
    suspected = n.hb.suspected()
    assert list(suspected) == ["a"]  # b keeps answering
    assert cut + 0.8 - 1e-9 <= suspected["a"] <= cut + 0.8 + 0.2 + 1e-9
    assert n.changes == [f"suspect@{suspected['a']:.1f}"]  # reported once, not every tick


def test_an_answer_ends_the_suspicion_at_once() -> None:
    n = net()
    n.hb.set_targets({"a": rec("a")})
    n.up = {"a": True}
    n.run(1.0)
    n.up["a"] = False
    n.run(1.2)
    assert "a" in n.hb.suspected()
    n.up["a"] = True
    n.tick()
    assert n.hb.suspected() == {}
    assert n.changes[-1].startswith("clear@")


def test_a_host_that_never_answered_is_never_suspected() -> None:
    n = net()
    n.hb.set_targets({"a": rec("a")})
    n.run(5.0)  # a firewall, an agent without a responder: the lease decides
    assert n.hb.suspected() == {} and n.hb.last_proof("a") is None


def test_disabled_suspects_nobody() -> None:
    n = net(suspect_after=0)
    assert not n.hb.enabled
    n.hb.set_targets({"a": rec("a")})
    n.up = {"a": True}
    n.run(1.0)
    n.up["a"] = False
    n.run(5.0)
    assert n.hb.suspected() == {}


def test_only_records_with_a_udp_ip_endpoint_are_probed() -> None:
    n = net()
    changed = n.hb.set_targets(
        {
            "udp": rec("udp", "udp://10.0.0.9:4700"),
            "v6": rec("v6", "udp://[fd00::9]:4700"),
            "old": rec("old", "10.0.0.8"),  # an older agent: its management address
            "name": rec("name", "udp://cmp-1.example:4700"),  # no DNS in the loop
            "port0": rec("port0", "udp://10.0.0.7:0"),
            "none": LivenessRecord("none", 1, "b", NOW),
        }
    )
    assert not changed
    assert n.hb.targets() == {"udp", "v6"}
    assert {addr for addr, _ in n.hb.probes(0.0)} == {("10.0.0.9", 4700), ("fd00::9", 4700)}


def test_a_new_record_starts_the_host_afresh_and_a_lost_lease_drops_it() -> None:
    n = net()
    n.hb.set_targets({"a": rec("a")})
    n.up = {"a": True}
    n.run(1.0)
    n.up["a"] = False
    n.run(1.2)
    assert "a" in n.hb.suspected()
    assert n.hb.set_targets({}) is True  # lease gone: the lease's loss takes over
    assert n.hb.suspected() == {}
    n.hb.set_targets({"a": rec("a", pid=7)})  # a new agent: unarmed until it answers
    n.run(3.0)
    assert n.hb.suspected() == {}
    same = rec("a", pid=7)
    n.up["a"] = True
    n.run(0.4)
    assert n.hb.set_targets({"a": same}) is False and n.hb.last_proof("a") is not None


def test_stray_stale_and_forged_answers_prove_nothing() -> None:
    n = net()
    n.hb.set_targets({"a": rec("a"), "b": rec("b", pid=2)})
    sent = [parse_heartbeat(d, HEARTBEAT_PROBE) for _, d in n.hb.probes(0.0)]
    nonce_a = next(p[0] for p in sent if p is not None and p[1] == "a")
    assert not n.hb.answered(answer_datagram(nonce_a, "b"), 0.1)  # b answering a's nonce
    assert not n.hb.answered(answer_datagram(b"\xff" * 8, "a"), 0.1)  # a nonce never sent
    assert not n.hb.answered(probe_datagram(nonce_a, "a"), 0.1)  # a probe, not an answer
    assert not n.hb.answered(b"garbage", 0.1)
    assert n.hb.last_proof("a") is None and n.hb.last_proof("b") is None
    n.hb.answered(answer_datagram(nonce_a, "a"), 0.1)
    assert n.hb.last_proof("a") == 0.0  # the probe's send time, not the arrival
    assert not n.hb.answered(answer_datagram(nonce_a, "a"), 0.2)  # a replay adds nothing


def test_a_stalled_monitor_does_not_suspect_everyone_when_it_wakes() -> None:
    n = net()
    n.hb.set_targets({"a": rec("a")})
    n.up = {"a": True}
    n.run(1.0)
    n.clock.now += 5.0  # the fault manager was stalled: no probes sent meanwhile
    assert not n.hb.evaluate(n.clock.now)
    n.run(1.0)  # probes again; the host answers them
    assert n.hb.suspected() == {}


def test_suspect_after_must_leave_room_for_two_probes() -> None:
    with pytest.raises(ValueError, match="2 intervals"):
        Heartbeats(0.2, 0.3)
    with pytest.raises(ValueError):
        Heartbeats(0, 0.8)
    a = _parse(["--heartbeat-interval", "0.1", "--suspect-after", "0"])
    assert a.suspect_after == 0
    with pytest.raises(SystemExit):
        _parse(["--heartbeat-interval", "0.5", "--suspect-after", "0.8"])


# --- the wire and the agent's side -----------------------------------------------------


def test_wire_round_trip_and_malformed_datagrams() -> None:
    d = probe_datagram(b"12345678", "cmp-1")
    assert parse_heartbeat(d, HEARTBEAT_PROBE) == (b"12345678", "cmp-1")
    assert parse_heartbeat(d, HEARTBEAT_ANSWER) is None
    assert parse_heartbeat(HEARTBEAT_PROBE + b"1234567", HEARTBEAT_PROBE) is None
    assert parse_heartbeat(HEARTBEAT_PROBE + b"12345678", HEARTBEAT_PROBE) is None  # no name
    assert parse_heartbeat(HEARTBEAT_PROBE + b"12345678\xff", HEARTBEAT_PROBE) is None
    assert parse_heartbeat(probe_datagram(b"12345678", "x" * 600), HEARTBEAT_PROBE) is None
    assert parse_udp_endpoint("udp://10.0.0.2:47001") == ("10.0.0.2", 47001)
    assert parse_udp_endpoint("tcp://10.0.0.2:47001") is None


def test_the_agents_listen_address_and_what_it_publishes() -> None:
    assert agent_hb.listen_address("", "10.0.0.2") == "10.0.0.2:0"
    assert agent_hb.listen_address("", "") is None  # nothing to publish: the lease only
    assert agent_hb.listen_address("none", "10.0.0.2") is None
    assert agent_hb.listen_address("0.0.0.0:47001", "10.0.0.2") == "0.0.0.0:47001"
    with pytest.raises(ValueError, match="management-address"):
        agent_hb.listen_address("0.0.0.0:47001", "")
    with pytest.raises(ValueError, match="HOST:PORT"):
        agent_hb.listen_address("10.0.0.2", "")
    assert agent_hb.published_endpoint("0.0.0.0:0", 47001, "10.0.0.2") == "udp://10.0.0.2:47001"
    assert agent_hb.published_endpoint("::1:0", 5, "") == "udp://[::1]:5"


async def test_the_responder_answers_only_for_itself_and_only_while_healthy() -> None:
    healthy = [True]
    responder = await agent_hb.start_responder("cmp-1", "127.0.0.1:0", lambda: healthy[0])
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    try:
        addr = responder.address

        def send(nonce: bytes, name: str) -> None:
            sock.sendto(probe_datagram(nonce, name), addr)

        await asyncio.to_thread(send, b"nonce--1", "cmp-1")
        assert await asyncio.to_thread(sock.recv, 600) == answer_datagram(b"nonce--1", "cmp-1")
        await asyncio.to_thread(send, b"nonce--2", "cmp-2")  # someone else's probe
        await until(lambda: responder.ignored == 1, 5, "the stray probe ignored")
        healthy[0] = False  # e.g. the lease was not renewed within the TTL
        await asyncio.to_thread(send, b"nonce--3", "cmp-1")
        await until(lambda: responder.ignored == 2, 5, "the probe ignored while unhealthy")
        healthy[0] = True
        await asyncio.to_thread(send, b"nonce--4", "cmp-1")
        # Loopback keeps order: the next datagram is nonce 4's answer, none came for 2 or 3.
        assert await asyncio.to_thread(sock.recv, 600) == answer_datagram(b"nonce--4", "cmp-1")
        assert responder.answered == 2
    finally:
        sock.close()
        responder.close()


async def test_an_address_the_agent_cannot_bind_leaves_it_on_the_lease_alone() -> None:
    # 192.0.2.0/24 (TEST-NET-1) is on no interface here: the bind fails, the agent goes on.
    assert await agent_hb.start_for_agent("cmp-1", "192.0.2.1:0", "", lambda: True) == (
        None,
        None,
    )
    responder, published = await agent_hb.start_for_agent(
        "cmp-1", "0.0.0.0:0", "127.0.0.1", lambda: True
    )
    assert responder is not None
    port = responder.address[1]
    responder.close()
    assert published == f"udp://127.0.0.1:{port}"  # a wildcard bind publishes the mgmt address


async def test_the_monitor_probes_real_responders_over_one_socket() -> None:
    """Loopback UDP: answered, then silent (unhealthy), suspected in time, then cleared."""
    healthy = {"a": True, "b": True}
    responders = {
        n: await agent_hb.start_responder(n, "127.0.0.1:0", lambda n=n: healthy[n]) for n in healthy
    }
    monitor = HeartbeatMonitor(0.1, 0.4)
    changes: list[dict[str, float]] = []
    monitor.on_change = lambda: changes.append(monitor.suspected())
    monitor.set_targets(
        {n: rec(n, f"udp://127.0.0.1:{r.address[1]}") for n, r in responders.items()}
    )
    task = asyncio.create_task(monitor.run())
    try:
        await until(lambda: monitor.table.last_proof("a") is not None, 5, "a armed")
        await until(lambda: monitor.table.last_proof("b") is not None, 5, "b armed")
        healthy["a"] = False
        silenced = time.monotonic()
        await until(lambda: "a" in monitor.suspected(), 5, "a suspected")
        assert time.monotonic() - silenced < 0.4 + 0.1 + 0.5  # + slack for a loaded machine
        assert "b" not in monitor.suspected()
        healthy["a"] = True
        await until(lambda: monitor.suspected() == {}, 5, "a answering again")
        assert [list(c) for c in changes] == [["a"], []]
        assert monitor.answers >= 4
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for r in responders.values():
            r.close()
    assert not monitor.running


async def test_one_monitor_socket_probes_ipv4_and_ipv6_agents() -> None:
    """The wildcard bind is dual-stack: an agent answering on ::1 and one on 127.0.0.1
    are both armed through the same socket."""
    responders = {
        "v4": await agent_hb.start_responder("v4", "127.0.0.1:0", lambda: True),
        "v6": await agent_hb.start_responder("v6", "[::1]:0", lambda: True),
    }
    monitor = HeartbeatMonitor(0.1, 0.4)
    monitor.set_targets(
        {
            "v4": rec("v4", f"udp://127.0.0.1:{responders['v4'].address[1]}"),
            "v6": rec("v6", f"udp://[::1]:{responders['v6'].address[1]}"),
        }
    )
    task = asyncio.create_task(monitor.run())
    try:
        await until(lambda: monitor.table.last_proof("v4") is not None, 5, "v4 armed")
        await until(lambda: monitor.table.last_proof("v6") is not None, 5, "v6 armed")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for r in responders.values():
            r.close()


def test_probe_destinations_by_socket_family() -> None:
    assert destination(socket.AF_INET6, ("10.0.0.7", 9)) == ("::ffff:10.0.0.7", 9)
    assert destination(socket.AF_INET6, ("fd00::7", 9)) == ("fd00::7", 9)
    assert destination(socket.AF_INET, ("10.0.0.7", 9)) == ("10.0.0.7", 9)
    assert destination(socket.AF_INET, ("fd00::7", 9)) is None
    v4 = probe_socket(("127.0.0.1", 0))
    assert v4.family == socket.AF_INET
    v4.close()


# --- the fault manager: a silent host takes the lease-loss path ----------------------------


class ScriptedMonitor:
    """Stands in for `HeartbeatMonitor`: the test says who is silent."""

    enabled = True

    def __init__(self) -> None:
        self.on_change: Callable[[], None] = lambda: None
        self.silent: dict[str, float] = {}
        self.targets: dict[str, LivenessRecord] = {}

    def set_targets(self, records: dict[str, LivenessRecord]) -> None:
        self.targets = dict(records)

    def suspected(self) -> dict[str, float]:
        return dict(self.silent)

    async def run(self) -> None:
        await asyncio.Event().wait()

    def go_silent(self, name: str) -> None:
        self.silent[name] = time.monotonic()
        self.on_change()

    def answer(self, name: str) -> None:
        self.silent.pop(name, None)
        self.on_change()


@dataclass
class Gated(Fake):
    """A fake driver whose probe and power-off wait for the test to open their gates."""

    probe_gate: asyncio.Event = field(default_factory=asyncio.Event)
    off_gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def answers(self, target: FenceTarget) -> bool:
        self.calls.append(f"answers {target.hostname}")
        await self.probe_gate.wait()
        return self.answers_oob

    async def power_off(self, target: FenceTarget) -> FenceResult:
        self.calls.append(f"off {target.hostname}")
        await self.off_gate.wait()
        return FenceResult(True, self.method, "observed off")


@dataclass
class HbRig:
    log: SqlEventLog
    model: ReadModel
    liveness: LocalLiveness
    faultd: FaultManager
    driver: Gated
    monitor: ScriptedMonitor

    def host(self, name: str) -> host.Host:
        entry = self.model.get(host.stream(name))
        assert entry is not None
        return entry.state  # type: ignore[no-any-return]

    async def types(self, name: str) -> list[str]:
        return [e.type for e in await self.log.read_stream(host.stream(name))]


HB_HOSTS = {
    "cmp-0": ("z1", "fake://bmc"),
    "cmp-1": ("z1", "fake://bmc"),
    "cmp-2": ("z1", "fake://bmc"),
    "cmp-3": ("z1", "fake://bmc"),
    "selfonly": ("z1", ""),  # no out-of-band driver: self-fencing only
}


@pytest.fixture
async def hb(tmp_path: Path) -> AsyncIterator[HbRig]:
    log = await SqlEventLog.open(f"sqlite:///{tmp_path}/log.db")
    await seed(log, HB_HOSTS, [*SERVERS, Srv("vm-self", "selfonly")], ["g1"])
    projector = Projector(log)
    await projector.catch_up()
    projector.start()
    liveness = LocalLiveness()
    for i, name in enumerate(HB_HOSTS):
        liveness.beat(LivenessRecord(name, i + 1, "boot", NOW, f"udp://10.0.0.{i + 1}:4700"))
    config = FaultdConfig(
        static_token=1,
        lease_ttl_s=0.2,
        self_fence_margin_s=0.3,
        fence_retry_s=0.1,
        reconcile_interval_s=0.1,
        unleased_grace_s=None,
    )
    driver = Gated()
    monitor = ScriptedMonitor()
    faultd = FaultManager(
        log,
        projector.model,
        liveness,
        drivers=Drivers({"fake": driver}),
        config=config,
        heartbeat=monitor,  # type: ignore[arg-type]
    )
    task = asyncio.create_task(faultd.run())
    try:
        await until(lambda: len(monitor.targets) == len(HB_HOSTS), 5, "targets handed over")
        yield HbRig(log, projector.model, liveness, faultd, driver, monitor)
    finally:
        driver.probe_gate.set()
        driver.off_gate.set()
        await faultd.stop()
        await asyncio.wait_for(task, 10)
        await projector.stop()
        await log.close()


async def test_a_silent_host_is_detected_and_fenced_while_its_lease_is_held(hb: HbRig) -> None:
    hb.driver.probe_gate.set()
    hb.driver.off_gate.set()
    hb.monitor.go_silent("cmp-0")
    await until(lambda: hb.host("cmp-0").state is host.HostState.FENCED, 5, "fenced")
    assert hb.liveness._alive.get("cmp-0") is not None  # the lease never went
    assert hb.driver.calls == ["answers cmp-0", "off cmp-0"]
    detected = [
        e.data
        for e in await hb.log.read_stream(host.stream("cmp-0"))
        if e.type == "HostFailureDetected"
    ]
    assert len(detected) == 1 and detected[0]["detail"].startswith("no heartbeat answer")
    assert hb.faultd.stats.heartbeat_suspected == 1
    # Evacuated exactly as after a lease loss (no scheduler here: back to BUILDING).
    await until(lambda: hb.model.get(server.stream("vm-high")).state.host == "", 5, "evacuated")


async def test_answering_again_before_anything_was_recorded_records_nothing(hb: HbRig) -> None:
    hb.monitor.go_silent("cmp-0")
    await until(lambda: hb.driver.calls == ["answers cmp-0"], 5, "the BMC being probed")
    hb.monitor.answer("cmp-0")
    hb.driver.probe_gate.set()
    await until(lambda: "cmp-0" not in hb.faultd._workers, 5, "the worker done")
    assert "HostFailureDetected" not in await hb.types("cmp-0")
    assert hb.host("cmp-0").state is host.HostState.UP
    assert hb.faultd.stats.detected == 0


async def test_answering_again_after_detection_does_not_stop_the_fence(hb: HbRig) -> None:
    hb.driver.probe_gate.set()
    hb.monitor.go_silent("cmp-0")
    await until(lambda: "off cmp-0" in hb.driver.calls, 5, "the power-off under way")
    assert hb.host("cmp-0").state is host.HostState.FAILED
    hb.monitor.answer("cmp-0")  # back before the fence is confirmed: in doubt, go on
    hb.driver.off_gate.set()
    await until(lambda: hb.host("cmp-0").state is host.HostState.FENCED, 5, "fenced anyway")


async def test_a_self_fence_only_host_is_judged_by_its_lease_alone(hb: HbRig) -> None:
    hb.driver.probe_gate.set()
    hb.driver.off_gate.set()
    hb.monitor.go_silent("selfonly")
    hb.monitor.go_silent("cmp-1")
    assert not hb.faultd.alive("cmp-1") and hb.faultd.alive("selfonly")
    await until(lambda: hb.host("cmp-1").state is host.HostState.FENCED, 5, "cmp-1 fenced")
    assert hb.host("selfonly").state is host.HostState.UP
    # Its lease goes: now it is detected, and its self-fence wait counts from that loss.
    hb.liveness.lose("selfonly")
    lost = time.monotonic()
    await until(lambda: hb.host("selfonly").state is host.HostState.FENCED, 5, "self-fenced")
    assert time.monotonic() - lost >= 0.2 + 0.3  # TTL + margin from the lease's loss
    data = {e.type: e.data for e in await hb.log.read_stream(host.stream("selfonly"))}
    assert data["HostFailureDetected"]["detail"].startswith("no out-of-band driver")
