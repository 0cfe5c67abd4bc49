"""Heartbeat suspicion: the elected fault manager probes every agent over UDP.

A lease's DELETE arrives 1.4-2.4 s after a power loss at TTL 2 s: etcd expires
it late by design. An agent that publishes ``udp://IP:PORT`` in its liveness
record (`ha.liveness`, answered by `vim.agent.heartbeat`) is probed every
``interval_s`` (0.2 s) and *suspected* when it has not answered for
``suspect_after_s`` (0.8 s): within ``suspect_after_s + interval_s`` of its
last answer. The fault manager then takes the host down the same path as a
lost lease (classification by the BMC, fence, confirmation, evacuation).

Why silence may suspect here when it may not elect a leader
(`ha.election.deathwatch`): a suspicion decides nothing by itself. Nothing of
the host is recovered before its fence is *observed* (BMC power off), so a
false suspicion (a lost datagram, an overloaded agent) costs a needless fence,
never a server on two hosts. For the same reason only hosts with a usable
out-of-band driver are suspected through heartbeats (`FaultManager` checks);
a host that can only fence itself keeps the lease as its only signal, since
its self-fence deadline is counted from the lease's real loss.

Rules (`Heartbeats`, pure: the clock is passed in, for the unit tests):

* A host is probed while its liveness record carries a ``udp://`` endpoint.
  A new record (another agent, another endpoint) starts the host afresh.
* A host is *armed* by its first answer: one that never answered (a firewall,
  an agent without a responder) is never suspected through heartbeats.
* An answer counts only with a nonce recently sent to that host, from the
  host's own name; its proof of life is the probe's *send* time (the host was
  alive at least then), never its arrival time.
* Suspected: armed, the newest proof is at least ``suspect_after_s`` old, and
  at least two probes sent after it have gone unanswered for ``interval_s``
  each. The last condition keeps a stalled fault manager (a long GC, CPU
  starvation: no probes sent) from suspecting everyone when it wakes up.
* An answer clears the suspicion at once; so does the host leaving the
  targets (its lease gone: the lease's loss takes over).

One socket probes IPv4 and IPv6 agents alike: bound to the wildcard (the
default) it is a dual-stack IPv6 socket, IPv4 agents reached through their
IPv4-mapped addresses; where the kernel has no IPv6 it is an IPv4 socket, and
IPv6 agents are then left to their leases (logged once per host).

Cost: one socket for every host, one datagram each way per host and interval,
``hosts / interval_s`` probes per second (5 000/s for 1 000 hosts at 0.2 s,
~50 bytes each: ~250 kB/s each way), one pass over the table per tick
(bounded: O(hosts), a few µs per host), no task per host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ha.liveness import (
    HEARTBEAT_ANSWER,
    NONCE_BYTES,
    LivenessRecord,
    parse_heartbeat,
    parse_udp_endpoint,
    probe_datagram,
)

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.2
DEFAULT_SUSPECT_AFTER_S = 0.8
MAX_OUTSTANDING = 16
"""Probes remembered per host (their nonces); older ones can no longer be answered."""
MIN_MISSES = 2


@dataclass(slots=True)
class _Target:
    record: LivenessRecord
    addr: tuple[str, int]
    armed: bool = False
    proof: float = 0.0
    """Send time of the newest answered probe."""
    sent: dict[bytes, float] = field(default_factory=dict)
    """Outstanding nonces -> send time (insertion order: oldest first)."""
    suspected_at: float | None = None


class Heartbeats:
    """The suspicion table; see the module docstring. Times are monotonic seconds."""

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        suspect_after_s: float = DEFAULT_SUSPECT_AFTER_S,
        *,
        nonce: Callable[[], bytes] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("the heartbeat interval must be > 0")
        if suspect_after_s and suspect_after_s < MIN_MISSES * interval_s:
            raise ValueError(
                f"suspect_after ({suspect_after_s}) must be 0 (disabled) "
                f"or at least {MIN_MISSES} intervals ({MIN_MISSES * interval_s})"
            )
        self.interval_s = interval_s
        self.suspect_after_s = suspect_after_s
        rng = random.Random()
        self._nonce = nonce or (lambda: rng.getrandbits(8 * NONCE_BYTES).to_bytes(NONCE_BYTES))
        self._targets: dict[str, _Target] = {}
        self.newly_armed: list[str] = []
        """Hosts that answered for the first time (for the caller to log; it empties it)."""

    @property
    def enabled(self) -> bool:
        return self.suspect_after_s > 0

    def set_targets(self, records: Mapping[str, LivenessRecord]) -> bool:
        """The hosts to probe: those whose record has a usable ``udp://`` endpoint.
        True when a suspected host left the table (its suspicion ended)."""
        changed = False
        kept: dict[str, _Target] = {}
        for name, record in records.items():
            addr = parse_udp_endpoint(record.agent_endpoint)
            if addr is None:
                continue
            old = self._targets.get(name)
            if old is not None and old.record == record and old.addr == addr:
                kept[name] = old
            else:
                kept[name] = _Target(record, addr)
                changed |= old is not None and old.suspected_at is not None
        for name, old in self._targets.items():
            changed |= name not in kept and old.suspected_at is not None
        self._targets = kept
        return changed

    def targets(self) -> frozenset[str]:
        return frozenset(self._targets)

    def probes(self, now: float) -> list[tuple[tuple[str, int], bytes]]:
        """One probe per host, to send now."""
        out = []
        for name, t in self._targets.items():
            nonce = self._nonce()
            t.sent[nonce] = now
            while len(t.sent) > MAX_OUTSTANDING:
                del t.sent[next(iter(t.sent))]
            out.append((t.addr, probe_datagram(nonce, name)))
        return out

    def answered(self, datagram: bytes, now: float) -> bool:
        """Take an answer in; True when it ended a suspicion."""
        parsed = parse_heartbeat(datagram, HEARTBEAT_ANSWER)
        if parsed is None:
            return False
        nonce, name = parsed
        t = self._targets.get(name)
        if t is None or nonce not in t.sent:
            return False
        sent = t.sent[nonce]
        t.sent = {n: at for n, at in t.sent.items() if at > sent}
        t.proof = max(t.proof, sent)
        if not t.armed:
            t.armed = True
            self.newly_armed.append(name)
        if t.suspected_at is not None:
            t.suspected_at = None
            return True
        return False

    def evaluate(self, now: float) -> bool:
        """Suspect the hosts that stopped answering; True when one became suspected."""
        if not self.enabled:
            return False
        changed = False
        for t in self._targets.values():
            if t.suspected_at is not None or not t.armed:
                continue
            if now - t.proof < self.suspect_after_s:
                continue
            misses = sum(1 for at in t.sent.values() if now - at >= self.interval_s)
            if misses >= MIN_MISSES:
                t.suspected_at = now
                changed = True
        return changed

    def suspected(self) -> dict[str, float]:
        """Suspected hosts -> when they became suspected (monotonic)."""
        return {n: t.suspected_at for n, t in self._targets.items() if t.suspected_at is not None}

    def last_proof(self, hostname: str) -> float | None:
        t = self._targets.get(hostname)
        return t.proof if t is not None and t.armed else None


class _Socket(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes], None]) -> None:
        self._on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable for a dead host's port: silence is what counts, not this.
        log.debug("heartbeat socket: %r", exc)


def probe_socket(bind: tuple[str, int]) -> socket.socket:
    """The monitor's UDP socket: dual-stack IPv6 for a wildcard bind where the kernel
    has IPv6, else a socket of the bind address's own family; OSError if it cannot bind."""
    host, port = bind
    if host in ("0.0.0.0", "::", ""):
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:  # no IPv6 in this kernel
            host = "0.0.0.0"
        else:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
            except OSError:
                sock.close()
                host = "0.0.0.0"
            else:
                sock.setblocking(False)
                return sock
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def destination(family: int, addr: tuple[str, int]) -> tuple[str, int] | None:
    """Where to send a probe for `addr` from a socket of `family` (an IPv4 agent from a
    dual-stack socket: its IPv4-mapped address); None when that socket cannot reach it."""
    host, port = addr
    v6 = ":" in host
    if family == socket.AF_INET6:
        return addr if v6 else (f"::ffff:{host}", port)
    return None if v6 else addr


