"""etcd endpoints: one aetcd client per endpoint, rotated on transport errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
from aetcd import rpc as etcd_rpc

from ha.election.base import TRANSIENT
from ha.errors import CoordinatorUnavailable, ElectorClosed

log = logging.getLogger(__name__)

T = TypeVar("T")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    hostport = endpoint.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port, got {endpoint!r}")
    return host, int(port)


class Endpoints:
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
        self._addrs = [parse_endpoint(e) for e in endpoints]
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
            await close_client(client)

    async def call(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """Run ``op`` on the current endpoint, then the next ones; else CoordinatorUnavailable."""
        last: BaseException | None = None
        for _ in range(len(self._addrs)):
            i, client = self.current()
            try:
                async with asyncio.timeout(self.rpc_timeout_s):
                    return await op(client)
            except TRANSIENT as exc:
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
                await close_client(client)


async def close_client(client: aetcd.Client) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            await client.close()


async def range_key(client: aetcd.Client, key: bytes) -> Any:
    """A linearizable Range on ``key``: the raw response carries the store revision."""
    await client.connect()
    return await client.kvstub.Range(etcd_rpc.RangeRequest(key=key), metadata=client.metadata)


def revoker(lease_id: int) -> Callable[[aetcd.Client], Awaitable[None]]:
    """An operation revoking ``lease_id``; a lease already gone counts as revoked."""

    async def revoke(client: aetcd.Client) -> None:
        try:
            await client.revoke_lease(lease_id)
        except aetcd.ClientError as exc:
            if "lease not found" not in str(exc):
                raise

    return revoke
