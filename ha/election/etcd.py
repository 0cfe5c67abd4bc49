"""Leader election on etcd: lease + transaction on the leader key's create revision.

A leader is the holder of the key ``<prefix><role>``, created in a transaction
``if create_revision(key) == 0 then put(key, lease)``, so the key's create
revision identifies the term. That revision is the *fencing token*: it only
grows from one term to the next, the leader sends it with every append, and
the event log refuses (in the append's own transaction) a token older than the
newest it has seen for the role.

Invariants beyond those of `LeaseElector`:

* A failed refresh rotates to the next endpoint (`Endpoints`) and is retried
  until the deadline.
* ``resign()`` deletes the key in a transaction guarded by the key's create
  revision (it never deletes a successor's key), and revokes the lease.
* A lease we may have left behind (a transaction whose outcome is unknown, a
  step-down while etcd was unreachable) is remembered and revoked when etcd
  answers again, so a re-campaign does not wait for our own stale key.
* Fast death signal (`ha.election.deathwatch`, on by default): every candidate
  serves a TCP liveness endpoint published in the key's value; a waiting
  candidate holds a connection to the leader's, and when the leader's kernel
  closes it (the process is gone) it revokes the leader's lease and tries
  again at once. Only an orderly close or reset of an established connection
  counts; refused or timed-out connects do not. A wrong signal only ends a
  term early: the fencing token keeps it safe (docs/ELECTION.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

import aetcd
from aetcd import transactions as etcd_txn

from ha.election.base import TRANSIENT, Clock, Leadership, LeaseElector, SystemClock
from ha.election.deathwatch import DeathWatch, LivenessServer, Target
from ha.election.endpoints import Endpoints, range_key, revoker
from ha.errors import CoordinatorUnavailable, ElectorClosed

log = logging.getLogger(__name__)


class EtcdElector(LeaseElector):
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
        death_signal: bool = True,
        liveness_host: str | None = None,
        liveness_advertise: str | None = None,
    ) -> None:
        """``death_signal`` turns the fast death signal on (the default): this
        elector serves a liveness endpoint on ``liveness_host`` (a free port;
        ``liveness_advertise`` is the host others should connect to, default the
        same) and, while waiting, watches the leader's (`ha.election.deathwatch`).
        Unset, they come from ``VIM_ELECTION_LIVENESS_HOST`` (default 127.0.0.1:
        candidates on one machine) and ``VIM_ELECTION_LIVENESS_ADVERTISE``, so every
        process using an elector can be pointed at its node's address.
        """
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
        self._pool = Endpoints(endpoints, rpc_timeout_s, linger_s=rpc_timeout_s + ttl_s + 1.0)
        self._abandoned: set[int] = set()
        """Our leases that may still hold the key: revoked before the next attempt."""
        env = os.environ.get
        self._liveness = (
            LivenessServer(
                liveness_host or env("VIM_ELECTION_LIVENESS_HOST") or "127.0.0.1",
                candidate_id,
                liveness_advertise or env("VIM_ELECTION_LIVENESS_ADVERTISE") or None,
            )
            if death_signal
            else None
        )
        self._deathwatch = DeathWatch(rpc_timeout_s) if death_signal else None
        self._buried: set[int] = set()
        """Leases of dead leaders this elector has already revoked (at most once each)."""
        self.death_signals = 0
        """How many dead leaders this elector detected by the fast signal (and revoked)."""

    @property
    def key(self) -> bytes:
        """The etcd key whose holder leads the role."""
        return self._key

    @property
    def liveness_address(self) -> str | None:
        """``host:port`` of this elector's liveness endpoint, once it has campaigned."""
        return None if self._liveness is None else self._liveness.address

    @property
    def liveness_peers(self) -> int:
        """How many waiting candidates hold a connection to our liveness endpoint."""
        return 0 if self._liveness is None else self._liveness.peers

    @property
    def watching(self) -> str | None:
        """The holder whose liveness endpoint we hold an established connection to."""
        target = None if self._deathwatch is None else self._deathwatch.connected
        return None if target is None else target.holder

    # ------------------------------------------------------------ campaign
    async def campaign(self) -> Leadership:
        """Block until this candidate holds the key; return the new term."""
        self._check_open()
        if self.is_leader() and self._term is not None:
            return self._term.leadership
        log.info("%s campaigns for %s", self._candidate_id, self._role)
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
                if self._deathwatch is not None:
                    await self._deathwatch.close()
                return outcome
            revision, kv = outcome
            await self._wait_for_event(after_revision=revision, target=self._target(kv))

    async def _try_acquire(self) -> Leadership | tuple[int, Any]:
        """One attempt: our term, or (store revision, holder's key) when someone else holds it."""
        address = None if self._liveness is None else await self._liveness.start()
        sent = self._clock.monotonic()
        lease = await self._pool.call(lambda c: c.lease(self._lease_ttl))
        won = False
        try:
            since = self._clock.now()
            record: dict[str, Any] = {"holder": self._candidate_id, "since": since.isoformat()}
            if address is not None:
                record.update(liveness=address, lease=lease.id)
            value = json.dumps(record)
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
                return int(kv.header.revision), kv
            # Won, or won by an earlier try of this same transaction whose answer was lost
            # (the pool retried it on another endpoint): the key carries our lease.
            leadership = self._leadership(kv)
            won = self._start_term(leadership, sent, float(lease.ttl))
            if won:
                return leadership
            return int(kv.header.revision), None
        finally:
            if not won:
                # Lost, expired, failed or cancelled: the lease must not linger. If the
                # transaction's outcome is unknown it may even hold the key.
                self._abandoned.add(lease.id)
                self._spawn(self._revoke_abandoned_quietly())

    async def _revoke_abandoned(self) -> None:
        for lease_id in sorted(self._abandoned):
            await self._pool.call(revoker(lease_id))
            self._abandoned.discard(lease_id)

    async def _revoke_abandoned_quietly(self) -> None:
        with contextlib.suppress(CoordinatorUnavailable, *TRANSIENT):
            await self._revoke_abandoned()

    async def _wait_for_event(self, after_revision: int, target: Target | None = None) -> None:
        """Return on the first change of the key after ``after_revision``, after one TTL,
        or once ``target`` (the holder) is known dead and its lease has been revoked.

        The watch starts at ``after_revision + 1``, so a deletion between our read
        and the watch is not missed; the TTL bound re-reads the key even if a
        watch stream stalls silently.
        """
        dead = None
        if target is not None and self._deathwatch is not None:
            dead = self._deathwatch.follow(target)
            if dead.is_set():
                await self._bury(target)
                return
        try:
            i, client = self._pool.current()
        except ElectorClosed:
            return
        try:
            async with asyncio.timeout(self._pool.rpc_timeout_s):
                watch = await client.watch(self._key, start_revision=after_revision + 1)
        except TRANSIENT as exc:
            self._pool.failed(i, client, exc)
            return
        died = False
        try:
            async with asyncio.timeout(self._ttl):
                died = await _first_change(watch, dead)
        except TimeoutError:
            return
        except aetcd.RevisionCompactedError:
            return
        except TRANSIENT as exc:
            self._pool.failed(i, client, exc)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await watch.cancel()
        if died and target is not None:
            await self._bury(target)

    def _target(self, kv: Any) -> Target | None:
        """The holder's liveness endpoint from its key, if it publishes one."""
        if kv is None or self._deathwatch is None:
            return None
        try:
            data = json.loads(bytes(kv.value))
            address, holder = str(data["liveness"]), str(data["holder"])
        except (ValueError, KeyError, TypeError):
            return None
        return Target(holder, address, int(kv.lease), int(kv.create_revision))

    async def _bury(self, target: Target) -> None:
        """Revoke a dead leader's lease (once), so that its key goes now, not at TTL."""
        if target.lease_id in self._buried:
            return
        self._buried.add(target.lease_id)
        self.death_signals += 1
        try:
            await self._pool.call(revoker(target.lease_id))
        except CoordinatorUnavailable as exc:
            log.warning(
                "could not revoke dead %s's lease %x: %s", target.holder, target.lease_id, exc
            )
            return
        log.warning(
            "%s revoked lease %x of %s (token %d) whose process is gone",
            self._candidate_id,
            target.lease_id,
            target.holder,
            target.token,
        )

    # ------------------------------------------------------------- observe
    async def observe(self) -> Leadership | None:
        """Who holds the key now (a linearizable read); CoordinatorUnavailable if unreachable."""
        self._check_open()
        leadership, _ = await self._read()
        return leadership

    async def _read(self) -> tuple[Leadership | None, int]:
        response = await self._pool.call(lambda c: range_key(c, self._key))
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
        if self._deathwatch is not None:
            await self._deathwatch.close()
        if self._liveness is not None:
            await self._liveness.close()
        await self._pool.close()


async def _first_change(watch: Any, dead: asyncio.Event | None) -> bool:
    """Wait for the watch's first event or for ``dead``; True if ``dead`` came first."""

    async def next_event() -> None:
        async for _event in watch:
            return

    watched = asyncio.ensure_future(next_event())
    if dead is None:
        await watched
        return False
    signal = asyncio.ensure_future(dead.wait())
    try:
        await asyncio.wait({watched, signal}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watched, signal):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if signal.done() and not signal.cancelled():
        return True
    watched.result()  # re-raise a watch error
    return False
