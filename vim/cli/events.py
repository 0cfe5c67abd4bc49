"""`vimctl events ...`: the event log, the audit trail of every change."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Annotated, Any

import typer

from vim._gen.vim.v1 import events_pb2, events_pb2_grpc
from vim.cli.output import as_dict, emit_line, emit_list
from vim.cli.runtime import run
from vim.cli.settings import Settings
from vim.client import VimClient

events = typer.Typer(help="The event log: tail and watch, with filters.")

_STUB = events_pb2_grpc.EventLogStub
COLUMNS = [
    ("POS", "position"),
    ("TIME", "recorded_at"),
    ("STREAM", "stream_id"),
    ("VER", "version"),
    ("TYPE", "type"),
]
_Types = Annotated[list[str] | None, typer.Option("--type", help="Event type (repeatable).")]
_Kinds = Annotated[
    list[str] | None, typer.Option("--kind", help="Stream kind, e.g. server, host (repeatable).")
]


def _line(e: dict[str, Any]) -> str:
    data = e.get("data")
    text = json.dumps(data, separators=(",", ":"), sort_keys=True) if data else ""
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{e.get('position', 0):>8} {e.get('stream_id', '')} {e.get('type', '')} {text}"


@events.command("tail")
def tail(
    ctx: typer.Context,
    count: Annotated[int, typer.Option("-n", "--count", min=1, max=10000)] = 20,
    type_: _Types = None,
) -> None:
    """The newest events (of the given types)."""

    async def work(vim: VimClient, s: Settings) -> None:
        head = await vim.unary(_STUB, "GetHead", events_pb2.GetHeadRequest())
        after = max(int(head.head.position) - (count if not type_ else 50 * count), 0)
        found: list[dict[str, Any]] = []
        while True:
            page = await vim.unary(
                _STUB,
                "ListEvents",
                events_pb2.ListEventsRequest(
                    after=after,
                    limit=500,
                    types=type_ or [],
                ),
            )
            found += [as_dict(e) for e in page.events]
            if not page.events or page.next.position <= after:
                break
            after = page.next.position
        emit_list(s.output, found[-count:], COLUMNS)

    run(ctx, work)


@events.command("watch")
def watch(
    ctx: typer.Context,
    from_position: Annotated[
        int | None,
        typer.Option("--from", min=0, help="Start after this position (0: all; default: now)."),
    ] = None,
    type_: _Types = None,
    kind: _Kinds = None,
    count: Annotated[int, typer.Option(min=0, help="Stop after this many (0: never).")] = 0,
    seconds: Annotated[float, typer.Option(min=0.0, help="Stop after this long (0: never).")] = 0.0,
) -> None:
    """Follow the log live (from now, or from a position), one line per event."""

    async def work(vim: VimClient, s: Settings) -> None:
        start = from_position
        if start is None:
            head = await vim.unary(_STUB, "GetHead", events_pb2.GetHeadRequest())
            start = int(head.head.position)
        request = events_pb2.WatchEventsRequest(
            from_position=start,
            types=type_ or [],
            stream_kinds=kind or [],
        )
        seen = 0

        async def follow() -> None:
            nonlocal seen
            async for event in vim.stream(_STUB, "Watch", request):
                item = as_dict(event)
                emit_line(s.output, item, _line(item))
                seen += 1
                if count and seen >= count:
                    return

        if seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(follow(), seconds)
        else:
            await follow()

    run(ctx, work)
