"""Two schedulers at once against a real PostgreSQL: no over-commit, no broken group.

The log is seeded with hosts (some in maintenance or failed), affinity groups of
every policy and scope, and 1,000 BUILDING servers; two `SchedulerService`s, each
with its own event log connection and read model, run concurrently with
election disabled, so they really race for the same servers and hosts. The
verdict comes from a fresh replay of the log, not from either scheduler.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import pytest

from vim.app import quotas  # noqa: F401  (registers the reservation kind)
from vim.domain import affinity, host, server
from vim.domain.base import DomainEvent
from vim.errors import FencedOut, Unavailable
from vim.eventlog.model import AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.sql import SqlEventLog
from vim.projections.readmodel import Projector, ReadModel, replay
from vim.scheduler.service import SchedulerConfig, SchedulerService

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SEED_META = Metadata(actor="test-seed")
ZONES = ("z1", "z2", "z3")
SERVERS = 1000
DEADLINE_S = 60.0


def _new(events: Sequence[DomainEvent]) -> list[NewEvent]:
    return [NewEvent(e.type, e.to_data(), e.SCHEMA_VERSION) for e in events]


async def _append(log: SqlEventLog, streams: list[tuple[str, Sequence[DomainEvent]]]) -> None:
    await log.append(
        AppendRequest(
            streams=[StreamAppend(sid, 0, _new(evs)) for sid, evs in streams], metadata=SEED_META
        )
    )


def _flavor(vcpus: int) -> server.FlavorCopy:
    return server.FlavorCopy(f"f{vcpus}", f"m{vcpus}", vcpus, 1024 * vcpus, 10)


async def _seed_hosts(log: SqlEventLog, count: int) -> None:
    for i in range(count):
        name = f"cmp-{i:03d}"
        spec = host.HostSpec(ZONES[i % 3], 8, 32768, 400, 2.0, 1.0, 1.0, max_instances=20)
        events = host.register(None, name, spec, "2030-01-01T00:00:00.000Z")
        h = host.evolve(None, events[0])
        if i % 25 == 1:
            events += host.enable_maintenance(h, name, "test", "2030-01-01T00:00:00.000Z")
        elif i % 25 == 2:
            failed = host.change_state(h, name, host.HostState.FAILED, "test", "t")
            assert failed is not None
            events.append(failed)
        await _append(log, [(host.stream(name), events)])


GROUPS: list[tuple[str, affinity.Policy, affinity.Scope, int]] = [
    *[(f"nh{i}", affinity.Policy.ANTI_AFFINITY, affinity.Scope.HOST, 6) for i in range(25)],
    *[(f"nz{i}", affinity.Policy.ANTI_AFFINITY, affinity.Scope.ZONE, 4) for i in range(5)],
    *[(f"ah{i}", affinity.Policy.AFFINITY, affinity.Scope.HOST, 4) for i in range(10)],
    *[(f"az{i}", affinity.Policy.AFFINITY, affinity.Scope.ZONE, 8) for i in range(5)],
]


async def _seed_servers(log: SqlEventLog) -> None:
    rng = random.Random(7)
    members: list[tuple[str, str]] = []  # (server id, group id)
    for gid, policy, scope, size in GROUPS:
        created = affinity.create(gid, "t1", gid, policy, scope, "2030-01-01T00:00:00.000Z")
        sids = [f"{gid}-m{j}" for j in range(size)]
        joined = [affinity.AffinityMemberAdded(gid, s) for s in sids]
        await _append(log, [(affinity.stream(gid), [created, *joined])])
        members += [(s, gid) for s in sids]
    members += [(f"free-{i}", "") for i in range(SERVERS - len(members))]
    rng.shuffle(members)

    async def allocate(i: int, sid: str, gid: str) -> None:
        zone = rng.choice(["", "", "z1", "z2"]) if not gid else ""
        event = server.allocate(
            sid,
            "t1",
            sid,
            _flavor(rng.choice([1, 1, 2, 2, 3])),
            "img",
            [],
            now=f"2030-01-01T00:00:{i // 100:02d}.{i % 100:03d}Z",
            affinity_group_id=gid,
            zone=zone,
            priority=rng.choice([0, 0, 0, 5, 10]),
        )
        await _append(log, [(server.stream(sid), [event])])

    for start in range(0, len(members), 100):
        chunk = members[start : start + 100]
        await asyncio.gather(*(allocate(start + j, s, g) for j, (s, g) in enumerate(chunk)))


async def _open_scheduler(url: str, name: str, token: int) -> tuple[SchedulerService, Projector]:
    log = await SqlEventLog.open(url, migrate=False)
    projector = Projector(log)
    await projector.catch_up()
    projector.start()
    config = SchedulerConfig(batch_size=200, static_token=token, name=name, idle_wait_s=0.5)
    return SchedulerService(log, projector.model, config=config), projector


@pytest.fixture
async def seed_log(pg_url: str) -> AsyncIterator[SqlEventLog]:
    log = await SqlEventLog.open(pg_url, migrate=False)
    yield log
    await log.close()


def _settled(model: ReadModel) -> int:
    return sum(
        1 for _, e in model.of_kind(server.KIND) if e.state.host or e.state.state.value == "ERROR"
    )


async def _wait_settled(model: ReadModel, total: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while _settled(model) < total:
        assert time.monotonic() < deadline, f"only {_settled(model)}/{total} settled"
        try:
            await model.wait_for(model.position + 1, within_s=1.0)
        except Unavailable:
            continue


async def test_two_schedulers_race_without_overcommit(pg_url: str, seed_log: SqlEventLog) -> None:
    await _seed_hosts(seed_log, 75)
    await _seed_servers(seed_log)
    watcher = Projector(seed_log)
    await watcher.catch_up()
    watcher.start()

    (a, pa), (b, pb) = await asyncio.gather(
        _open_scheduler(pg_url, "a", 1), _open_scheduler(pg_url, "b", 1)
    )
    started = time.monotonic()
    tasks = [asyncio.create_task(a.run()), asyncio.create_task(b.run())]
    try:
        await _wait_settled(watcher.model, SERVERS)
    finally:
        elapsed = time.monotonic() - started
        for svc in (a, b):
            await svc.stop()
        await asyncio.gather(*tasks)
        for p in (pa, pb):
            await p.stop()
            await p._log.close()  # type: ignore[attr-defined]
        await watcher.stop()

    head = await seed_log.head()
    model = await replay(seed_log, head)
    verdict = _check(model, await seed_log.read_all(after=0, limit=head + 1))
    print(
        f"\nscheduler race: {SERVERS} servers in {elapsed:.2f}s "
        f"({SERVERS / elapsed:.0f}/s); placed {verdict['placed']}, error {verdict['error']}; "
        f"a={a.stats} b={b.stats}"
    )
    assert a.stats.placed > 0 and b.stats.placed > 0, (a.stats, b.stats)
    races = a.stats.conflicts + b.stats.conflicts + a.stats.stale + b.stats.stale
    assert a.stats.conflicts + b.stats.conflicts > 0 and races > 0
    assert verdict["placed"] > 500 and verdict["error"] > 0


def _check(model: ReadModel, events: Sequence[object]) -> dict[str, int]:
    """Assert every invariant from the replayed log; return counts."""
    hosts: dict[str, host.Host] = {e.state.hostname: e.state for _, e in model.of_kind(host.KIND)}
    servers: dict[str, server.Server] = {
        e.state.server_id: e.state for _, e in model.of_kind(server.KIND)
    }
    # No host over-committed (claims summed independently of the host's own `used`).
    for h in hosts.values():
        total = sum(h.claims.values(), host.Resources())
        t = h.total
        assert total.vcpus <= t.vcpus and total.ram_mb <= t.ram_mb, h.hostname
        assert total.disk_gb <= t.disk_gb and total.instances <= t.instances, h.hostname
        if h.claims:
            assert h.schedulable, f"{h.hostname} ({h.state}) got claims"
    # Each server placed once, with exactly one claim, on the host it names.
    claims = Counter(sid for h in hosts.values() for sid in h.claims)
    scheduled = Counter(
        e.data["server_id"]
        for e in events
        if e.type == "ServerScheduled"  # type: ignore[attr-defined]
    )
    failed = Counter(
        e.data["server_id"]
        for e in events
        if e.type == "ServerSchedulingFailed"  # type: ignore[attr-defined]
    )
    for sid, s in servers.items():
        assert scheduled[sid] + failed[sid] == 1, sid
        if s.host:
            assert claims[sid] == 1 and sid in hosts[s.host].claims, sid
            assert s.zone == hosts[s.host].spec.zone
        else:
            assert s.state is server.ServerState.ERROR and claims[sid] == 0, sid
            assert s.fault_reason.startswith("no valid host: "), s.fault_reason
    # Groups.
    for gid, policy, scope, _ in GROUPS:
        placed = [servers[m] for m in model.get(affinity.stream(gid)).state.members]  # type: ignore[union-attr]
        where = [s.host if scope is affinity.Scope.HOST else s.zone for s in placed if s.host]
        if policy is affinity.Policy.ANTI_AFFINITY:
            assert len(set(where)) == len(where), (gid, where)
        else:
            assert len(set(where)) <= 1, (gid, where)
    return {
        "placed": sum(1 for s in servers.values() if s.host),
        "error": sum(1 for s in servers.values() if not s.host),
    }


async def test_stale_fencing_token_is_refused(pg_url: str, seed_log: SqlEventLog) -> None:
    await _seed_hosts(seed_log, 3)
    first = server.allocate("s1", "t1", "s1", _flavor(1), "img", [], now="2030-01-01T00:00:00Z")
    await _append(seed_log, [(server.stream("s1"), [first])])
    old, p_old = await _open_scheduler(pg_url, "old", 5)
    new, p_new = await _open_scheduler(pg_url, "new", 6)
    try:
        assert await new.run_round() == 1  # the newer term writes first
        second = server.allocate(
            "s2", "t1", "s2", _flavor(1), "img", [], now="2030-01-01T00:00:01Z"
        )
        await _append(seed_log, [(server.stream("s2"), [second])])
        await p_old.model.wait_for(await seed_log.head())
        with pytest.raises(FencedOut):
            await old.run_round()
        model = await replay(seed_log, await seed_log.head())
        s2 = model.get(server.stream("s2"))
        assert s2 is not None and s2.version == 1 and not s2.state.host
        assert await seed_log.fencing_token("scheduler") == 6
    finally:
        for p in (p_old, p_new):
            await p.stop()
            await p._log.close()  # type: ignore[attr-defined]
