"""CommandRunner on a real (SQLite) log: idempotency with a lagging node, retries on conflict."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from vim.app.commands import Change, CommandContext, CommandRunner, Decision, Principal
from vim.domain import flavor
from vim.errors import IdempotencyConflict
from vim.eventlog.sql import SqlEventLog
from vim.projections.readmodel import Projector, ReadModel, register_kind

register_kind(flavor.KIND, flavor.evolve)
ALICE = Principal("alice", "t1", frozenset({"admin"}))


def ctx(rid: str, fp: str = "fp") -> CommandContext:
    return CommandContext(ALICE, rid, fp)


def create(flavor_id: str, name: str = "m1"):  # type: ignore[no-untyped-def]
    def decide(model: ReadModel) -> Decision:
        event = flavor.create([], flavor_id, name, 1, 512, 1, True, {}, "t")
        return Decision([Change(flavor.stream(flavor_id), 0, [event])], {"id": flavor_id})

    return decide


async def test_a_lagging_node_still_returns_the_first_answer(tmp_path: Path) -> None:
    log = await SqlEventLog.open(f"sqlite:///{tmp_path}/log.db")
    fast = Projector(log)
    fast.start()
    lagging = ReadModel()  # never follows the log: it decides on stale state
    try:
        first = await CommandRunner(log, fast.model).run(ctx("r1"), create("a"))
        # The retry reaches a node that has not seen the first execution: it decides
        # a *different* flavour id, but the log answers with the first result.
        slow = CommandRunner(log, lagging, wait_timeout_s=0.2)
        with pytest.raises(Exception, match="not yet"):
            await slow.run(ctx("r1"), create("b"))  # replay found, waits for position
        await Projector(log, lagging).catch_up()
        again = await slow.run(ctx("r1"), create("b"))
        assert again.response == first.response == {"id": "a"}
        assert again.replayed and await log.head() == 1
        with pytest.raises(IdempotencyConflict):
            await slow.run(ctx("r1", fp="other"), create("c"))
    finally:
        await fast.stop()
        await log.close()


async def test_concurrent_commands_on_one_stream_are_retried_not_lost(tmp_path: Path) -> None:
    log = await SqlEventLog.open(f"sqlite:///{tmp_path}/log.db")
    projector = Projector(log)
    projector.start()
    runner = CommandRunner(log, projector.model)

    def bump(i: int):  # type: ignore[no-untyped-def]
        def decide(model: ReadModel) -> Decision:
            sid = flavor.stream("counter")
            return Decision(
                [
                    Change(
                        sid, model.version(sid), [flavor.FlavorCreated("counter", f"n{i}", 1, 1, 0)]
                    )
                ],
                {"i": i},
            )

        return decide

    try:
        outs = await asyncio.gather(*(runner.run(ctx(f"r{i}"), bump(i)) for i in range(60)))
        assert sorted(o.response["i"] for o in outs) == list(range(60))
        assert await log.stream_version(flavor.stream("counter")) == 60
    finally:
        await projector.stop()
        await log.close()


async def test_a_malformed_event_is_skipped_not_fatal(tmp_path: Path) -> None:
    from vim.eventlog.model import AppendRequest, NewEvent, StreamAppend

    log = await SqlEventLog.open(f"sqlite:///{tmp_path}/log.db")
    projector = Projector(log)
    projector.start()
    try:
        bad = NewEvent("FlavorCreated", {"flavor_id": "x"})  # required fields missing
        await log.append(AppendRequest([StreamAppend(flavor.stream("x"), 0, [bad])]))
        r = await CommandRunner(log, projector.model).run(ctx("r1"), create("good"))
        assert r.position == 2
        assert projector.model.skipped == 1
        assert projector.model.get(flavor.stream("good")) is not None
        assert projector.model.get(flavor.stream("x")) is None
    finally:
        await projector.stop()
        await log.close()


async def test_an_unknown_event_type_still_moves_its_streams_version(tmp_path: Path) -> None:
    """A fact this process has no class for (another component's, or a newer release's)
    must not leave the stream behind: later commands on it would wait forever."""
    from vim.eventlog.model import AppendRequest, NewEvent, StreamAppend

    log = await SqlEventLog.open(f"sqlite:///{tmp_path}/log.db")
    projector = Projector(log)
    projector.start()
    try:
        runner = CommandRunner(log, projector.model)
        await runner.run(ctx("r1"), create("good"))
        sid = flavor.stream("good")
        future = NewEvent("FlavorPolishedByANewerRelease", {"flavor_id": "good"})
        await log.append(AppendRequest([StreamAppend(sid, 1, [future])]))
        await projector.model.wait_for(2, 10)
        entry = projector.model.get(sid)
        assert entry is not None and entry.version == 2
        assert entry.state.name == "m1"  # the last known state is kept
    finally:
        await projector.stop()
        await log.close()
