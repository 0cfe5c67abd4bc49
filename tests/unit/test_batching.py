"""The pure batch decision and the group committer, without a database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vim.errors import FencedOut, IdempotencyConflict, VersionConflict
from vim.eventlog.batching import GroupCommitter, LogState, plan_batch
from vim.eventlog.model import (
    ANY_VERSION,
    AppendRequest,
    AppendResult,
    Metadata,
    NewEvent,
    PreparedAppend,
    StreamAppend,
    prepare,
)

NOW = datetime(2026, 11, 22, tzinfo=UTC)


def prep(stream: str, expected: int, n: int = 1, **meta: object) -> PreparedAppend:
    events = [NewEvent("Tick", {"i": i}) for i in range(n)]
    return prepare(
        AppendRequest([StreamAppend(stream, expected, events)], Metadata(**meta)),  # type: ignore[arg-type]
        max_payload_bytes=1 << 20,
    )


appends = st.lists(
    st.tuples(
        st.sampled_from(["server-a", "server-b", "host-c"]),
        st.integers(min_value=-1, max_value=4),
        st.integers(min_value=1, max_value=3),
        st.one_of(st.none(), st.sampled_from(["r1", "r2", "r3"])),
        st.one_of(st.none(), st.integers(min_value=0, max_value=5)),
    ),
    max_size=25,
)


@settings(max_examples=300, deadline=None)
@given(appends, st.integers(min_value=0, max_value=100))
def test_plan_assigns_gapless_positions_and_honours_every_check(
    spec: list[tuple[str, int, int, str | None, int | None]], head: int
) -> None:
    batch = [
        prep(
            s,
            v,
            n,
            request_id=rid,
            fencing_role="scheduler" if tok is not None else None,
            fencing_token=tok,
        )
        for s, v, n, rid, tok in spec
    ]
    state = LogState(head, {}, {}, {})
    outcomes, writes = plan_batch(batch, state, NOW)
    positions = [e[0] for e in writes.events]
    assert positions == list(range(head + 1, head + 1 + len(positions)))
    assert writes.head == head + len(positions)
    versions: dict[str, int] = {}
    newest_token = 0
    seen_rids: dict[str, str] = {}
    for p, out in zip(batch, outcomes, strict=True):
        s = p.streams[0]
        rid, tok = p.metadata.request_id, p.metadata.fencing_token
        if isinstance(out, IdempotencyConflict):
            assert rid in seen_rids and seen_rids[rid] != p.fingerprint
        elif isinstance(out, AppendResult) and out.replayed:
            assert rid in seen_rids and seen_rids[rid] == p.fingerprint
        elif isinstance(out, FencedOut):
            assert tok is not None and tok < newest_token
        elif isinstance(out, VersionConflict):
            assert s.expected_version not in (ANY_VERSION, versions.get(s.stream_id, 0))
        else:
            assert isinstance(out, AppendResult)
            assert s.expected_version in (ANY_VERSION, versions.get(s.stream_id, 0))
            versions[s.stream_id] = versions.get(s.stream_id, 0) + len(s.events)
            assert out.versions[s.stream_id] == versions[s.stream_id]
            if rid is not None:
                seen_rids[rid] = p.fingerprint
            if tok is not None:
                newest_token = max(newest_token, tok)
    written = {sid: v for sid, (v, _) in writes.streams.items()}
    assert written == versions


def test_same_request_twice_in_a_batch_is_written_once() -> None:
    a = prep("server-a", ANY_VERSION, request_id="r")
    outcomes, writes = plan_batch([a, a], LogState(0, {}, {}, {}), NOW)
    first, second = outcomes
    assert isinstance(first, AppendResult) and isinstance(second, AppendResult)
    assert not first.replayed and second.replayed
    assert second.first_position == first.first_position
    assert len(writes.events) == 1 and len(writes.requests) == 1


async def test_group_committer_batches_concurrent_appends() -> None:
    sizes: list[int] = []
    gate = asyncio.Event()

    async def write(batch: list[PreparedAppend]) -> list[object]:
        sizes.append(len(batch))
        await gate.wait()
        return [AppendResult(1, 1, {}, NOW) for _ in batch]

    gc = GroupCommitter(write, max_appends=10, max_events=100)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(gc.submit(prep(f"server-{i}", 0))) for i in range(25)]
    await asyncio.sleep(0)  # let every submit enqueue before the gate opens
    gate.set()
    await asyncio.gather(*tasks)
    await gc.close()
    assert sizes == [10, 10, 5]


async def test_group_committer_routes_each_outcome_and_failure() -> None:
    async def write(batch: list[PreparedAppend]) -> list[object]:
        if any(p.streams[0].stream_id == "server-boom" for p in batch):
            raise RuntimeError("disk on fire")
        return [VersionConflict("server-x", 0, 1) for _ in batch]

    gc = GroupCommitter(write, max_appends=1, max_events=100)  # type: ignore[arg-type]
    with pytest.raises(VersionConflict):
        await gc.submit(prep("server-x", 0))
    with pytest.raises(RuntimeError, match="disk on fire"):
        await gc.submit(prep("server-boom", 0))
    await gc.close()
    await gc.close()
    with pytest.raises(RuntimeError, match="closed"):
        await gc.submit(prep("server-x", 0))


async def test_a_cancelled_caller_does_not_cancel_the_write() -> None:
    written: list[str] = []
    gate = asyncio.Event()

    async def write(batch: list[PreparedAppend]) -> list[object]:
        await gate.wait()
        written.extend(p.streams[0].stream_id for p in batch)
        return [AppendResult(1, 1, {}, NOW) for _ in batch]

    gc = GroupCommitter(write, max_appends=10, max_events=100)  # type: ignore[arg-type]
    task = asyncio.create_task(gc.submit(prep("server-a", 0)))
    await asyncio.sleep(0)
    task.cancel()
    gate.set()
    await gc.close()
    assert written == ["server-a"]


def gathering(sizes: list[int], **knobs: float) -> GroupCommitter:
    """A committer whose writes succeed at once and record their batch sizes."""

    async def write(batch: list[PreparedAppend]) -> list[object]:
        sizes.append(len(batch))
        return [AppendResult(1, 1, {}, NOW) for _ in batch]

    return GroupCommitter(
        write,  # type: ignore[arg-type]
        max_appends=10,
        max_events=100,
        **knobs,  # type: ignore[arg-type]
    )


async def submit_after(gc: GroupCommitter, turns: int, stream: str) -> AppendResult:
    """Submit after the loop has turned `turns` times (a request still being handled)."""
    for _ in range(turns):
        await asyncio.sleep(0)
    return await gc.submit(prep(stream, 0))


async def test_the_writer_gathers_appends_made_while_the_loop_is_busy() -> None:
    """Appends made over the next few loop turns join the first batch; without
    gathering the first one is written alone."""
    for turns, expected in ((128, [4]), (0, [1, 1, 1, 1])):
        sizes: list[int] = []
        gc = gathering(sizes, gather_turns=turns, gather_idle_turns=8)
        async with asyncio.timeout(5):
            await asyncio.gather(*(submit_after(gc, 2 * i, f"server-{i}") for i in range(4)))
        await gc.close()
        assert sizes == expected, (turns, sizes)


async def test_gathering_stops_after_idle_turns_and_at_its_bounds() -> None:
    # Nothing queued for 8 turns: the first append goes alone.
    sizes: list[int] = []
    gc = gathering(sizes, gather_turns=128, gather_idle_turns=8)
    async with asyncio.timeout(5):
        await asyncio.gather(submit_after(gc, 0, "server-a"), submit_after(gc, 30, "server-b"))
    assert sizes == [1, 1]

    # A loop that never stops queueing: the turn limit ends the gathering...
    sizes = []
    gc = gathering(sizes, gather_turns=5, gather_idle_turns=8)
    async with asyncio.timeout(5):
        await asyncio.gather(*(submit_after(gc, i, f"server-{i}") for i in range(10)))
    assert sizes[0] <= 6 and sum(sizes) == 10, sizes

    # ...and so does the time limit (0: the first turn).
    sizes = []
    gc = gathering(sizes, gather_turns=128, gather_idle_turns=8, gather_max_s=0.0)
    async with asyncio.timeout(5):
        await asyncio.gather(*(submit_after(gc, i, f"server-{i}") for i in range(10)))
    assert sizes[0] <= 2 and sum(sizes) == 10, sizes


def test_a_shifted_outcome_keeps_every_field_but_its_positions() -> None:
    """`postgres._shifted` builds the result field by field (no `dataclasses.replace`
    on the hot path): a field added to AppendResult must not be lost there."""
    from dataclasses import fields, replace
    from datetime import UTC, datetime

    from vim.eventlog.model import AppendResult
    from vim.eventlog.postgres import _shifted

    planned = AppendResult(
        first_position=1,
        last_position=3,
        versions={"server-a": 2},
        recorded_at=datetime(2026, 12, 4, tzinfo=UTC),
        request_id="t:r1",
        response={"serverId": "a"},
        replayed=False,
    )
    others = [f for f in fields(planned) if f.name != "replayed"]  # only unreplayed shift
    assert all(getattr(planned, f.name) != f.default for f in others), (
        "set every field to a non-default value, or this test proves nothing"
    )
    shifted = _shifted(planned, 100)
    assert shifted == replace(planned, first_position=101, last_position=103)
    replayed = replace(planned, replayed=True)
    assert _shifted(replayed, 100) is replayed
