"""The event log's interface, shared by every backend and every caller.

Callers (command handlers, projections, reactors, the API's Watch) depend on this
Protocol only; `vim.eventlog.sql.SqlEventLog` implements it on PostgreSQL and on
SQLite, and the contract suite in tests/contract runs against both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass
from typing import Protocol

from vim.eventlog.batching import StoredRequest
from vim.eventlog.model import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    AppendRequest,
    AppendResult,
    RecordedEvent,
)


@dataclass(frozen=True, slots=True)
class EventLogConfig:
    """Limits and timings; the defaults suit both the demo and production."""

    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_batch_appends: int = 256
    max_batch_events: int = 5000
    read_batch: int = 500
    poll_interval_s: float = 0.5
    retry_backoff_s: float = 0.2
    pool_size: int = 10
    connect_timeout_s: float = 5.0
    recent_events: int = 4096
    """How many of its own last appended events a process keeps for its subscriptions."""


class Subscription(Protocol):
    """Events after a position, in position order, catching up then following live."""

    @property
    def position(self) -> int:
        """The position of the last event delivered: resume from here."""

    def __aiter__(self) -> AsyncIterator[RecordedEvent]: ...

    async def close(self) -> None: ...


class EventLog(Protocol):
    """Append-only streams with a global order; see docs/EVENTLOG.md."""

    async def append(self, request: AppendRequest) -> AppendResult:
        """Append atomically; raises VersionConflict, FencedOut, IdempotencyConflict,
        InvalidEvent or EventLogUnavailable."""

    async def read_stream(
        self, stream_id: str, *, after_version: int = 0, limit: int | None = None
    ) -> list[RecordedEvent]: ...

    async def read_all(
        self, *, after: int = 0, limit: int = 500, types: Collection[str] | None = None
    ) -> list[RecordedEvent]: ...

    async def stream_version(self, stream_id: str) -> int: ...

    async def head(self) -> int: ...

    async def fencing_token(self, role: str) -> int: ...

    async def lookup_request(self, request_id: str) -> StoredRequest | None: ...

    def subscribe(
        self,
        *,
        after: int = 0,
        types: Collection[str] | None = None,
        kinds: Collection[str] | None = None,
    ) -> Subscription: ...

    async def close(self) -> None: ...
