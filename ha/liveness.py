"""A compute host's liveness lease in etcd: the one key an agent may write.

Key: ``/vim/hosts/<hostname>/liveness`` (`liveness_key`), attached to a lease
of `ttl_s` seconds (2 by default, the smallest etcd grants with its default
election timeout). Value: JSON ``{"hostname", "pid", "boot_id", "started_at",
"agent_endpoint"}`` (`LivenessRecord`). The fault manager watches the prefix
``/vim/hosts/``: the key disappears at most one TTL after the agent last proved
itself alive (a SIGKILLed agent, a stuck one, a partitioned host).

`LivenessKeeper` invariants:

* ``renewed(sent)`` is called after every successful grant or keepalive with
  the monotonic time taken *before* the request left, so ``sent + ttl`` is
  never later than etcd's own expiry of the lease. The self-fencing watchdog
  (`vim.agent.fencing`) uses exactly that as its deadline.
* A keepalive runs every ``ttl/3``; a failed one rotates to the next etcd
  endpoint (one aetcd client per endpoint, as in `ha.election`), and is retried
  at once on the next endpoint within the same interval.
* When etcd answers that the lease is gone (TTL 0: it expired while we could
  not reach etcd), a new lease is granted and the key is written again; the
  key never carries a lease we do not keep alive.
* ``close()`` deletes the key and revokes the lease (best effort): a clean
  stop is not a failure. A crash leaves the key to expire by TTL.

Heartbeats (faster than the lease, for suspicion only): an agent may publish a
UDP endpoint in its record (``agent_endpoint = "udp://10.0.0.2:47001"``,
`format_udp_endpoint`), answered by `vim.agent.heartbeat` and probed by the
elected fault manager (`vim.faultd.heartbeat`). One datagram each way::

    probe:  b"VHB1?" + nonce (8 bytes) + hostname (UTF-8)
    answer: b"VHB1!" + nonce (8 bytes) + hostname (UTF-8)

Anything else (another prefix, a short, oversized or non-UTF-8 datagram) is
ignored by both sides (`parse_heartbeat`). An older record whose
``agent_endpoint`` is not ``udp://IP:PORT`` means "no heartbeat: lease only".
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aetcd
from aetcd import rpc as etcd_rpc

from ha.errors import CoordinatorUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
PREFIX = "/vim/hosts/"
DEFAULT_TTL_S = 2
_TRANSIENT: tuple[type[BaseException], ...] = (
    aetcd.ClientError,
    etcd_rpc.RpcError,
    etcd_rpc.BaseError,
    TimeoutError,
    OSError,
)

_RENEWAL_ERRORS: tuple[type[BaseException], ...] = (CoordinatorUnavailable, *_TRANSIENT)
"""What a renewal may fail with without the keeper giving up (it retries)."""


HEARTBEAT_PROBE = b"VHB1?"
HEARTBEAT_ANSWER = b"VHB1!"
NONCE_BYTES = 8
MAX_DATAGRAM = 512
UDP_SCHEME = "udp://"


def liveness_key(hostname: str) -> str:
    """The etcd key holding `hostname`'s liveness record."""
    return f"{PREFIX}{hostname}/liveness"


def hostname_of(key: str) -> str | None:
    """The hostname of a liveness key, or None for another key."""
    if not key.startswith(PREFIX) or not key.endswith("/liveness"):
        return None
    name = key[len(PREFIX) : -len("/liveness")]
    return name if name and "/" not in name else None


def boot_id() -> str:
    """The kernel's boot id (changes on every reboot of the host); '' if unknown."""
    with contextlib.suppress(OSError):
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    return ""


