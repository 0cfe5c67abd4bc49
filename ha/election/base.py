"""What every elector shares: the term, its deadline, keepalive and step-down.

`LeaseElector` holds the rules that make a term safe whatever the backend:

* ``is_leader()`` is true only while this process can prove its lease alive by
  its own monotonic clock: ``deadline = send time of the last successful
  refresh + TTL - safety margin``. The send time is taken *before* the request
  leaves, so the backend's own expiry (counted from when it processed the
  request) is always later than our deadline. Once the deadline passes the
  elector steps down even if the backend cannot be reached, sets
  ``leader_lost``, and never becomes leader again without a new ``campaign()``
  (a new term, a larger token).
* Keepalive runs every ``keepalive_interval_s`` (TTL/3 by default), so a term
  survives two lost refreshes; a refresh that runs late is logged as a
  warning, a failed one is retried until the deadline.
* Every wait is bounded by the injected :class:`Clock`, so the deadline fires
  even while an RPC hangs, and the in-process elector is tested with a fake
  clock.
* ``resign()`` stops acting first (local state, ``leader_lost``) and only then
  releases the term remotely (``_release``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import aetcd
from aetcd import rpc as etcd_rpc

from ha.errors import CoordinatorUnavailable, ElectorClosed

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT: tuple[type[BaseException], ...] = (
    aetcd.ClientError,
    etcd_rpc.RpcError,
    etcd_rpc.BaseError,
    TimeoutError,
    OSError,
)
"""What an etcd call may raise when the endpoint, not our request, is at fault."""
RELEASE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT, CoordinatorUnavailable)


@dataclass(frozen=True, slots=True)
class Leadership:
    """One term of one role: who leads, since when, and its fencing token."""

    role: str
    holder: str
    token: int
    """The leader key's create revision; strictly larger for every later term."""
    since: datetime
    """When the holder won (wall clock, informative only; never used for safety)."""
    lease_id: int
    ttl_s: float
    backend: str = "etcd"

    @property
    def term(self) -> int:
        """The term's identity; the fencing token doubles as the term number."""
        return self.token


