"""LocalElector: the in-process elector, driven by a fake clock (no real sleeps).

The deadline and keepalive logic tested here is shared with EtcdElector, so these
tests also pin the etcd elector's step-down rules: a term ends by the local
deadline (last refresh send time + TTL - margin), before the lease can expire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from ha.election import Leadership, LocalElection, LocalElector
from ha.errors import ElectorClosed

TTL = 2.0  # keepalive every 2/3 s, deadline 1.5 s after the last refresh


class FakeClock:
    """A clock that only moves when the test says so; ``sleep`` waits for ``advance``."""

    def __init__(self) -> None:
        self.t = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.t)

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.t + max(0.0, seconds), fut))
        self._wake()
        await fut

    def _wake(self) -> None:
        keep = []
        for when, fut in self._sleepers:
            if fut.done():
                continue
            if when <= self.t:
                fut.set_result(None)
            else:
                keep.append((when, fut))
        self._sleepers = keep

    async def advance(self, seconds: float, *, jump: bool = False, step: float = 0.01) -> None:
        """Move time forward in small steps, letting woken tasks run after each one.

        With ``jump`` time moves at once, as if the event loop had been frozen.
        """
        target = self.t + seconds
        while self.t < target:
            self.t = target if jump else min(target, self.t + step)
            self._wake()
            await settle()


async def settle() -> None:
    """Let every ready task run (yields to the loop; no time passes)."""
    for _ in range(50):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def election(clock: FakeClock) -> AsyncIterator[LocalElection]:
    yield LocalElection(clock=clock)


async def _electors(election: LocalElection, *names: str) -> list[LocalElector]:
    return [LocalElector("scheduler", n, election=election, ttl_s=TTL) for n in names]


async def test_single_candidate_leads_and_is_observed(election: LocalElection) -> None:
    (a,) = await _electors(election, "a")
    assert await a.observe() is None
    assert not a.is_leader()
    won = await a.campaign()
    assert (won.role, won.holder, won.token, won.backend) == ("scheduler", "a", 1, "local")
    assert won.term == won.token
    assert a.is_leader()
    assert a.leadership == won
    assert await a.observe() == won
    assert await a.campaign() == won  # already leading: same term
    assert not a.leader_lost.is_set()
    await a.close()


async def test_resign_hands_over_with_a_larger_token(election: LocalElection) -> None:
    a, b = await _electors(election, "a", "b")
    first = await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await settle()
    assert not waiting.done()
    assert await b.observe() == first

    await a.resign()
    assert a.leader_lost.is_set()
    assert not a.is_leader()
    second = await asyncio.wait_for(waiting, 1)
    assert second.holder == "b"
    assert second.token > first.token
    assert b.is_leader() and not a.is_leader()
    assert await a.observe() == second
    await a.close()
    await b.close()


async def test_keepalive_holds_the_term_for_many_ttls(
    election: LocalElection, clock: FakeClock
) -> None:
    a, b = await _electors(election, "a", "b")
    won = await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await clock.advance(10 * TTL)
    assert a.is_leader()
    assert a.leadership == won
    assert not waiting.done()
    assert not a.leader_lost.is_set()
    waiting.cancel()
    await a.close()
    await b.close()


async def test_stalled_keepalive_steps_down_by_its_own_deadline_before_the_lease_expires(
    election: LocalElection, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await _electors(election, "a", "b")
    first = await a.campaign()
    won_at = clock.t
    waiting = asyncio.create_task(b.campaign())
    await settle()

    # A paused process: refreshes hang and it cannot release anything either.
    async def hang(*_: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(a, "_refresh", hang)
    monkeypatch.setattr(a, "_release", hang)

    lost_at = b_won_at = None
    while b_won_at is None:
        await clock.advance(0.05)
        assert not (a.is_leader() and b.is_leader()), "two leaders at once"
        if lost_at is None and not a.is_leader():
            lost_at = clock.t
        if waiting.done():
            b_won_at = clock.t
        assert clock.t - won_at < 3 * TTL

    assert lost_at is not None
    assert a.leader_lost.is_set()
    assert lost_at - won_at == pytest.approx(TTL * 3 / 4, abs=0.06)  # ttl - margin
    assert b_won_at - won_at == pytest.approx(TTL, abs=0.06)  # the lease itself
    assert lost_at < b_won_at
    second = waiting.result()
    assert second.token > first.token
    await b.close()


async def test_is_leader_turns_false_even_if_no_task_runs(
    election: LocalElection, clock: FakeClock
) -> None:
    (a,) = await _electors(election, "a")
    await a.campaign()
    clock.t += TTL  # the whole loop was frozen: no keepalive ran
    assert not a.is_leader()
    assert a.leader_lost.is_set()
    assert a.leadership is None
    await a.close()


async def test_late_refresh_is_logged(
    election: LocalElection, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    (a,) = await _electors(election, "a")
    await a.campaign()
    caplog.set_level(logging.WARNING, logger="ha.election")
    await clock.advance(1.2, jump=True)  # the loop stalled for 1.2 s (interval 0.67 s)
    assert a.is_leader()  # still inside the 1.5 s deadline, and now refreshed
    assert a.deadline_remaining() == pytest.approx(1.5)
    assert any("ran late" in r.getMessage() for r in caplog.records)
    await a.close()


async def test_watch_reports_every_change(election: LocalElection, clock: FakeClock) -> None:
    a, b, observer = await _electors(election, "a", "b", "o")
    seen: list[Leadership | None] = []

    async def follow() -> None:
        async for leadership in observer.watch():
            seen.append(leadership)

    watcher = asyncio.create_task(follow())
    await settle()
    await a.campaign()
    await settle()
    await a.resign()
    await settle()
    await b.campaign()
    await settle()
    await clock.advance(3 * TTL)  # nothing changes while b keeps its lease
    watcher.cancel()
    holders = [None if x is None else (x.holder, x.token) for x in seen]
    assert holders == [None, ("a", 1), None, ("b", 2)]
    await a.close()
    await b.close()


async def test_seeded_tokens_start_above_the_log(election: LocalElection) -> None:
    election.seed("scheduler", 41)
    a, b = await _electors(election, "a", "b")
    assert (await a.campaign()).token == 42
    await a.resign()
    assert (await b.campaign()).token == 43
    await b.resign()
    assert (await a.campaign()).token == 44
    await a.close()
    await b.close()


async def test_roles_are_independent(election: LocalElection) -> None:
    s = LocalElector("scheduler", "x", election=election, ttl_s=TTL)
    f = LocalElector("fault_manager", "x", election=election, ttl_s=TTL)
    assert (await s.campaign()).token == 1
    assert (await f.campaign()).token == 1
    assert s.is_leader() and f.is_leader()
    await s.close()
    await f.close()


async def test_close_releases_and_refuses_new_work(election: LocalElection) -> None:
    a, b = await _electors(election, "a", "b")
    await a.campaign()
    await a.close()
    await a.close()  # idempotent
    assert a.leader_lost.is_set()
    assert await b.observe() is None
    with pytest.raises(ElectorClosed):
        await a.campaign()
    await b.close()


async def test_cancelled_campaign_leaves_nothing_behind(election: LocalElection) -> None:
    a, b = await _electors(election, "a", "b")
    await a.campaign()
    waiting = asyncio.create_task(b.campaign())
    await settle()
    waiting.cancel()
    await settle()
    await a.resign()
    await settle()
    assert await a.observe() is None
    assert not b.is_leader()
    await a.close()
    await b.close()


def test_timings_are_validated() -> None:
    with pytest.raises(ValueError, match="margin"):
        LocalElector("scheduler", "a", ttl_s=2, safety_margin_s=2)
    with pytest.raises(ValueError, match="interval"):
        LocalElector("scheduler", "a", ttl_s=2, keepalive_interval_s=1.6)
