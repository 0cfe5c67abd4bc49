"""The read model: every aggregate's current state, folded from the log, in memory.

Each API node keeps its own copy, built by replaying the log at start and then
following it (`Projector`). Nothing in it is node-local truth: any node can be
killed and another answers the same, because all of it is derived from the log.

- `states` maps a stream id to (version, state); a kind's `evolve` folds events
  (registered with `register_kind`). Unknown event types are skipped, so an old
  node keeps working while a newer one writes events it does not know.
- `position` is the last log position applied. Read-your-writes: a node that
  wrote at position p waits until `position >= p` before it answers, and a client
  that hands a node the last position it saw makes that node wait the same way.
- `digest()` hashes the whole model; a rebuild by replay must give the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from vim.domain.base import DomainEvent, parse
from vim.errors import Unavailable
from vim.eventlog.model import RecordedEvent
from vim.eventlog.store import EventLog

log = logging.getLogger(__name__)

Evolve = Callable[[Any, DomainEvent, RecordedEvent], Any]
_KINDS: dict[str, Evolve] = {}


def register_kind(kind: str, evolve: Evolve) -> None:
    """Fold events of streams `<kind>-*` with `evolve(state | None, event, recorded)`."""
    if _KINDS.get(kind, evolve) is not evolve:
        raise ValueError(f"stream kind {kind!r} is registered twice")
    _KINDS[kind] = evolve


@dataclass(frozen=True, slots=True)
class Entry:
    version: int
    state: Any


class ReadModel:
    """States by stream id, by kind; see the module docstring."""

    def __init__(self) -> None:
        self.position = 0
        self._entries: dict[str, Entry] = {}
        self._by_kind: dict[str, dict[str, Entry]] = {}
        self._advanced = asyncio.Event()
        self.skipped = 0
        """Events that could not be folded (malformed data, a bug in an evolve)."""
        self.request_ids: set[str] = set()
        """Request ids of every applied append: a command whose id is here was done."""
        self.correlations: dict[str, str] = {}
        """Per stream, the correlation id of the last event that carried one (the
        request that last touched it; the agents log it with what they do)."""

    def apply(self, e: RecordedEvent) -> None:
        """Fold one event; events must come in position order, each exactly once."""
        if e.position <= self.position:
            return
        self.position = e.position
        if e.metadata.request_id:
            self.request_ids.add(e.metadata.request_id)
        if e.metadata.correlation_id:
            self.correlations[e.stream_id] = e.metadata.correlation_id
        kind = e.stream_kind
        evolve = _KINDS.get(kind)
        if evolve is None:
            return
        old = self._entries.get(e.stream_id)
        try:
            event = parse(e.type, e.data)
            if event is None:
                # An event type this process does not know (another component's fact,
                # or a newer release's): the stream's version still moves, or every
                # later command on it would wait for a version that never comes.
                if old is not None:
                    self._put(kind, e.stream_id, Entry(e.version, old.state))
                return
            state = evolve(old.state if old else None, event, e)
        except Exception:
            # A malformed or unexpected event must not stop the model following the
            # log (the node would then serve ever staler data): it is skipped, counted
            # and logged, and the stream keeps its last good state.
            self.skipped += 1
            log.exception("read model skipped event %d (%s on %s)", e.position, e.type, e.stream_id)
            if old is not None:
                self._put(kind, e.stream_id, Entry(e.version, old.state))
            return
        self._put(kind, e.stream_id, Entry(e.version, state))

    def _put(self, kind: str, stream_id: str, entry: Entry) -> None:
        self._entries[stream_id] = entry
        self._by_kind.setdefault(kind, {})[stream_id] = entry

    def advanced(self) -> None:
        """Wake everyone waiting for a position; called after a batch is applied."""
        ev, self._advanced = self._advanced, asyncio.Event()
        ev.set()

    def get(self, stream_id: str) -> Entry | None:
        return self._entries.get(stream_id)

    def version(self, stream_id: str) -> int:
        entry = self._entries.get(stream_id)
        return entry.version if entry else 0

    def of_kind(self, kind: str) -> Iterator[tuple[str, Entry]]:
        return iter(list(self._by_kind.get(kind, {}).items()))

    async def wait_for(self, position: int, within_s: float = 5.0) -> None:
        """Return once `position` is applied; UNAVAILABLE if the log does not get there."""
        if self.position >= position:
            return  # no timer to arm and cancel
        try:
            async with asyncio.timeout(within_s):
                while self.position < position:
                    await self._advanced.wait()
        except TimeoutError:
            raise Unavailable(
                f"this node has applied the log up to {self.position}, not yet {position}; "
                "retry (another node may be ahead)"
            ) from None

    async def wait_for_version(self, stream_id: str, version: int, within_s: float = 5.0) -> None:
        """Return once the stream has reached `version` here."""
        try:
            async with asyncio.timeout(within_s):
                while self.version(stream_id) < version:
                    await self._advanced.wait()
        except TimeoutError:
            raise Unavailable(f"{stream_id} not yet at version {version} on this node") from None

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.position}".encode())
        for sid in sorted(self._entries):
            entry = self._entries[sid]
            h.update(f"{sid}\0{entry.version}\0{entry.state!r}\0".encode())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self._entries)

    def adopt(self, other: ReadModel) -> None:
        """Take over a rebuilt model's state; both must be at the same position."""
        if other.position != self.position:
            raise ValueError(
                f"cannot adopt a model at {other.position}, this is at {self.position}"
            )
        self._entries = other._entries
        self._by_kind = other._by_kind
        self.request_ids = other.request_ids
        self.correlations = other.correlations
        self.advanced()


class Projector:
    """Keeps a ReadModel following the log; `run()` until `stop()`."""

    def __init__(self, log: EventLog, model: ReadModel | None = None) -> None:
        self._log = log
        self.model = model if model is not None else ReadModel()
        self._task: asyncio.Task[None] | None = None

    async def catch_up(self) -> None:
        """Apply everything up to the head as it is now (at start, before serving)."""
        head = await self._log.head()
        while self.model.position < head:
            batch = await self._log.read_all(after=self.model.position, limit=2000)
            if not batch:
                break
            for e in batch:
                self.model.apply(e)
        self.model.advanced()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="projector")

    async def _follow(self) -> None:
        sub = self._log.subscribe(after=self.model.position)
        pending = 0
        async for e in sub:
            self.model.apply(e)
            pending += 1
            # Wake waiters per event: a writer waits for exactly its position.
            self.model.advanced()
        log.info("projector stopped at %d (%d events applied)", self.model.position, pending)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def replay(log: EventLog, upto: int, model: ReadModel | None = None) -> ReadModel:
    """A model replayed from the log (from `model`'s position, or from 0) up to `upto`."""
    model = model if model is not None else ReadModel()
    while model.position < upto:
        batch = await log.read_all(after=model.position, limit=min(2000, upto - model.position))
        if not batch:
            break
        for e in batch:
            model.apply(e)
    return model


async def rebuild(log: EventLog, live: ReadModel) -> tuple[str, str, int]:
    """Drop the live model's state and rebuild it by replay from position 0.

    Returns (digest before, digest after, position). The replay is brought to the
    live model's position (which may move while it runs) and swapped in without
    an await in between, so no event is lost or applied twice. The digests are
    equal unless the live model had drifted from the log, which would be a bug.
    """
    fresh = await replay(log, live.position)
    while fresh.position < live.position:
        fresh = await replay(log, live.position, fresh)
    before = live.digest()
    live.adopt(fresh)
    return before, live.digest(), live.position