class Clock(Protocol):
    """Time as the elector sees it; tests inject a fake one."""

    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clock: ``time.monotonic``, UTC wall time and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        """Seconds on the monotonic clock."""
        return time.monotonic()

    def now(self) -> datetime:
        """The current UTC time."""
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` (at least one loop turn)."""
        await asyncio.sleep(max(0.0, seconds))


class Elector(Protocol):
    """Campaign for, hold and give up the leadership of one role."""

    @property
    def role(self) -> str: ...

    @property
    def candidate_id(self) -> str: ...

    @property
    def leadership(self) -> Leadership | None:
        """The term this elector holds and can still prove, else None."""
        ...

    @property
    def leader_lost(self) -> asyncio.Event:
        """Set when a held term ends (deadline, lease gone, resign, close); cleared on a win."""
        ...

    async def campaign(self) -> Leadership:
        """Block until this candidate leads; return the new term."""
        ...

    async def observe(self) -> Leadership | None:
        """Who leads the role now (any candidate), or None."""
        ...

    def watch(self) -> AsyncIterator[Leadership | None]:
        """The current leadership, then every change of it."""
        ...

    def is_leader(self) -> bool:
        """True only while this process can prove its lease alive."""
        ...

    async def resign(self) -> None:
        """Stop leading now and let another candidate take over."""
        ...

    async def close(self) -> None:
        """Resign if leading and release every resource; idempotent."""
        ...


@dataclass(slots=True)
class _Term:
    """A held term: its leadership, last refresh send time and local deadline."""

    leadership: Leadership
    last_sent: float
    deadline: float


class LeaseElector:
    """Deadline, keepalive and step-down logic shared by the etcd and local electors.

    Subclasses provide ``_refresh`` (renew the lease; return its TTL, or None
    when the lease is gone), ``_still_ours`` and ``_release``.
    """

    backend = "base"

    def __init__(
        self,
        role: str,
        candidate_id: str,
        *,
        ttl_s: float,
        keepalive_interval_s: float | None,
        safety_margin_s: float | None,
        clock: Clock,
    ) -> None:
        interval = ttl_s / 3 if keepalive_interval_s is None else keepalive_interval_s
        margin = ttl_s / 4 if safety_margin_s is None else safety_margin_s
        if not 0 < margin < ttl_s or not 0 < interval < ttl_s - margin:
            raise ValueError(
                f"need 0 < safety margin ({margin}) < ttl ({ttl_s}) and "
                f"0 < keepalive interval ({interval}) < ttl - margin"
            )
        self._role = role
        self._candidate_id = candidate_id
        self._ttl = ttl_s
        self._interval = interval
        self._margin = margin
        self._clock = clock
        self._lost = asyncio.Event()
        self._term: _Term | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # ------------------------------------------------------------- interface
    @property
    def role(self) -> str:
        """The role this elector campaigns for."""
        return self._role

    @property
    def candidate_id(self) -> str:
        """This candidate's identity, stored as the key's holder."""
        return self._candidate_id

    @property
    def leader_lost(self) -> asyncio.Event:
        """Set when a held term ends; cleared when a new term is won."""
        return self._lost

    @property
    def leadership(self) -> Leadership | None:
        """The held term if its deadline has not passed, else None."""
        return self._term.leadership if self.is_leader() and self._term else None

    def deadline_remaining(self) -> float:
        """Seconds until the local deadline (negative or zero when not leading)."""
        term = self._term
        return 0.0 if term is None else term.deadline - self._clock.monotonic()

    def is_leader(self) -> bool:
        """True only while the last refresh is recent enough to prove the lease alive."""
        term = self._term
        if term is None:
            return False
        if self._clock.monotonic() >= term.deadline:
            self._step_down(term, "lease deadline passed", release=True)
            return False
        return True

    async def resign(self) -> None:
        """Stop acting as leader at once, then delete our key and revoke our lease."""
        term = self._term
        if term is None:
            return
        self._step_down(term, "resigned", release=False)
        await self._release_quietly(term.leadership)

    async def close(self) -> None:
        """Resign if leading, cancel background work and release resources; idempotent."""
        if self._closed:
            return
        await self.resign()
        self._closed = True
        tasks = list(self._tasks)
        if tasks:
            # Give pending lease releases a moment; a lease not revoked expires by TTL.
            _, pending = await asyncio.wait(tasks, timeout=self._ttl)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._close_backend()

    # --------------------------------------------------------- term handling
    def _check_open(self) -> None:
        if self._closed:
            raise ElectorClosed(f"elector {self._candidate_id} for {self._role} is closed")

    def _start_term(self, leadership: Leadership, sent_at: float, granted_ttl: float) -> bool:
        """Record a won term (deadline counted from ``sent_at``); False if already expired."""
        deadline = sent_at + min(granted_ttl, self._ttl) - self._margin
        term = _Term(leadership, last_sent=sent_at, deadline=deadline)
        self._term = term
        if not self.is_leader():
            return False
        self._lost.clear()
        self._keepalive = asyncio.create_task(
            self._keep_alive(term), name=f"keepalive {self._role}/{self._candidate_id}"
        )
        log.info(
            "%s leads %s with token %d (lease %x, deadline in %.2fs)",
            self._candidate_id,
            self._role,
            leadership.token,
            leadership.lease_id,
            deadline - self._clock.monotonic(),
        )
        return True

    def _step_down(self, term: _Term, reason: str, *, release: bool) -> None:
        """Forget ``term`` (if still current), signal ``leader_lost``, maybe release remotely."""
        if self._term is not term:
            return
        self._term = None
        self._lost.set()
        level = logging.INFO if reason == "resigned" else logging.WARNING
        log.log(
            level,
            "%s stops leading %s (token %d): %s",
            self._candidate_id,
            self._role,
            term.leadership.token,
            reason,
        )
        task, self._keepalive = self._keepalive, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if release:
            self._spawn(self._release_quietly(term.leadership))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, owned by this elector (awaited by close)."""
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no running loop: nothing can be sent anyway
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bounded(self, work: Awaitable[T], budget: float) -> T:
        """Await ``work`` for at most ``budget`` seconds of the injected clock."""
        if budget <= 0:
            if isinstance(work, Coroutine):
                work.close()
            raise TimeoutError
        job = asyncio.ensure_future(work)
        timer = asyncio.ensure_future(self._clock.sleep(budget))
        try:
            await asyncio.wait({job, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
            if not job.done():
                job.cancel()
                with contextlib.suppress(BaseException):
                    await job
        if job.cancelled():
            raise TimeoutError
        return job.result()

    async def _keep_alive(self, term: _Term) -> None:
        """Refresh the lease every interval until the term ends or its deadline passes."""
        failures = 0
        while self._term is term:
            now = self._clock.monotonic()
            if now >= term.deadline:
                self._step_down(term, "lease deadline passed", release=True)
                return
            due = term.last_sent + self._interval
            if now < due:
                await self._clock.sleep(min(due, term.deadline) - now)
                continue
            sent = self._clock.monotonic()
            budget = min(term.deadline - sent, max(self._interval, 0.5))
            try:
                ttl = await self._bounded(self._refresh(term.leadership), budget)
            except TRANSIENT as exc:
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "lease refresh for %s failed: %r; retrying", self._role, exc)
                retry = min(self._interval / 4, 0.2)
                await self._clock.sleep(min(retry, max(0.0, term.deadline - sent)))
                continue
            if self._term is not term:
                return
            if ttl is None:
                self._step_down(term, "lease no longer exists", release=False)
                return
            self._refreshed(term, sent, ttl, failures)
            failures = 0
            if not await self._still_ours(term.leadership):
                self._step_down(term, "leader key deleted or replaced", release=True)
                return

    def _refreshed(self, term: _Term, sent: float, ttl: float, failures: int) -> None:
        """Move the deadline after a successful refresh; warn when it came late."""
        gap = sent - term.last_sent
        if gap > 1.5 * self._interval:
            log.warning(
                "lease refresh for %s ran late: %.2fs since the previous one "
                "(interval %.2fs, %d failed attempts, %.2fs were left)",
                self._role,
                gap,
                self._interval,
                failures,
                term.deadline - sent,
            )
        term.last_sent = sent
        term.deadline = sent + min(ttl, self._ttl) - self._margin

    async def _release_quietly(self, leadership: Leadership) -> None:
        try:
            await self._release(leadership)
        except RELEASE_ERRORS as exc:
            log.warning(
                "could not release %s term %d: %r (it expires by TTL)",
                self._role,
                leadership.token,
                exc,
            )

    # ------------------------------------------------------- backend hooks
    async def _refresh(self, leadership: Leadership) -> float | None:
        raise NotImplementedError

    async def _still_ours(self, leadership: Leadership) -> bool:
        raise NotImplementedError

    async def _release(self, leadership: Leadership) -> None:
        raise NotImplementedError

    async def _close_backend(self) -> None:
        return None