class HeartbeatMonitor:
    """Runs `Heartbeats` on one UDP socket while `run()` runs (the fault manager runs it
    only while it leads); `on_change()` is called whenever the suspected set changes."""

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        suspect_after_s: float = DEFAULT_SUSPECT_AFTER_S,
        *,
        bind: tuple[str, int] = ("0.0.0.0", 0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.table = Heartbeats(interval_s, suspect_after_s)
        self._bind = bind
        self._clock = clock
        self._records: Mapping[str, LivenessRecord] = {}
        self.on_change: Callable[[], None] = lambda: None
        self.probes_sent = 0
        self.answers = 0
        self.running = False

    @property
    def enabled(self) -> bool:
        return self.table.enabled

    def set_targets(self, records: Mapping[str, LivenessRecord]) -> None:
        """The live hosts' records (called on every liveness change)."""
        self._records = dict(records)
        if self.running and self.table.set_targets(self._records):
            self.on_change()

    def suspected(self) -> dict[str, float]:
        return self.table.suspected() if self.running else {}

    def _answer(self, data: bytes) -> None:
        self.answers += 1
        cleared = self.table.answered(data, self._clock())
        for name in self.table.newly_armed:
            log.info(
                "agent of %s answers heartbeats: suspected after %ss of silence",
                name,
                self.table.suspect_after_s,
            )
        self.table.newly_armed.clear()
        if cleared:
            self.on_change()

    async def run(self) -> None:
        """Probe every `interval_s` until cancelled; the table starts empty (unarmed) and
        is emptied again at the end, so no suspicion outlives a term."""
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        try:
            sock = probe_socket(self._bind)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Socket(self._answer), sock=sock
            )
        except OSError as exc:
            log.error("no heartbeat probes (the lease alone): cannot bind %s: %s", self._bind, exc)
            return
        family = sock.family
        unreachable: set[tuple[str, int]] = set()
        self.table = Heartbeats(self.table.interval_s, self.table.suspect_after_s)
        self.table.set_targets(self._records)
        self.running = True
        log.info(
            "probing agents' heartbeats every %ss, suspecting after %ss of silence",
            self.table.interval_s,
            self.table.suspect_after_s,
        )
        try:
            next_tick = loop.time()
            while True:
                for addr, datagram in self.table.probes(self._clock()):
                    to = destination(family, addr)
                    if to is None:
                        if addr not in unreachable:
                            unreachable.add(addr)
                            log.warning("no IPv6 here: %s is left to its lease", addr[0])
                        continue
                    with contextlib.suppress(OSError):
                        transport.sendto(datagram, to)
                    self.probes_sent += 1
                next_tick += self.table.interval_s
                # Evaluate just before the next round: answers to this one have had a
                # whole interval to arrive.
                await asyncio.sleep(max(0.0, next_tick - loop.time()))
                if loop.time() - next_tick > self.table.interval_s:
                    next_tick = loop.time()  # we were stalled: no catching up in a burst
                if self.table.evaluate(self._clock()):
                    self.on_change()
        finally:
            self.running = False
            transport.close()
            if self.table.suspected():
                self.on_change()


__all__ = [
    "DEFAULT_INTERVAL_S",
    "DEFAULT_SUSPECT_AFTER_S",
    "HeartbeatMonitor",
    "Heartbeats",
]
