"""The in-process elector: the embedded single-node default and the unit tests' backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ha.election.base import Clock, Leadership, LeaseElector, SystemClock


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


class LocalElector(LeaseElector):
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
