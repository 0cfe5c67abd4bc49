"""The alarm reactor: follows the fault facts in the log and records alarms, fenced.

It runs inside the elected fault manager (`vim-faultd` runs it while it leads,
as a companion), and does two things while `leadership()` names a term:

1. Facts -> alarms. It subscribes to the fact types the rules read
   (`rules.FACT_TYPES`) after its checkpoint and, per fact, decides against the
   read model (`rules.decide`) and appends the alarm events in one atomic append,
   at the alarm streams' versions, with the term's fencing token and the request
   id `alarm-reactor:<fact position>`. The checkpoint is derived from the alarms
   themselves: the greatest `sourcePosition` of any alarm in the read model
   (every alarm event carries the position of the fact it came from). Facts after
   it made no alarm change yet, so a restarted reactor or a new leader resumes
   there, and a fact decided twice (an old leader's append landed but was not yet
   seen) is answered by the log from its request id: never a duplicate alarm.
2. Ageing (`vim.alarms.ageing`): every `ageing_interval_s`, archives and purges
   the cleared alarms that are due, each with a deterministic request id.

A version conflict (an operator acknowledged the alarm meanwhile, or the other
task moved it) waits for the read model to see the winner and decides again.
`FencedOut` ends `run()`: this process no longer leads, and must not write.
Each decision sees every earlier one: the reactor folds what it appended into
its own view of the alarms (and remembers the stream versions it made), and
rebuilds that view from the read model only once the model has applied every
append so far (at start, after a conflict or a repeated request id).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ha.election.base import Leadership
from vim.alarms import ageing, rules
from vim.domain import alarm as al
from vim.domain import server as srv
from vim.domain.base import DomainEvent, parse
from vim.domain.reservation import rfc3339
from vim.errors import FencedOut, IdempotencyConflict, VersionConflict
from vim.eventlog.model import AppendRequest, Metadata, NewEvent, RecordedEvent, StreamAppend
from vim.eventlog.store import EventLog
from vim.projections.readmodel import ReadModel, register_kind

log = logging.getLogger(__name__)

register_kind(al.KIND, al.evolve)
register_kind(srv.KIND, srv.evolve)

MAX_ATTEMPTS = 20
RETRY_S = 1.0
ACTOR = "alarm-reactor"


class NotLeading(Exception):
    """The term ended (or `stop()` was called) before an append: nothing was written."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ReactorConfig:
    policy: ageing.AgeingPolicy = field(default_factory=ageing.AgeingPolicy.from_env)
    ageing_interval_s: float = 60.0
    wait_s: float = 10.0
    """How long to wait for the read model to apply an append before giving up."""


@dataclass(slots=True)
class ReactorStats:
    facts: int = 0
    appends: int = 0
    replayed: int = 0
    conflicts: int = 0
    archived: int = 0
    purged: int = 0


def checkpoint(model: ReadModel) -> int:
    """The greatest fact position any alarm came from (0: none yet)."""
    best = 0
    for _, entry in model.of_kind(al.KIND):
        if isinstance(entry.state, al.Alarm):
            best = max(best, entry.state.source_position)
    return best


def book(model: ReadModel) -> rules.AlarmBook:
    """The rules' view of the read model: its alarms and its servers' tenants."""

    def tenant_of(server_id: str) -> str:
        entry = model.get(srv.stream(server_id))
        return entry.state.tenant_id if entry is not None else ""

    return rules.AlarmBook((e.state for _, e in model.of_kind(al.KIND)), tenant_of)


