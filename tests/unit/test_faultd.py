"""The fault manager's loop on a SQLite log with in-process liveness and a fake fencing driver.

The fake driver stands behind the `FencingDriver` interface (the real ones are
tested against a real Redfish emulator and real namespaces in tests/integration).
A real `SchedulerService` places the evacuated servers. The helpers here
(`seed`, `Fake`) are reused by the integration tests.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ha.fencing import Drivers, FenceResult, FenceTarget, PowerState
from ha.liveness import LivenessRecord
from vim.domain import affinity, host, server
from vim.domain import evacuation as ev
from vim.domain.base import DomainEvent
from vim.domain.faults import HostSelfFenced
from vim.domain.reservation import parse_time, rfc3339
from vim.eventlog.model import ANY_VERSION, AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import EventLog
from vim.faultd.liveness import LocalLiveness
from vim.faultd.service import FaultdConfig, FaultManager
from vim.projections.readmodel import Projector, ReadModel, replay
from vim.scheduler.service import SchedulerConfig, SchedulerService

NOW = "2020-01-01T00:00:00.000Z"
SEED = Metadata(actor="test-seed")


# --- seeding (shared with tests/integration/test_faultd.py) ---------------------------


@dataclass(frozen=True)
class Srv:
    sid: str
    on: str
    priority: int = 0
    group: str = ""
    live: bool = True
    max_ms: int = 0

    @property
    def mac(self) -> str:
        n = sum(ord(c) for c in self.sid) % 250
        return f"fa:16:3e:00:{len(self.sid):02x}:{n:02x}"

    @property
    def ip(self) -> str:
        return f"10.1.{len(self.sid)}.{sum(ord(c) for c in self.sid) % 250}"


async def append(log: EventLog, streams: dict[str, Sequence[DomainEvent]]) -> None:
    await log.append(
        AppendRequest(
            streams=[
                StreamAppend(sid, ANY_VERSION, [NewEvent(e.type, e.to_data()) for e in evs])
                for sid, evs in streams.items()
            ],
            metadata=SEED,
        )
    )


async def seed(
    log: EventLog,
    hosts: dict[str, tuple[str, str]],
    servers: Sequence[Srv],
    anti_affinity: Sequence[str] = (),
    vcpus: int = 8,
) -> None:
    """Hosts (name -> (zone, bmc endpoint)), anti-affinity groups, ACTIVE servers placed."""
    states: dict[str, host.Host] = {}
    for name, (zone, bmc) in hosts.items():
        spec = host.HostSpec(zone, vcpus, 32768, 400, 1.0, bmc_endpoint=bmc)
        events = host.register(None, name, spec, NOW)
        states[name] = host.evolve(None, events[0])
        await append(log, {host.stream(name): events})
    for gid in anti_affinity:
        created = affinity.create(
            gid, "t1", gid, affinity.Policy.ANTI_AFFINITY, affinity.Scope.HOST, NOW
        )
        members = [affinity.AffinityMemberAdded(gid, s.sid) for s in servers if s.group == gid]
        await append(log, {affinity.stream(gid): [created, *members]})
    for s in servers:
        nic = server.Nic(f"port-{s.sid}", "net-1", s.mac, (s.ip,))
        flavor = server.FlavorCopy("f1", "m1", 1, 512, 10)
        allocated = server.allocate(
            s.sid,
            "t1",
            f"name-{s.sid}",
            flavor,
            "img-1",
            [nic],
            now=NOW,
            affinity_group_id=s.group,
            metadata={"vnf": "upf", "sid": s.sid},
            priority=s.priority,
            watchdog=server.Watchdog.RESET,
            live_migration_allowed=s.live,
            max_interruption_ms=s.max_ms,
        )
        state = server.evolve(None, allocated)
        scheduled = server.schedule(state, s.on, hosts[s.on][0], NOW)
        active = server.ServerStateReported(s.sid, s.on, "ACTIVE", "RUNNING", reported_at=NOW)
        claim = host.claim(states[s.on], s.sid, 1, 512, 10)
        states[s.on] = host.evolve(states[s.on], claim)
        await append(
            log,
            {server.stream(s.sid): [allocated, scheduled, active], host.stream(s.on): [claim]},
        )


# --- a fake driver ---------------------------------------------------------------------


@dataclass
class Fake:
    """A fencing driver with scripted answers; records what it was asked."""

    answers_oob: bool = True
    confirm: bool = True
    calls: list[str] = field(default_factory=list)
    method: str = "fake"

    async def answers(self, target: FenceTarget) -> bool:
        self.calls.append(f"answers {target.hostname}")
        return self.answers_oob

    async def status(self, target: FenceTarget) -> PowerState:
        return PowerState.UNKNOWN

    async def power_off(self, target: FenceTarget) -> FenceResult:
        self.calls.append(f"off {target.hostname}")
        if self.confirm:
            return FenceResult(True, self.method, "observed off")
        return FenceResult(False, self.method, reason="BMC said no")


# --- the rig ---------------------------------------------------------------------------


@dataclass
class Rig:
    log: SqlEventLog
    model: ReadModel
    liveness: LocalLiveness
    faultd: FaultManager
    driver: Fake

    def host(self, name: str) -> host.Host:
        entry = self.model.get(host.stream(name))
        assert entry is not None
        return entry.state  # type: ignore[no-any-return]

    def server(self, sid: str) -> server.Server:
        entry = self.model.get(server.stream(sid))
        assert entry is not None
        return entry.state  # type: ignore[no-any-return]

    async def types(self, stream_id: str) -> list[str]:
        return [e.type for e in await self.log.read_stream(stream_id)]


async def until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


HOSTS = {f"cmp-{i}": ("z1", "fake://bmc") for i in range(4)}
SERVERS = [
    Srv("vm-low", "cmp-0", 0),
    Srv("vm-high", "cmp-0", 100, "g1"),
    Srv("vm-mid", "cmp-0", 10),
    Srv("g1-b", "cmp-1", 0, "g1"),
    Srv("g1-c", "cmp-2", 0, "g1"),
]


@pytest.fixture
async def rig(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    marker = request.node.get_closest_marker("faultd")
    kw = dict(marker.kwargs) if marker else {}
    driver = Fake(**kw.pop("driver", {}))
    servers = kw.pop("servers", SERVERS)
    hosts = kw.pop("hosts", HOSTS)
    silent = set(kw.pop("silent", ()))
    log = await SqlEventLog.open(f"sqlite:///{tmp_path}/log.db")
    await seed(log, hosts, servers, ["g1"])
    projector = Projector(log)
    await projector.catch_up()
    projector.start()
    liveness = LocalLiveness()
    for name in set(hosts) - silent:
        liveness.beat(LivenessRecord(name, 1, "boot", NOW))
    defaults = {
        "lease_ttl_s": 0.2,
        "self_fence_margin_s": 0.3,
        "fence_retry_s": 0.1,
        "reconcile_interval_s": 0.1,
        "unleased_grace_s": None,
    }
    config = FaultdConfig(static_token=1, **{**defaults, **kw})
    faultd = FaultManager(
        log, projector.model, liveness, drivers=Drivers({"fake": driver}), config=config
    )
    sched = SchedulerService(
        log, projector.model, config=SchedulerConfig(static_token=1, idle_wait_s=0.1)
    )
    tasks = [asyncio.create_task(faultd.run()), asyncio.create_task(sched.run())]
    try:
        yield Rig(log, projector.model, liveness, faultd, driver)
    finally:
        await faultd.stop()
        await sched.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await projector.stop()
        await log.close()


def all_placed(r: Rig, sids: Sequence[str], away_from: str) -> Callable[[], bool]:
    def check() -> bool:
        return all(r.server(s).host not in ("", away_from) for s in sids)

    return check


async def test_a_lost_lease_is_detected_fenced_and_evacuated(rig: Rig) -> None:
    rig.liveness.lose("cmp-0")
    victims = ["vm-low", "vm-high", "vm-mid"]
    await until(all_placed(rig, victims, "cmp-0"), 10, "the evacuated servers placed")
    assert rig.host("cmp-0").state is host.HostState.FENCED
    assert rig.driver.calls == ["answers cmp-0", "off cmp-0"]
    types = await rig.types(host.stream("cmp-0"))
    facts = [t for t in types if t not in ("HostResourcesClaimed", "HostRegistered")]
    assert facts[:4] == [
        "HostFailureDetected",
        "HostStateChanged",
        "HostFenceConfirmed",
        "HostStateChanged",
    ]
    assert facts[4:] == ["HostResourcesReleased"] * 3  # fenced first, then evacuated
    detected = await rig.log.read_stream(host.stream("cmp-0"))
    kinds = [e.data["kind"] for e in detected if e.type == "HostFailureDetected"]
    assert kinds == ["COMPUTE_NODE"]  # the (fake) BMC answered
    # Evacuation requests in priority order, each once.
    requested = [
        e.data["server_id"]
        for e in await rig.log.read_all(after=0, limit=10_000)
        if e.type == "ServerEvacuationRequested"
    ]
    assert requested == ["vm-high", "vm-mid", "vm-low"]
    for sid in victims:
        s = rig.server(sid)
        assert s.evacuated_from == "cmp-0" and s.recovery == ev.PLACED
        assert s.nics[0].mac_address == Srv(sid, "").mac
        assert s.nics[0].ip_addresses == (Srv(sid, "").ip,)
        assert s.metadata == {"vnf": "upf", "sid": sid}
    assert rig.host("cmp-0").claims == {}
    assert rig.server("vm-high").host == "cmp-3"  # anti-affinity: cmp-1, cmp-2 hold g1
    assert rig.server("g1-b").host == "cmp-1"  # others untouched


@pytest.mark.faultd(driver={"confirm": False})
async def test_no_recovery_without_a_confirmed_fence(rig: Rig) -> None:
    rig.liveness.lose("cmp-0")
    await until(lambda: rig.faultd.stats.fence_failed >= 2, 10, "two failed fence attempts")
    assert rig.host("cmp-0").state is host.HostState.FAILED
    assert rig.server("vm-high").host == "cmp-0"  # nothing was moved
    assert "ServerEvacuationRequested" not in await rig.types(server.stream("vm-high"))
    rig.driver.confirm = True  # the BMC is repaired: the retry confirms
    await until(all_placed(rig, ["vm-high"], "cmp-0"), 10, "evacuation after the fence")


@pytest.mark.faultd(hosts={**HOSTS, "cmp-0": ("z1", "")})
async def test_without_oob_the_fence_is_confirmed_by_ttl_and_margin(rig: Rig) -> None:
    rig.liveness.lose("cmp-0")
    await until(lambda: rig.host("cmp-0").state is host.HostState.FAILED, 5, "FAILED")
    failed_at = time.monotonic()
    await until(lambda: rig.host("cmp-0").state is host.HostState.FENCED, 5, "FENCED")
    assert time.monotonic() - failed_at >= 0.3  # not before lease loss + TTL + margin
    records = await rig.log.read_stream(host.stream("cmp-0"))
    by_type = {e.type: e.data for e in records}
    assert by_type["HostFailureDetected"]["kind"] == "HARDWARE"
    assert by_type["HostFenceConfirmed"]["method"] == "self-fence-timeout"
    assert rig.driver.calls == []
    await until(all_placed(rig, ["vm-low"], "cmp-0"), 10, "evacuation")


@pytest.mark.faultd(flap=ev.FlapPolicy(window_s=600, max_failures=2))
async def test_a_returning_host_rejoins_then_is_held_when_it_flaps(rig: Rig) -> None:
    rig.liveness.lose("cmp-3")  # no servers on it
    await until(lambda: rig.host("cmp-3").state is host.HostState.FENCED, 5, "fenced")
    rig.liveness.beat(LivenessRecord("cmp-3", 2, "boot2", NOW))
    await until(lambda: rig.host("cmp-3").state is host.HostState.UP, 5, "rejoined")
    assert rig.faultd.stats.rejoined == 1
    rig.liveness.lose("cmp-3")
    await until(lambda: rig.host("cmp-3").state is host.HostState.FENCED, 5, "fenced again")
    rig.liveness.beat(LivenessRecord("cmp-3", 3, "boot3", NOW))
    await until(lambda: rig.faultd.stats.held == 1, 5, "held")
    types = await rig.types(host.stream("cmp-3"))
    assert Counter(types)["HostFailureDetected"] == 2 and Counter(types)["HostRecovered"] == 2
    assert rig.host("cmp-3").state is host.HostState.FENCED  # held for an operator


@pytest.mark.faultd(zone_policies={"z1": ev.ZonePolicy(ev.RecoveryPolicy.NONE)})
async def test_policy_none_fences_but_does_not_evacuate(rig: Rig) -> None:
    rig.liveness.lose("cmp-0")
    await until(lambda: rig.host("cmp-0").state is host.HostState.FENCED, 5, "fenced")
    await until(lambda: "cmp-0" not in rig.faultd._workers, 5, "worker done")
    assert rig.server("vm-high").host == "cmp-0"
    assert rig.faultd.stats.evacuated == 0


@pytest.mark.faultd(
    servers=[Srv(f"g1-{i}", f"cmp-{i}", 0, "g1") for i in range(4)],
)
async def test_an_unplaceable_server_raises_recovery_failed(rig: Rig) -> None:
    rig.liveness.lose("cmp-0")  # g1 already holds every other host: anti-affinity refuses
    await until(lambda: rig.server("g1-0").recovery == ev.FAILED, 10, "recovery failed")
    s = rig.server("g1-0")
    assert s.state is server.ServerState.ERROR and s.host == ""
    assert "anti-affinity" in s.fault_reason or "affinity" in s.fault_reason, s.fault_reason
    types = await rig.types(server.stream("g1-0"))
    assert types.count("ServerRecoveryFailed") == 1
    model = await replay(rig.log, await rig.log.head())
    assert model.get(server.stream("g1-0")) is not None


@pytest.mark.faultd(silent=["cmp-0"], unleased_grace_s=0.5)
async def test_a_host_that_never_shows_a_lease_is_suspected_after_the_grace(rig: Rig) -> None:
    started = time.monotonic()
    await until(lambda: rig.host("cmp-0").state is host.HostState.FENCED, 10, "fenced")
    assert time.monotonic() - started >= 0.4  # not before the grace (0.5 s, from term start)
    assert rig.host("cmp-1").state is host.HostState.UP  # hosts with leases are left alone
    await until(all_placed(rig, ["vm-high"], "cmp-0"), 10, "evacuation")


@pytest.mark.faultd(hosts={**HOSTS, "cmp-0": ("z1", "")}, self_fence_margin_s=60.0)
async def test_the_agents_self_fence_report_confirms_before_the_timeout(rig: Rig) -> None:
    rig.liveness.lose("cmp-0")
    await until(lambda: rig.host("cmp-0").state is host.HostState.FAILED, 5, "FAILED")
    await append(rig.log, {host.stream("cmp-0"): [HostSelfFenced("cmp-0", 3, NOW, NOW, NOW)]})
    await until(lambda: rig.host("cmp-0").state is host.HostState.FENCED, 10, "FENCED early")
    records = await rig.log.read_stream(host.stream("cmp-0"))
    (confirmed,) = [e.data for e in records if e.type == "HostFenceConfirmed"]
    assert confirmed["method"] == "self-fence-timeout"
    assert "HostSelfFenced" in confirmed["detail"]  # by the report, not by the 60 s margin


DRAIN = [
    Srv("d-live-1", "cmp-0", 5, "g1"),
    Srv("d-live-2", "cmp-0", 4, "g1"),
    Srv("d-cold", "cmp-0", 3, live=False),
    Srv("d-stuck", "cmp-0", 2, live=False, max_ms=300),
    Srv("d-other", "cmp-1", 0, "g1"),
]


async def agent_stand_in(r: Rig, seen: list[int], stop: asyncio.Event) -> None:
    """Completes requested migrations like the destination agent would (the agents are a
    later issue), recording how many of group g1 were in flight at once."""
    while not stop.is_set():
        moving = [
            (e.state, e.version)
            for _, e in r.model.of_kind(server.KIND)
            if e.state.task == "MIGRATING"
        ]
        seen.append(sum(1 for s, _ in moving if s.affinity_group_id == "g1"))
        for s, _ in moving:
            done = server.ServerStateReported(
                s.server_id, s.migration_target, "ACTIVE", "RUNNING", reported_at=NOW
            )
            await append(r.log, {server.stream(s.server_id): [done]})
        await asyncio.sleep(0.05)


@pytest.mark.faultd(servers=DRAIN)
async def test_maintenance_drains_the_host_within_each_servers_constraints(rig: Rig) -> None:
    seen: list[int] = []
    stop = asyncio.Event()
    agent = asyncio.create_task(agent_stand_in(rig, seen, stop))
    try:
        h = rig.host("cmp-0")
        await append(
            rig.log, {host.stream("cmp-0"): host.enable_maintenance(h, "cmp-0", "bios", NOW)}
        )
        movable = ["d-live-1", "d-live-2", "d-cold"]
        await until(all_placed(rig, movable, "cmp-0"), 15, "movable servers moved")
        await until(lambda: "d-cold" not in rig.host("cmp-0").claims, 5, "source claims released")
    finally:
        stop.set()
        await agent
    records = await rig.log.read_all(after=0, limit=10_000)
    kinds = {
        e.data["server_id"]: e.data["migration_type"]
        for e in records
        if e.type == "ServerMigrationRequested"
    }
    assert kinds == {"d-live-1": "LIVE", "d-live-2": "LIVE", "d-cold": "OFFLINE"}
    blocked = [e.data for e in records if e.type == "ServerDrainBlocked"]
    assert [b["server_id"] for b in blocked] == ["d-stuck"]
    assert "300 ms" in blocked[0]["reason"]
    assert max(seen) <= 1  # at most K=1 migration of group g1 at a time
    g1 = {rig.server(s).host for s in ("d-live-1", "d-live-2", "d-other")}
    assert len(g1) == 3  # anti-affinity held through the moves
    assert rig.server("d-stuck").host == "cmp-0"
    assert "HostDrained" not in await rig.types(host.stream("cmp-0"))  # not empty yet
    # The operator deletes the server that cannot move: the host reports itself empty.
    stuck = rig.server("d-stuck")
    await append(rig.log, {server.stream("d-stuck"): [server.terminate(stuck, NOW)]})
    await until(lambda: rig.host("cmp-0").claims == {}, 5, "last claim released")
    deadline = time.monotonic() + 5
    while "HostDrained" not in (types := await rig.types(host.stream("cmp-0"))):
        assert time.monotonic() < deadline, f"no HostDrained: {types}"
        await asyncio.sleep(0.05)
    assert types.count("HostDrained") == 1 and rig.faultd.stats.migrations == 3


@pytest.mark.faultd(migration_release_timeout_s=0.5)
async def test_a_migration_the_source_never_releases_is_abandoned(rig: Rig) -> None:
    """Nobody releases vm-low (no agent here): after the timeout the fault manager
    gives the migration up, the target's claim back, and leaves the server on cmp-0."""
    s = rig.server("vm-low")
    target = rig.host("cmp-3")
    requested = server.migrate(s, server.MigrationType.OFFLINE, "cmp-3", rfc3339(utcnow()))
    claim = host.claim(target, "vm-low", 1, 512, 10)
    await append(rig.log, {server.stream("vm-low"): [requested], host.stream("cmp-3"): [claim]})
    await until(lambda: "vm-low" in rig.host("cmp-3").claims, 5, "the target claimed")
    await until(lambda: not rig.server("vm-low").migration_target, 10, "migration abandoned")
    after = rig.server("vm-low")
    assert (after.host, after.task) == ("cmp-0", "")
    assert "vm-low" not in rig.host("cmp-3").claims
    assert "vm-low" in rig.host("cmp-0").claims
    records = await rig.log.read_all(after=0, limit=10_000)
    [gave_up] = [e for e in records if e.type == "ServerMigrationAbandoned"]
    [released] = [e for e in records if e.type == "HostResourcesReleased"]
    assert released.position == gave_up.position + 1  # one append
    assert gave_up.data["target_host"] == "cmp-3" and "0.5 s" in gave_up.data["reason"]
    waited = parse_time(gave_up.data["abandoned_at"]) - parse_time(requested.requested_at)
    assert waited.total_seconds() >= 0.5
    assert rig.faultd.stats.migrations_abandoned == 1


def utcnow() -> datetime:
    return datetime.now(UTC)
