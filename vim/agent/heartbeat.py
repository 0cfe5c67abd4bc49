"""The agent's UDP heartbeat responder: a fast "this host is alive" for the fault manager.

The liveness lease (`ha.liveness`) proves a host alive to etcd, but its loss is
seen only when etcd expires it (1.4-2.4 s after a power loss at TTL 2 s). The
elected fault manager therefore also probes each agent every few hundred
milliseconds (`vim.faultd.heartbeat`) at the address the agent publishes in its
liveness record (``agent_endpoint``, ``udp://10.0.0.2:47001``); one datagram
each way, no state kept here (wire format: `ha.liveness`, "Heartbeats").

Invariants:

* The responder answers only while ``healthy()`` is true; the agent passes
  "the liveness lease was renewed less than a TTL ago"
  (`LivenessKeeper.proven_alive`). A stuck or stopped event loop answers
  nothing (the responder runs in it), and neither does an agent that cannot
  reach etcd: it is about to fence itself anyway.
* A probe for another hostname (a stale endpoint now used by another agent),
  a malformed datagram or an oversized one gets no answer. An answer is never
  larger than the probe, so the responder amplifies nothing.
* Silence is only ever a *suspicion* for the fault manager: it fences before it
  recovers anything, so a lost datagram costs at most a needless fence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from ha.liveness import (
    HEARTBEAT_PROBE,
    answer_datagram,
    format_udp_endpoint,
    parse_heartbeat,
    split_hostport,
)

log = logging.getLogger(__name__)


class HeartbeatResponder(asyncio.DatagramProtocol):
    """Answers heartbeat probes for `hostname` while `healthy()`; see the module docstring."""

    def __init__(self, hostname: str, healthy: Callable[[], bool]) -> None:
        self.hostname = hostname
        self._healthy = healthy
        self._transport: asyncio.DatagramTransport | None = None
        self.answered = 0
        self.ignored = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        probe = parse_heartbeat(data, HEARTBEAT_PROBE)
        if probe is None or probe[1] != self.hostname or not self._healthy():
            self.ignored += 1
            return
        if self._transport is not None:
            self._transport.sendto(answer_datagram(probe[0], self.hostname), addr)
            self.answered += 1

    def error_received(self, exc: Exception) -> None:
        log.debug("heartbeat responder: %r", exc)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        assert self._transport is not None
        sockname = self._transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None


async def start_responder(
    hostname: str, listen: str, healthy: Callable[[], bool]
) -> HeartbeatResponder:
    """Bind `listen` (``HOST:PORT``, port 0: any free one) and answer probes there."""
    host, port = split_hostport(listen)
    loop = asyncio.get_running_loop()
    _, responder = await loop.create_datagram_endpoint(
        lambda: HeartbeatResponder(hostname, healthy), local_addr=(host, port)
    )
    return responder


async def start_for_agent(
    hostname: str, listen: str, management_address: str, healthy: Callable[[], bool]
) -> tuple[HeartbeatResponder | None, str | None]:
    """The agent's responder and the endpoint it publishes; (None, None) when `listen`
    cannot be bound (logged: the lease alone still proves the host alive)."""
    try:
        responder = await start_responder(hostname, listen, healthy)
    except OSError as exc:
        log.warning("no heartbeat responder: cannot bind %s: %s", listen, exc)
        return None, None
    published = published_endpoint(listen, responder.address[1], management_address)
    log.info("answering heartbeats on %s as %s", responder.address, published)
    return responder, published


async def serve_until_cancelled(responder: HeartbeatResponder) -> None:
    """Keep `responder` open until the task running this is cancelled, then close it."""
    try:
        await asyncio.Event().wait()
    finally:
        responder.close()


def listen_address(flag: str, management_address: str) -> str | None:
    """Where to answer: ``--heartbeat-listen`` as given, by default the management
    address with any free port; None for 'none' or when there is no management address
    to default to. ValueError for a malformed value or a wildcard bind without a
    management address to publish."""
    if flag == "none" or (not flag and not management_address):
        return None
    listen = flag or f"{management_address}:0"
    if published_endpoint(listen, 1, management_address) is None:
        raise ValueError("a wildcard address needs --management-address to publish")
    return listen


def published_endpoint(listen: str, bound_port: int, management_address: str) -> str | None:
    """What the agent publishes: the listen host (the management address for a wildcard
    bind) with the bound port; None when there is no address others can reach."""
    host, _ = split_hostport(listen)
    if host in ("0.0.0.0", "::"):
        host = management_address
    if not host:
        return None
    return format_udp_endpoint(host, bound_port)


__all__ = [
    "HeartbeatResponder",
    "listen_address",
    "published_endpoint",
    "serve_until_cancelled",
    "start_for_agent",
    "start_responder",
]