class AlarmReactor:
    """See the module docstring; the fault manager's companion hook builds it."""

    def __init__(
        self,
        log: EventLog,
        model: ReadModel,
        leadership: Callable[[], Leadership | None],
        *,
        config: ReactorConfig | None = None,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self._log = log
        self._model = model
        self._leadership = leadership
        self.config = config or ReactorConfig()
        self._clock = clock
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self._written = 0
        self._book: rules.AlarmBook | None = None
        """The rules' view: this reactor's own appends are folded into it; None: rebuild
        from the read model (at start, and after a conflict or a repeated request)."""
        self._versions: dict[str, int] = {}
        self.position = 0
        """The last fact position handled."""
        self.stats = ReactorStats()

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> None:
        """Follow facts and age alarms until `stop()`, loss of leadership or fencing.

        Any other failure (the log unreachable, the read model lagging) restarts the
        work from the derived checkpoint after `RETRY_S`, for as long as the term lasts.
        """
        while self._term() is not None:
            try:
                await self._run_term()
            except (FencedOut, NotLeading) as exc:
                log.warning("alarm reactor stopped: %s", exc)
                return
            except Exception:
                log.exception("alarm reactor failed; resuming from its checkpoint")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RETRY_S):
                        await self._stopping.wait()

    async def _run_term(self) -> None:
        await self._model.wait_for(await self._log.head(), self.config.wait_s)
        self._book, self._versions = None, {}
        self.position = checkpoint(self._model)
        tasks = [
            asyncio.create_task(self._follow(), name="alarm-facts"),
            asyncio.create_task(self._age_periodically(), name="alarm-ageing"),
            asyncio.create_task(self._stopping.wait(), name="alarm-stop"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = None if t.cancelled() else t.exception()
                if exc is not None:
                    raise exc
        finally:
            for t in tasks:
                t.cancel()
            # gather, not `suppress(CancelledError)`: a cancellation of run() itself
            # must not be swallowed while the children end.
            await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self) -> None:
        self._stopping.set()

    def _term(self) -> Leadership | None:
        return None if self._stopping.is_set() else self._leadership()

    async def _follow(self) -> None:
        sub = self._log.subscribe(after=self.position, types=sorted(rules.FACT_TYPES))
        try:
            async for recorded in sub:
                if self._term() is None:
                    return
                await self.handle(recorded)
        finally:
            await sub.close()

    async def _age_periodically(self) -> None:
        while self._term() is not None:
            await self.age()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.ageing_interval_s):
                    await self._stopping.wait()

    # -- facts -----------------------------------------------------------------------------

    async def catch_up(self) -> int:
        """Handle every fact up to the head as it is now (tests, one-shot runs)."""
        await self._model.wait_for(await self._log.head(), self.config.wait_s)
        self.position = max(self.position, checkpoint(self._model))
        while True:
            batch = await self._log.read_all(
                after=self.position, limit=500, types=sorted(rules.FACT_TYPES)
            )
            if not batch:
                await self._model.wait_for(self._written, self.config.wait_s)
                return self.position
            for recorded in batch:
                await self.handle(recorded)

    async def handle(self, recorded: RecordedEvent) -> None:
        """Decide and append the alarm changes of one fact (idempotent by position)."""
        fact = parse(recorded.type, recorded.data)
        if fact is not None and recorded.position > self.position:
            async with self._lock:
                await self._decide_and_append(
                    lambda b, now: rules.decide(fact, recorded.position, now, b),
                    f"{ACTOR}:{recorded.position}",
                    recorded,
                )
        self.position = max(self.position, recorded.position)
        self.stats.facts += 1

    async def _decide_and_append(
        self,
        decide: Callable[[rules.AlarmBook, str], rules.Changes],
        request_id: str,
        cause: RecordedEvent | None,
    ) -> bool:
        for _ in range(MAX_ATTEMPTS):
            if self._book is None:
                # Rebuilt from the read model once it has every append made so far.
                await self._model.wait_for(self._written, self.config.wait_s)
                self._book = book(self._model)
            changes = decide(self._book, rfc3339(self._clock()))
            if not changes:
                return False
            current, self._book = self._book, None  # until the outcome is known
            try:
                wrote = await self._append(changes, request_id, cause)
            except VersionConflict as conflict:
                self.stats.conflicts += 1
                await self._model.wait_for_version(
                    conflict.stream_id, conflict.actual, self.config.wait_s
                )
                continue
            if wrote:
                # Exactly what was written: fold it in instead of waiting for the model.
                current.apply(changes)
                self._book = current
            return True
        raise RuntimeError(f"{request_id}: still conflicting after {MAX_ATTEMPTS} attempts")

    def _version(self, stream_id: str) -> int:
        """The newest version known: the read model's, or this reactor's own last append."""
        return max(self._model.version(stream_id), self._versions.get(stream_id, 0))

    async def _append(
        self, changes: Mapping[str, Sequence[DomainEvent]], rid: str, cause: RecordedEvent | None
    ) -> bool:
        """Append the changes; True if they were written now (not a repeat of the request)."""
        term = self._term()
        if term is None:
            raise NotLeading("the alarm reactor no longer acts for a leader")
        streams = [
            StreamAppend(
                al.stream(aid),
                self._version(al.stream(aid)),
                [NewEvent(e.type, e.to_data(), e.SCHEMA_VERSION) for e in events],
            )
            for aid, events in sorted(changes.items())
        ]
        request = AppendRequest(
            streams=streams,
            metadata=Metadata(
                actor=f"{ACTOR}:{term.holder}",
                request_id=rid,
                correlation_id=rid,
                causation_id=cause.event_id if cause is not None else None,
                fencing_role=term.role,
                fencing_token=term.token,
            ),
            fingerprint=rid,
        )
        try:
            result = await self._log.append(request)
        except IdempotencyConflict:
            # Recorded before with another body: the first decision stands.
            stored = await self._log.lookup_request(rid)
            self.stats.replayed += 1
            done = json.loads(stored.result_json)["last_position"] if stored else 0
            self._written = max(self._written, int(done))
            return False
        self._written = max(self._written, result.last_position)
        if result.replayed:
            self.stats.replayed += 1
            return False
        self.stats.appends += 1
        for stream_id, version in result.versions.items():
            self._versions[stream_id] = max(self._versions.get(stream_id, 0), version)
        return True

    # -- ageing ----------------------------------------------------------------------------

    async def age(self) -> int:
        """Archive and purge what the policy says is due now; the number of alarms aged."""
        now = self._clock()
        aged = 0
        await self._model.wait_for(self._written, self.config.wait_s)
        for aid in sorted(ageing.due(self._states(), now, self.config.policy)):
            if self._term() is None:
                break
            async with self._lock:

                def decide(_b: rules.AlarmBook, _now: str, aid: str = aid) -> rules.Changes:
                    entry = self._model.get(al.stream(aid))
                    states = [] if entry is None else [entry.state]
                    return ageing.due(states, now, self.config.policy)

                events = ageing.due(self._states_of(aid), now, self.config.policy).get(aid, [])
                kinds = "+".join(sorted(e.type for e in events)) or "none"
                if await self._decide_and_append(decide, f"alarm-ageing:{aid}:{kinds}", None):
                    aged += 1
                    self.stats.archived += sum(isinstance(e, al.AlarmArchived) for e in events)
                    self.stats.purged += sum(isinstance(e, al.AlarmPurged) for e in events)
        await self._model.wait_for(self._written, self.config.wait_s)
        return aged

    def _states(self) -> list[al.AlarmEntry]:
        return [e.state for _, e in self._model.of_kind(al.KIND)]

    def _states_of(self, aid: str) -> list[al.AlarmEntry]:
        entry = self._model.get(al.stream(aid))
        return [] if entry is None else [entry.state]