@dataclass(frozen=True, slots=True)
class LivenessRecord:
    """What the liveness key holds (JSON)."""

    hostname: str
    pid: int
    boot_id: str
    started_at: str
    agent_endpoint: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes) -> LivenessRecord:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            hostname=str(data["hostname"]),
            pid=int(data["pid"]),
            boot_id=str(data.get("boot_id", "")),
            started_at=str(data.get("started_at", "")),
            agent_endpoint=str(data.get("agent_endpoint", "")),
        )

    @classmethod
    def here(cls, hostname: str, agent_endpoint: str = "") -> LivenessRecord:
        """This process's record, started now."""
        return cls(
            hostname=hostname,
            pid=os.getpid(),
            boot_id=boot_id(),
            started_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            agent_endpoint=agent_endpoint,
        )


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    hostport = endpoint.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


class _Pool:
    """One aetcd client per endpoint; on a transport error move to the next one."""

    def __init__(self, endpoints: Sequence[str], rpc_timeout_s: float) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._addrs = [_parse_endpoint(e) for e in endpoints]
        self._clients: list[aetcd.Client | None] = [None] * len(self._addrs)
        self._current = 0
        self.rpc_timeout_s = rpc_timeout_s

    def _client(self, i: int) -> aetcd.Client:
        client = self._clients[i]
        if client is None:
            host, port = self._addrs[i]
            client = self._clients[i] = aetcd.Client(host=host, port=port)
        return client

    async def call(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run `op` on the current endpoint, then the others; else CoordinatorUnavailable."""
        last: BaseException | None = None
        for _ in range(len(self._addrs)):
            i = self._current
            client = self._client(i)
            try:
                async with asyncio.timeout(self.rpc_timeout_s):
                    return await op(client)
            except _TRANSIENT as exc:
                last = exc
                self._clients[i] = None
                self._current = (i + 1) % len(self._addrs)
                # Closing cancels calls in flight on this client: only ours used it.
                await _close_client(client)
        raise CoordinatorUnavailable(f"no etcd endpoint answered: {last!r}") from last

    async def close(self) -> None:
        clients, self._clients = self._clients, [None] * len(self._addrs)
        for client in clients:
            if client is not None:
                await _close_client(client)


async def _close_client(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await client.close()


Renewed = Callable[[float], None]
"""Called with the monotonic send time of each successful grant or keepalive."""


class LivenessKeeper:
    """Holds `liveness_key(hostname)` on a lease and keeps it alive; `run()` until `close()`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        record: LivenessRecord,
        *,
        ttl_s: int = DEFAULT_TTL_S,
        interval_s: float | None = None,
        rpc_timeout_s: float | None = None,
        on_renewed: Renewed | None = None,
    ) -> None:
        if ttl_s < 1:
            raise ValueError("the liveness TTL must be at least 1 s")
        self.record = record
        self.key = liveness_key(record.hostname)
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3 if interval_s is None else interval_s
        timeout = self.interval_s if rpc_timeout_s is None else rpc_timeout_s
        self._pool = _Pool(endpoints, timeout)
        self._on_renewed = on_renewed
        self._lease_id: int | None = None
        self._closed = False
        self.last_renewed: float | None = None
        """Monotonic send time of the last successful renewal (None before the first)."""
        self.leases_granted = 0
        self.alive = asyncio.Event()
        """Set by a renewal, cleared by a failed one past the TTL: for waiting on, not for
        deciding (it is only updated when a renewal attempt ends); see `proven_alive`."""

    def proven_alive(self) -> bool:
        """True only while the last successful renewal was sent less than a TTL ago."""
        last = self.last_renewed
        return last is not None and time.monotonic() - last < self.ttl_s

    async def run(self) -> None:
        """Grant, put, and keep alive until closed; never raises for etcd being away."""
        failures = 0
        while not self._closed:
            sent = time.monotonic()
            try:
                if self._lease_id is None:
                    await self._acquire()
                elif not await self._refresh():
                    log.warning("liveness lease of %s expired; granting a new one", self.key)
                    self._lease_id = None
                    continue
                self._renewed(sent)
                failures = 0
            except _RENEWAL_ERRORS as exc:
                failures += 1
                level = logging.WARNING if failures in (1, 10) else logging.DEBUG
                log.log(level, "liveness renewal of %s failed: %r", self.key, exc)
                if self.last_renewed is None or time.monotonic() - self.last_renewed > self.ttl_s:
                    self.alive.clear()
            await asyncio.sleep(max(0.0, sent + self.interval_s - time.monotonic()))

    def _renewed(self, sent: float) -> None:
        self.last_renewed = sent
        self.alive.set()
        if self._on_renewed is not None:
            self._on_renewed(sent)

    async def _acquire(self) -> None:
        lease = await self._pool.call(lambda c: c.lease(self.ttl_s))
        self._lease_id = int(lease.id)
        self.leases_granted += 1
        value = self.record.encode()
        await self._pool.call(lambda c: c.put(self.key.encode(), value, lease=lease.id))

    async def _refresh(self) -> bool:
        """One keepalive; False when etcd says the lease is gone."""
        lease_id = self._lease_id
        assert lease_id is not None
        reply = await self._pool.call(lambda c: c.refresh_lease(lease_id))
        return reply is not None and int(reply.TTL) > 0

    async def close(self) -> None:
        """Delete the key and revoke the lease (best effort), then close the clients."""
        if self._closed:
            return
        self._closed = True
        self.alive.clear()
        lease_id, self._lease_id = self._lease_id, None
        with contextlib.suppress(CoordinatorUnavailable):
            await self._pool.call(lambda c: c.delete(self.key.encode()))
            if lease_id is not None:
                await self._pool.call(lambda c: c.revoke_lease(lease_id))
        await self._pool.close()


