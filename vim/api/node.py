"""What every servicer needs from its node: the log, the read model, commands, auth.

Read-your-writes across nodes: every response carries the log position it
reflects in the trailing metadata `x-vim-position`; a client sends the highest
position it has seen as `x-vim-min-position`, and a node waits (bounded) until
its read model has applied that position before it reads. The client library
does both, so a client that wrote through one node reads its write on any other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import json_format
from google.protobuf.message import Message

from vim.api import auth
from vim.app.commands import CommandContext, CommandRunner, Principal, fingerprint
from vim.errors import FieldViolation, InvalidInput
from vim.eventlog.store import EventLog
from vim.projections.readmodel import ReadModel

POSITION_KEY = "x-vim-position"
MIN_POSITION_KEY = "x-vim-min-position"
CORRELATION_KEY = "x-correlation-id"
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,99}$")

Ctx = grpc.aio.ServicerContext[Any, Any]


@dataclass(slots=True)
class Node:
    log: EventLog
    model: ReadModel
    runner: CommandRunner
    authenticator: auth.Authenticator
    read_wait_s: float = 5.0

    async def caller(self, context: Ctx, allowed: frozenset[str], method: str) -> Principal:
        """Authenticate, authorise, and wait until this node has what the caller saw."""
        metadata = context.invocation_metadata()
        principal = self.authenticator.principal(metadata)
        auth.authorize(principal, allowed, method)
        wanted = _metadata_int(metadata, MIN_POSITION_KEY)
        if wanted:
            await self.model.wait_for(wanted, self.read_wait_s)
        return principal

    def command(
        self, principal: Principal, request: Message, method: str, context: Ctx
    ) -> CommandContext:
        """The command envelope of a mutating request (which has a `request_id` field)."""
        rid = getattr(request, "request_id", "")
        if not REQUEST_ID_RE.match(rid):
            raise InvalidInput(
                "request_id is required: 1-100 letters, digits, . _ : -",
                [FieldViolation("request_id", "1-100 letters, digits, . _ : - expected")],
            )
        body = type(request)()
        body.CopyFrom(request)
        body.ClearField("request_id")
        correlation = _metadata_str(context.invocation_metadata(), CORRELATION_KEY)
        # Every log line of this call (its own task) names the request it belongs to.
        structlog.contextvars.bind_contextvars(correlation_id=correlation or rid, request_id=rid)
        return CommandContext(
            principal=principal,
            request_id=rid,
            fingerprint=fingerprint(method, body.SerializeToString(deterministic=True)),
            correlation_id=correlation or rid,
        )

    def answered(self, context: Ctx, position: int | None = None) -> None:
        """Tell the client which log position this answer reflects."""
        pos = self.model.position if position is None else max(position, 0)
        context.set_trailing_metadata(((POSITION_KEY, str(pos)),))


def view_to(message: Message, view: dict[str, Any]) -> Message:
    """A stored JSON view (proto3 JSON mapping) into its message."""
    return json_format.ParseDict(view, message, ignore_unknown_fields=True)


def _metadata_str(metadata: Any, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def _metadata_int(metadata: Any, key: str) -> int:
    raw = _metadata_str(metadata, key)
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(
            f"{key} must be a log position", [FieldViolation(key, "an integer expected")]
        ) from None
    return max(value, 0)
