"""The `vim.v1.EventLog` service: the event log's global order, read-only, for clients.

Watch catches up from a position and then follows live (it is a thin shell over
`EventLog.subscribe`); ListEvents reads one batch; GetHead reads the newest
position. Nothing here appends.

Invariants:

- Bad input never reaches the log and never surfaces as INTERNAL or UNKNOWN:
  limits, positions and type/kind names are checked first and refused with
  INVALID_ARGUMENT carrying a `google.rpc.BadRequest` that names every bad field.
- `EventLogUnavailable` becomes UNAVAILABLE, which clients may retry (on another
  node) with the same request.
- A Watch ends only when the client cancels it (its subscription is then closed
  in `finally`), or when the node drains for shutdown: then it ends with
  UNAVAILABLE saying where to resume, so the client reconnects elsewhere and
  loses nothing. Events are delivered in position order, each exactly once per
  stream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from vim._gen.vim.v1 import common_pb2, events_pb2, events_pb2_grpc
from vim.api.auth import READ
from vim.api.errors import abort_for, refuse
from vim.api.node import Node
from vim.app.commands import Principal
from vim.errors import (
    FieldViolation,
    Unavailable,
    VimError,
)
from vim.eventlog import model
from vim.eventlog.store import EventLog, Subscription

SERVICE_NAME: str = events_pb2.DESCRIPTOR.services_by_name["EventLog"].full_name
"""`vim.v1.EventLog`, as health checks and reflection name it."""

DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
MAX_FILTER_NAMES = 100
MAX_POSITION = 2**63 - 1
"""Positions are signed 64-bit in the database; a larger `after` is a client bug."""

STREAM_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
"""The `<kind>` part of `model.STREAM_ID_RE`."""

_Context = grpc.aio.ServicerContext[Any, Any]


class EventLogServicer(events_pb2_grpc.EventLogServicer):
    """Serves one event log; `drain()` ends every open Watch when the node stops."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._log: EventLog = node.log
        self._watches: set[Subscription] = set()
        self._draining = False

    async def Watch(
        self, request: events_pb2.WatchEventsRequest, context: _Context
    ) -> AsyncIterator[events_pb2.RecordedEvent]:
        """Every matching event after from_position, caught up and then live."""
        try:
            principal = await self._node.caller(context, READ, "Watch")
            refuse(
                _position_violations("from_position", request.from_position)
                + _name_violations("types", request.types, model.EVENT_TYPE_RE, "PascalCase")
                + _name_violations("stream_kinds", request.stream_kinds, STREAM_KIND_RE, "kind")
            )
            await self._log.head()  # fail fast (UNAVAILABLE) rather than wait silently
            sub = self._log.subscribe(
                after=request.from_position,
                types=list(request.types) or None,
                kinds=list(request.stream_kinds) or None,
            )
            self._watches.add(sub)
            try:
                # Headers now, so a client knows the watch is established before any event.
                await context.send_initial_metadata(())
                if not self._draining:  # drain() may have run before the add above
                    async for event in sub:
                        if _visible(principal, event):
                            yield to_proto(event)
            finally:
                self._watches.discard(sub)
                await sub.close()
            raise Unavailable(
                "this API node is shutting down; watch again from position "
                f"{sub.position} on another node"
            )
        except VimError as exc:
            await abort_for(context, exc)

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: _Context
    ) -> events_pb2.ListEventsResponse:
        """Up to `limit` matching events after `after`, and where to continue."""
        try:
            principal = await self._node.caller(context, READ, "ListEvents")
            return await self._list(request, principal)
        except VimError as exc:
            await abort_for(context, exc)

    async def GetHead(
        self, request: events_pb2.GetHeadRequest, context: _Context
    ) -> events_pb2.GetHeadResponse:
        """The newest position."""
        try:
            await self._node.caller(context, READ, "GetHead")
            head = await self._log.head()
        except VimError as exc:
            await abort_for(context, exc)
        return events_pb2.GetHeadResponse(head=common_pb2.LogPosition(position=head))

    async def drain(self) -> None:
        """End every open Watch with UNAVAILABLE, and refuse to follow new ones."""
        self._draining = True
        for sub in list(self._watches):
            await sub.close()

    async def _list(
        self, request: events_pb2.ListEventsRequest, principal: Principal
    ) -> events_pb2.ListEventsResponse:
        violations = _position_violations("after", request.after) + _name_violations(
            "types", request.types, model.EVENT_TYPE_RE, "PascalCase"
        )
        if request.limit > MAX_LIST_LIMIT:
            violations.append(
                FieldViolation(
                    "limit", f"limit {request.limit} exceeds the maximum {MAX_LIST_LIMIT}"
                )
            )
        refuse(violations)
        limit = request.limit or DEFAULT_LIST_LIMIT
        # Head first: positions commit in order without gaps, so a read that starts
        # afterwards sees every event up to it, and a batch that is not full has
        # scanned at least that far.
        head = await self._log.head()
        events = await self._log.read_all(
            after=request.after, limit=limit, types=list(request.types) or None
        )
        last = events[-1].position if events else request.after
        following = last if len(events) == limit else max(head, last)
        return events_pb2.ListEventsResponse(
            events=[to_proto(e) for e in events if _visible(principal, e)],
            next=common_pb2.LogPosition(position=following),
            head=common_pb2.LogPosition(position=max(head, following)),
        )


def _visible(principal: Principal, event: model.RecordedEvent) -> bool:
    """The log is the audit trail of every tenant: others see only their own events."""
    return principal.is_admin or event.metadata.tenant == principal.tenant


def to_proto(event: model.RecordedEvent) -> events_pb2.RecordedEvent:
    """The wire form of a stored event (data as a Struct: JSON numbers become doubles)."""
    msg = events_pb2.RecordedEvent(
        position=event.position,
        stream_id=event.stream_id,
        version=event.version,
        event_id=event.event_id,
        type=event.type,
        schema_version=event.schema_version,
        metadata=metadata_to_proto(event.metadata),
    )
    msg.data.update(event.data)
    msg.recorded_at.FromDatetime(event.recorded_at)
    return msg


def metadata_to_proto(m: model.Metadata) -> events_pb2.EventMetadata:
    """Unset metadata fields become empty strings and 0, as proto3 has it."""
    return events_pb2.EventMetadata(
        tenant=m.tenant or "",
        actor=m.actor or "",
        request_id=m.request_id or "",
        correlation_id=m.correlation_id or "",
        causation_id=m.causation_id or "",
        fencing_role=m.fencing_role or "",
        fencing_token=m.fencing_token or 0,
    )


def _position_violations(field: str, position: int) -> list[FieldViolation]:
    if position > MAX_POSITION:
        return [FieldViolation(field, f"position {position} exceeds the maximum {MAX_POSITION}")]
    return []


def _name_violations(
    field: str, names: Sequence[str], pattern: re.Pattern[str], what: str
) -> list[FieldViolation]:
    if len(names) > MAX_FILTER_NAMES:
        return [FieldViolation(field, f"at most {MAX_FILTER_NAMES} names, got {len(names)}")]
    return [
        FieldViolation(f"{field}[{i}]", f"{name[:100]!r} is not a valid {what} name")
        for i, name in enumerate(names)
        if not pattern.match(name)
    ]