async def read_liveness(
    endpoints: Sequence[str], hostname: str, *, rpc_timeout_s: float = 1.0
) -> LivenessRecord | None:
    """The host's current liveness record, or None when the key is absent."""
    pool = _Pool(endpoints, rpc_timeout_s)
    try:
        kv = await pool.call(lambda c: c.get(liveness_key(hostname).encode()))
    finally:
        await pool.close()
    return None if kv is None else LivenessRecord.decode(bytes(kv.value))


# -- heartbeats (see the module docstring) ------------------------------------------------


def probe_datagram(nonce: bytes, hostname: str) -> bytes:
    """The probe the fault manager sends to `hostname`'s agent."""
    return HEARTBEAT_PROBE + nonce + hostname.encode()


def answer_datagram(nonce: bytes, hostname: str) -> bytes:
    """The answer of `hostname`'s agent to the probe carrying `nonce`."""
    return HEARTBEAT_ANSWER + nonce + hostname.encode()


def parse_heartbeat(datagram: bytes, kind: bytes) -> tuple[bytes, str] | None:
    """(nonce, hostname) of a `kind` datagram (`HEARTBEAT_PROBE` or `HEARTBEAT_ANSWER`);
    None if it is not one."""
    head = len(kind) + NONCE_BYTES
    if len(datagram) > MAX_DATAGRAM or len(datagram) <= head or not datagram.startswith(kind):
        return None
    try:
        name = datagram[head:].decode()
    except UnicodeDecodeError:
        return None
    return datagram[len(kind) : head], name


def format_udp_endpoint(host: str, port: int) -> str:
    """``udp://HOST:PORT`` (an IPv6 address in brackets)."""
    if ":" in host:
        return f"{UDP_SCHEME}[{host}]:{port}"
    return f"{UDP_SCHEME}{host}:{port}"


def split_hostport(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_udp_endpoint(endpoint: str) -> tuple[str, int] | None:
    """(IP, port) of a ``udp://IP:PORT`` agent endpoint; None for anything else
    (another scheme or none, a name instead of an IP literal, port 0)."""
    if not endpoint.startswith(UDP_SCHEME):
        return None
    try:
        host, port = split_hostport(endpoint[len(UDP_SCHEME) :])
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, port) if port else None
