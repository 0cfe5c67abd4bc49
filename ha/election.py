"""Leader election with fencing tokens: etcd in production, in-process when embedded.

One role (``scheduler``, ``fault_manager``, ``sdn``) has at most one leader that
may act. A leader is the holder of the key ``<prefix><role>`` in etcd, created
in a transaction ``if create_revision(key) == 0 then put(key, lease)``, so the
key's create revision identifies the term. That revision is the *fencing token*:
it only grows from one term to the next, the leader sends it with every append,
and the event log refuses (in the append's own transaction) a token older than
the newest it has seen for the role. A leader that was paused and resumes after
its lease expired can therefore not write, whatever it believes.

Invariants and failure modes:

* ``is_leader()`` is true only while this process can prove its lease alive by
  its own monotonic clock: ``deadline = send time of the last successful
  refresh + TTL - safety margin``. The send time is taken *before* the request
  leaves, so etcd's own expiry (counted from when it processed the request) is
  always later than our deadline. Once the deadline passes the elector steps
  down even if etcd cannot be reached, sets ``leader_lost``, and never becomes
  leader again without a new ``campaign()`` (a new term, a larger token).
* Keepalive runs every ``keepalive_interval_s`` (TTL/3 by default), so a term
  survives two lost refreshes; a refresh that runs late is logged as a warning,
  a failed refresh rotates to the next endpoint (one aetcd client per endpoint,
  rebuilt after an error) and is retried until the deadline.
* Every wait is bounded by the injected :class:`Clock`, so the deadline fires
  even while an RPC hangs, and the in-process elector is tested with a fake
  clock.
* ``resign()`` stops acting first (local state, ``leader_lost``) and only then
  deletes the key, in a transaction guarded by the key's create revision (it
  never deletes a successor's key), and revokes the lease.
* A lease we may have left behind (a transaction whose outcome is unknown, a
  step-down while etcd was unreachable) is remembered and revoked when etcd
  answers again, so a re-campaign does not wait for our own stale key.

A faster failure signal (e.g. a failure detector that revokes a dead leader's
lease) can later be added outside this module: the follower already reacts to
the key's deletion through a watch, whatever deleted it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import aetcd
from aetcd import rpc as etcd_rpc
from aetcd import transactions as etcd_txn

from ha.errors import CoordinatorUnavailable, ElectorClosed

__all__ = [
    "Clock",
    "Elector",
    "EtcdElector",
    "Leadership",
    "LocalElection",
    "LocalElector",
    "SystemClock",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

_TRANSIENT: tuple[type[BaseException], ...] = (
    aetcd.ClientError,
    etcd_rpc.RpcError,
    etcd_rpc.BaseError,
    TimeoutError,
    OSError,
)
"""What an etcd call may raise when the endpoint, not our request, is at fault."""
_RELEASE_ERRORS: tuple[type[BaseException], ...] = (*_TRANSIENT, CoordinatorUnavailable)


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


class _LeaseElector:
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
            except _TRANSIENT as exc:
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
        except _RELEASE_ERRORS as exc:
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


# =================================================================== etcd
def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    hostport = endpoint.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


class _Endpoints:
    """One aetcd client per endpoint; the current one is used until it fails.

    aetcd talks to one endpoint per client and does not fail over, so on any
    transport error the client is retired (a fresh one is built on next use)
    and the next endpoint becomes current. A retired client is closed only
    after ``linger_s``: closing a gRPC channel cancels the calls still running
    on it, and another coroutine (keepalive, a watch) may be one of them.
    """

    def __init__(self, endpoints: Sequence[str], rpc_timeout_s: float, linger_s: float) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._addrs = [_parse_endpoint(e) for e in endpoints]
        self._clients: list[aetcd.Client | None] = [None] * len(self._addrs)
        self._current = 0
        self._linger_s = linger_s
        self._retired: dict[aetcd.Client, asyncio.Task[None]] = {}
        self._closed = False
        self.rpc_timeout_s = rpc_timeout_s

    def current(self) -> tuple[int, aetcd.Client]:
        """Index and client of the endpoint in use (built if needed)."""
        if self._closed:
            raise ElectorClosed("the elector's etcd clients are closed")
        i = self._current
        client = self._clients[i]
        if client is None:
            host, port = self._addrs[i]
            client = aetcd.Client(host=host, port=port)
            self._clients[i] = client
        return i, client

    def endpoint(self, i: int) -> str:
        """``host:port`` of endpoint ``i``."""
        host, port = self._addrs[i]
        return f"{host}:{port}"

    def failed(self, i: int, client: aetcd.Client, exc: BaseException) -> None:
        """Retire ``client`` (if still endpoint ``i``'s) and move on to the next endpoint."""
        if self._clients[i] is not client:
            return  # someone else retired it already
        self._clients[i] = None
        if self._current == i:
            self._current = (i + 1) % len(self._addrs)
        log.debug(
            "etcd endpoint %s failed (%r); now using %s",
            self.endpoint(i),
            exc,
            self.endpoint(self._current),
        )
        task = asyncio.get_running_loop().create_task(self._close_later(client))
        self._retired[client] = task

    async def _close_later(self, client: aetcd.Client) -> None:
        try:
            await asyncio.sleep(self._linger_s)
        finally:
            self._retired.pop(client, None)
            await _close_client(client)

    async def call(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run ``op`` on the current endpoint, then the next ones; else CoordinatorUnavailable."""
        last: BaseException | None = None
        for _ in range(len(self._addrs)):
            i, client = self.current()
            try:
                async with asyncio.timeout(self.rpc_timeout_s):
                    return await op(client)
            except _TRANSIENT as exc:
                last = exc
                self.failed(i, client, exc)
        raise CoordinatorUnavailable(f"no etcd endpoint answered: {last!r}") from last

    async def close(self) -> None:
        """Close every client, retired ones included; no new client is built afterwards."""
        self._closed = True
        clients, self._clients = self._clients, [None] * len(self._addrs)
        retired = list(self._retired.values())
        for task in retired:
            task.cancel()
        await asyncio.gather(*retired, return_exceptions=True)
        for client in clients:
            if client is not None:
                await _close_client(client)


async def _close_client(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await client.close()


async def _range(client: aetcd.Client, key: bytes) -> Any:
    """A linearizable Range on ``key``: the raw response carries the store revision."""
    await client.connect()
    return await client.kvstub.Range(etcd_rpc.RangeRequest(key=key), metadata=client.metadata)


def _revoker(lease_id: int) -> Callable[[aetcd.Client], Awaitable[None]]:
    """An operation revoking ``lease_id``; a lease already gone counts as revoked."""

    async def revoke(client: aetcd.Client) -> None:
        try:
            await client.revoke_lease(lease_id)
        except aetcd.ClientError as exc:
            if "lease not found" not in str(exc):
                raise

    return revoke


class EtcdElector(_LeaseElector):
    """Leader election on an etcd cluster: lease + transaction on the key's create revision."""

    backend = "etcd"

    def __init__(
        self,
        endpoints: Sequence[str],
        role: str,
        candidate_id: str,
        *,
        ttl_s: int = 2,
        keepalive_interval_s: float | None = None,
        safety_margin_s: float | None = None,
        prefix: str = "/vim/election/",
        rpc_timeout_s: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(
            role,
            candidate_id,
            ttl_s=float(ttl_s),
            keepalive_interval_s=keepalive_interval_s,
            safety_margin_s=safety_margin_s,
            clock=clock or SystemClock(),
        )
        self._lease_ttl = int(ttl_s)
        self._key = f"{prefix}{role}".encode()
        self._pool = _Endpoints(endpoints, rpc_timeout_s, linger_s=rpc_timeout_s + ttl_s + 1.0)
        self._abandoned: set[int] = set()
        """Our leases that may still hold the key: revoked before the next attempt."""

    @property
    def key(self) -> bytes:
        """The etcd key whose holder leads the role."""
        return self._key

    # ------------------------------------------------------------ campaign
    async def campaign(self) -> Leadership:
        """Block until this candidate holds the key; return the new term."""
        self._check_open()
        if self.is_leader() and self._term is not None:
            return self._term.leadership
        failures = 0
        while True:
            self._check_open()
            try:
                await self._revoke_abandoned()
                outcome = await self._try_acquire()
            except CoordinatorUnavailable as exc:
                failures += 1
                log.warning("campaign for %s: %s", self._role, exc)
                await self._clock.sleep(min(0.1 * 2**failures, self._ttl / 2))
                continue
            failures = 0
            if isinstance(outcome, Leadership):
                return outcome
            await self._wait_for_event(after_revision=outcome)

    async def _try_acquire(self) -> Leadership | int:
        """One attempt: our term, or the store revision at which someone else held the key."""
        sent = self._clock.monotonic()
        lease = await self._pool.call(lambda c: c.lease(self._lease_ttl))
        won = False
        try:
            since = self._clock.now()
            value = json.dumps({"holder": self._candidate_id, "since": since.isoformat()})
            succeeded, responses = await self._pool.call(
                lambda c: c.transaction(
                    compare=[etcd_txn.Create(self._key) == 0],
                    success=[
                        etcd_txn.Put(self._key, value.encode(), lease=lease.id),
                        etcd_txn.Get(self._key),
                    ],
                    failure=[etcd_txn.Get(self._key)],
                )
            )
            kv = responses[-1][0][1]
            if not succeeded and kv.lease != lease.id:
                return int(kv.header.revision)
            # Won, or won by an earlier try of this same transaction whose answer was lost
            # (the pool retried it on another endpoint): the key carries our lease.
            leadership = self._leadership(kv)
            won = self._start_term(leadership, sent, float(lease.ttl))
            if won:
                return leadership
            return int(kv.header.revision)
        finally:
            if not won:
                # Lost, expired, failed or cancelled: the lease must not linger. If the
                # transaction's outcome is unknown it may even hold the key.
                self._abandoned.add(lease.id)
                self._spawn(self._revoke_abandoned_quietly())

    async def _revoke_abandoned(self) -> None:
        for lease_id in sorted(self._abandoned):
            await self._pool.call(_revoker(lease_id))
            self._abandoned.discard(lease_id)

    async def _revoke_abandoned_quietly(self) -> None:
        with contextlib.suppress(CoordinatorUnavailable, *_TRANSIENT):
            await self._revoke_abandoned()

    async def _wait_for_event(self, after_revision: int) -> None:
        """Return on the first change of the key after ``after_revision``, or after one TTL.

        The watch starts at ``after_revision + 1``, so a deletion between our read
        and the watch is not missed; the TTL bound re-reads the key even if a
        watch stream stalls silently.
        """
        try:
            i, client = self._pool.current()
        except ElectorClosed:
            return
        try:
            async with asyncio.timeout(self._pool.rpc_timeout_s):
                watch = await client.watch(self._key, start_revision=after_revision + 1)
        except _TRANSIENT as exc:
            self._pool.failed(i, client, exc)
            return
        try:
            async with asyncio.timeout(self._ttl):
                async for _event in watch:
                    return
        except TimeoutError:
            return
        except aetcd.RevisionCompactedError:
            return
        except _TRANSIENT as exc:
            self._pool.failed(i, client, exc)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await watch.cancel()

    # ------------------------------------------------------------- observe
    async def observe(self) -> Leadership | None:
        """Who holds the key now (a linearizable read); CoordinatorUnavailable if unreachable."""
        self._check_open()
        leadership, _ = await self._read()
        return leadership

    async def _read(self) -> tuple[Leadership | None, int]:
        response = await self._pool.call(lambda c: _range(c, self._key))
        revision = int(response.header.revision)
        if not response.kvs:
            return None, revision
        return self._leadership(response.kvs[0]), revision

    async def watch(self) -> AsyncIterator[Leadership | None]:
        """Yield the current leadership, then each change (new holder or none)."""
        last: tuple[str, int] | bool | None = False  # False: nothing yielded yet
        failures = 0
        while not self._closed:
            try:
                current, revision = await self._read()
            except ElectorClosed:
                return
            except CoordinatorUnavailable as exc:
                failures += 1
                log.debug("watch on %s: %s", self._role, exc)
                await self._clock.sleep(min(0.1 * 2**failures, self._ttl / 2))
                continue
            failures = 0
            ident = None if current is None else (current.holder, current.token)
            if ident != last:
                last = ident
                yield current
            await self._wait_for_event(after_revision=revision)

    def _leadership(self, kv: Any) -> Leadership:
        raw = bytes(kv.value).decode(errors="replace")
        try:
            data = json.loads(raw)
            holder, since = str(data["holder"]), datetime.fromisoformat(data["since"])
        except (ValueError, KeyError, TypeError):
            holder, since = raw, self._clock.now()
        return Leadership(
            role=self._role,
            holder=holder,
            token=int(kv.create_revision),
            since=since,
            lease_id=int(kv.lease),
            ttl_s=self._ttl,
            backend=self.backend,
        )

    # ------------------------------------------------------- backend hooks
    async def _refresh(self, leadership: Leadership) -> float | None:
        """One keepalive, on the current endpoint or the next ones; None if the lease is gone."""
        reply = await self._pool.call(lambda c: c.refresh_lease(leadership.lease_id))
        ttl = 0 if reply is None else int(reply.TTL)
        return float(ttl) if ttl > 0 else None

    async def _still_ours(self, leadership: Leadership) -> bool:
        """False only when etcd says the key is gone or belongs to another term."""
        try:
            current, _ = await self._read()
        except CoordinatorUnavailable:
            return True  # unknown: the deadline decides
        return current is not None and current.token == leadership.token

    async def _release(self, leadership: Leadership) -> None:
        """Delete the key if it is still this term's, then revoke the lease."""
        self._abandoned.add(leadership.lease_id)
        await self._pool.call(
            lambda c: c.transaction(
                compare=[etcd_txn.Create(self._key) == leadership.token],
                success=[etcd_txn.Delete(self._key)],
                failure=[],
            )
        )
        await self._revoke_abandoned()

    async def _close_backend(self) -> None:
        await self._pool.close()


# ============================================================ in-process
@dataclass(slots=True)
class _LocalHold:
    leadership: Leadership
    owner: object
    expires_at: float


class LocalElection:
    """The in-process "etcd" that ``LocalElector`` instances of one process share.

    It keeps one holder per role with a lease that expires ``ttl`` after its last
    renewal on the shared clock. Tokens start above ``seed(role, newest)``: an
    embedded deployment must seed each role with ``await log.fencing_token(role)``
    at start-up, or a restarted process would be fenced out by its own log.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._holds: dict[str, _LocalHold] = {}
        self._last_token: dict[str, int] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._next_lease = 1

    def seed(self, role: str, newest_token: int) -> None:
        """Make every later token of ``role`` larger than ``newest_token``."""
        self._last_token[role] = max(self._last_token.get(role, 0), newest_token)

    def holder(self, role: str) -> Leadership | None:
        """The unexpired holder of ``role``, if any."""
        hold = self._holds.get(role)
        if hold is not None and self.clock.monotonic() >= hold.expires_at:
            del self._holds[role]
            self._notify(role)
            return None
        return None if hold is None else hold.leadership

    def expires_in(self, role: str) -> float | None:
        """Seconds until the current holder's lease expires, or None."""
        hold = self._holds.get(role)
        return None if hold is None else hold.expires_at - self.clock.monotonic()

    def acquire(self, owner: object, role: str, holder: str, ttl: float) -> Leadership | None:
        """Take ``role`` if nobody holds it: the new term, else None."""
        if self.holder(role) is not None:
            return None
        token = self._last_token.get(role, 0) + 1
        self._last_token[role] = token
        lease_id, self._next_lease = self._next_lease, self._next_lease + 1
        leadership = Leadership(role, holder, token, self.clock.now(), lease_id, ttl, "local")
        self._holds[role] = _LocalHold(leadership, owner, self.clock.monotonic() + ttl)
        self._notify(role)
        return leadership

    def renew(self, role: str, token: int, ttl: float) -> bool:
        """Extend the lease of term ``token``; False if that term is over."""
        current = self.holder(role)
        if current is None or current.token != token:
            return False
        self._holds[role].expires_at = self.clock.monotonic() + ttl
        return True

    def release(self, role: str, token: int) -> None:
        """End term ``token`` if it is still current."""
        hold = self._holds.get(role)
        if hold is not None and hold.leadership.token == token:
            del self._holds[role]
            self._notify(role)

    def _notify(self, role: str) -> None:
        event = self._changed.pop(role, None)
        if event is not None:
            event.set()

    async def wait_change(self, role: str, within: float) -> None:
        """Return when ``role`` changes hands, or after ``within`` seconds of the clock."""
        event = self._changed.setdefault(role, asyncio.Event())
        waiter = asyncio.ensure_future(event.wait())
        timer = asyncio.ensure_future(self.clock.sleep(max(0.0, within)))
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            timer.cancel()


class LocalElector(_LeaseElector):
    """In-process elector with the etcd elector's interface (the embedded default)."""

    backend = "local"

    def __init__(
        self,
        role: str,
        candidate_id: str,
        *,
        election: LocalElection | None = None,
        clock: Clock | None = None,
        ttl_s: float = 2.0,
        keepalive_interval_s: float | None = None,
        safety_margin_s: float | None = None,
    ) -> None:
        if election is None:
            election = LocalElection(clock=clock)
        elif clock is not None and clock is not election.clock:
            raise ValueError("pass the clock to the LocalElection, not to its electors")
        super().__init__(
            role,
            candidate_id,
            ttl_s=ttl_s,
            keepalive_interval_s=keepalive_interval_s,
            safety_margin_s=safety_margin_s,
            clock=election.clock,
        )
        self._election = election

    @property
    def election(self) -> LocalElection:
        """The shared in-process election."""
        return self._election

    async def campaign(self) -> Leadership:
        """Block until this candidate holds the role; return the new term."""
        self._check_open()
        while True:
            if self.is_leader() and self._term is not None:
                return self._term.leadership
            self._check_open()
            sent = self._clock.monotonic()
            won = self._election.acquire(self, self._role, self._candidate_id, self._ttl)
            if won is not None:
                if self._start_term(won, sent, self._ttl):
                    return won
                continue
            await self._election.wait_change(self._role, self._wait_bound())

    async def observe(self) -> Leadership | None:
        """The current holder of the role, if any."""
        self._check_open()
        return self._election.holder(self._role)

    async def watch(self) -> AsyncIterator[Leadership | None]:
        """Yield the current leadership, then each change."""
        last: tuple[str, int] | bool | None = False
        while not self._closed:
            current = self._election.holder(self._role)
            ident = None if current is None else (current.holder, current.token)
            if ident != last:
                last = ident
                yield current
            await self._election.wait_change(self._role, self._wait_bound())

    def _wait_bound(self) -> float:
        """Wait until the holder's lease could expire, or one TTL when nobody holds it."""
        remaining = self._election.expires_in(self._role)
        return self._ttl if remaining is None else max(0.0, remaining)

    async def _refresh(self, leadership: Leadership) -> float | None:
        ok = self._election.renew(self._role, leadership.token, self._ttl)
        return self._ttl if ok else None

    async def _still_ours(self, leadership: Leadership) -> bool:
        current = self._election.holder(self._role)
        return current is not None and current.token == leadership.token

    async def _release(self, leadership: Leadership) -> None:
        self._election.release(self._role, leadership.token)
