"""The fast death signal: a liveness endpoint per candidate, watched by the waiting ones.

Lease expiry alone makes failover take up to one TTL. Every `EtcdElector`
therefore serves a tiny TCP endpoint (`LivenessServer`) for as long as it is
open, and publishes its address in the leader key's value when it wins. A
waiting candidate keeps one connection to the current leader's endpoint
(`DeathWatch`). The leader never closes these connections: only its kernel
does, when the process is gone (exit, crash, SIGKILL, OOM kill). So an
*established* connection that the peer closes (EOF) or resets (RST) means
"the process that held the term no longer exists", and the waiting candidate
revokes the dead leader's lease and campaigns at once instead of waiting for
the lease to expire.

What is *not* a death signal, and why:

* A refused connect. The address may be stale (the leader died before we
  connected: the lease still expires by TTL), a firewall may answer with a
  reject, or the leader may have been replaced already. Nothing about the
  holder's liveness follows from it, so it only means "no fast signal".
* A connect or read that times out, or a connection that stays silent. That
  is what a partitioned, paused (SIGSTOP) or overloaded leader looks like: its
  kernel keeps the connection up (a stopped process's sockets stay open and
  the kernel still acknowledges). Such a leader is replaced by lease expiry
  (at most TTL after its last refresh), exactly as without this module.
* No keepalive probes or application heartbeats are used for the same
  reason: silence proves nothing.

The signal can still be wrong: a middlebox or a firewall rule that resets
established connections (nftables ``reject with tcp reset``) fakes it. Then a
live leader's lease is revoked: its next keepalive sees the lease gone and it
steps down, and until then its writes carry a token older than the
successor's, which the event log refuses once the successor has written. A
wrong signal therefore costs one term, never safety; see docs/ELECTION.md.

The endpoint first sends one greeting line ``vim-elector <candidate id>\\n``;
a watcher that reads a different greeting (a stranger on a recycled port)
stops watching that connection without signalling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

GREETING = b"vim-elector "
_READ_CHUNK = 256


def greeting(candidate_id: str) -> bytes:
    """The line a liveness endpoint sends first."""
    return GREETING + candidate_id.encode() + b"\n"


class LivenessServer:
    """Holds every accepted connection open until this process (or ``close()``) ends it.

    The server never writes after the greeting and never closes a connection
    by itself, so a peer that sees its connection end knows the owner is gone
    or closed the elector on purpose (after resigning).
    """

    def __init__(self, host: str, candidate_id: str, advertise: str | None = None) -> None:
        self._host = host
        self._advertise = advertise
        self._greeting = greeting(candidate_id)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.address: str | None = None
        """``host:port`` to publish, once started."""

    @property
    def peers(self) -> int:
        """Connections currently held open (watching candidates)."""
        return len(self._writers)

    async def start(self) -> str:
        """Listen on a free port (idempotent); return the address to publish."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, self._host, 0)
            port = int(self._server.sockets[0].getsockname()[1])
            self.address = f"{self._advertise or self._host}:{port}"
        assert self.address is not None
        return self.address

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            writer.write(self._greeting)
            await writer.drain()
            while await reader.read(_READ_CHUNK):
                pass  # the watcher sends nothing; discard whatever arrives
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        """Stop listening and close every held connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await server.wait_closed()


@dataclass(frozen=True, slots=True)
class Target:
    """The term being watched: its holder, liveness address and lease."""

    holder: str
    address: str
    lease_id: int
    token: int


class DeathWatch:
    """One connection to the current leader's liveness endpoint; reports when it ends.

    ``follow(target)`` returns an event that is set once the peer's kernel has
    closed or reset an established connection to ``target``. Following another
    target drops the previous connection. A connect that is refused or times out
    leaves the event unset; the next ``follow`` of the same target tries again.
    """

    def __init__(self, connect_timeout_s: float) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._target: Target | None = None
        self._dead = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected: Target | None = None
        """The target whose endpoint we hold an established connection to."""

    def follow(self, target: Target) -> asyncio.Event:
        """Watch ``target`` (no-op when already watching it); its death event."""
        if target == self._target and (
            self._dead.is_set() or (self._task is not None and not self._task.done())
        ):
            return self._dead
        if target != self._target:
            self._stop()
            self._target = target
            self._dead = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run(target, self._dead), name=f"deathwatch {target.holder}"
        )
        return self._dead

    def _stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        self._target = None
        self.connected = None

    async def close(self) -> None:
        """Drop the connection (if any) and stop watching."""
        task = self._task
        self._stop()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, target: Target, dead: asyncio.Event) -> None:
        host, _, port = target.address.rpartition(":")
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except (OSError, TimeoutError, ValueError) as exc:
            # Refused, unreachable or slow: no proof of anything (see the module docstring).
            log.debug("no liveness connection to %s at %s: %r", target.holder, target.address, exc)
            return
        try:
            if await self._greeted(reader, target) and await self._ended(reader):
                log.warning(
                    "%s (token %d) is gone: its kernel closed our liveness connection to %s",
                    target.holder,
                    target.token,
                    target.address,
                )
                dead.set()
        finally:
            if self.connected == target:
                self.connected = None
            writer.close()

    async def _greeted(self, reader: asyncio.StreamReader, target: Target) -> bool:
        """True when the peer greets as ``target.holder``, or ends the connection first."""
        try:
            line = await reader.readline()
        except OSError:
            return True  # reset before the greeting: still an established connection ended
        if not line:
            return True  # closed before the greeting (a process killed while stopped)
        if line != greeting(target.holder):
            log.info("liveness endpoint %s is not %s: %r", target.address, target.holder, line)
            return False
        self.connected = target
        return True

    async def _ended(self, reader: asyncio.StreamReader) -> bool:
        """Wait until the peer closes (EOF) or resets the connection; True then."""
        try:
            while await reader.read(_READ_CHUNK):
                pass
        except OSError:
            return True  # ECONNRESET and friends: the peer's kernel reset it
        return True
