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

DEFAULT_COMMIT_GATHER_TURNS = 128
MAX_COMMIT_GATHER_TURNS = 100_000


@dataclass(frozen=True, slots=True)
class EventLogConfig:
    """Limits and timings; the defaults suit both the demo and production."""

    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_batch_appends: int = 256
    max_batch_events: int = 5000
    commit_gather_turns: int = DEFAULT_COMMIT_GATHER_TURNS
    """Event loop turns a write may let run first so that appends being made join its
    batch (0: none); it stops after `commit_gather_idle_turns` turns without a new
    append or after `commit_gather_max_s`. See `GroupCommitter`."""
    commit_gather_idle_turns: int = 16
    commit_gather_max_s: float = 0.01
    read_batch: int = 500
    poll_interval_s: float = 0.5
    retry_backoff_s: float = 0.2
    pool_size: int = 10
    connect_timeout_s: float = 5.0
    recent_events: int = 4096
    """How many of its own last appended events a process keeps for its subscriptions."""

    def __post_init__(self) -> None:
        if not 0 <= self.commit_gather_turns <= 100_000:
            raise ValueError(
                f"commit_gather_turns must be 0-100000, not {self.commit_gather_turns}"
            )
        if self.commit_gather_idle_turns < 1:
            raise ValueError(
                f"commit_gather_idle_turns must be at least 1, not {self.commit_gather_idle_turns}"
            )
        if not 0.0 <= self.commit_gather_max_s <= 1.0:  # also refuses NaN
            raise ValueError(
                f"commit_gather_max_s must be within 0-1 s, not {self.commit_gather_max_s}"
            )


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
