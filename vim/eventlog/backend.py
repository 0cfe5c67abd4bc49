"""What a storage backend does for `SqlEventLog`: raw rows in, raw rows out.

The facade (`sql.SqlEventLog`) owns validation, group commit, decoding, upcasting
and subscriptions; a backend owns the connection pool, the SQL and the driver's
errors. Both backends decide a batch with `batching.plan_batch` under their own
lock (a `FOR UPDATE` on the log head row; `BEGIN IMMEDIATE` on SQLite), and
raise only `EventLogUnavailable` or `CommitUnknown` for failures of the database.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from vim.eventlog.batching import EventRow, Outcome, StoredRequest
from vim.eventlog.model import PreparedAppend

EVENT_COLUMNS = (
    "position",
    "stream_id",
    "version",
    "event_id",
    "type",
    "schema_version",
    "data",
    "metadata",
    "recorded_at",
)
REQUEST_COLUMNS = ("request_id", "fingerprint", "result", "position", "recorded_at")


class CommitUnknown(Exception):
    """COMMIT itself failed: the batch may or may not be durable."""


class Backend(Protocol):
    announces_head: bool
    """Whether `follow` tells of other processes' appends as they commit (PostgreSQL's
    NOTIFY); without it they are seen by polling, and by reading after own appends."""

    async def write(self, batch: Sequence[PreparedAppend]) -> list[Outcome]:
        """Decide and write one batch in one transaction."""

    async def events_after(
        self, after: int, limit: int, types: Collection[str] | None
    ) -> list[EventRow]: ...

    async def stream_events(
        self, stream_id: str, after_version: int, limit: int | None
    ) -> list[EventRow]: ...

    async def stream_version(self, stream_id: str) -> int: ...

    async def head(self) -> int: ...

    async def fencing_token(self, role: str) -> int: ...

    async def lookup_request(self, request_id: str) -> StoredRequest | None: ...

    async def follow(self, wake: Callable[[int | None], None], stopped: Callable[[], bool]) -> None:
        """Call `wake(head)` whenever another process appended up to `head` (or
        `wake(None)` when something may have been appended); return when stopped."""

    async def close(self) -> None: ...
