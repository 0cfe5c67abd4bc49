"""Who is alive: the hosts' liveness leases, watched (etcd) or held in process (embedded).

`LivenessSource.watch()` yields `LivenessView`s: first the complete set of live
hosts (`reset=True`), then one change at a time (a key put: alive; a key
deleted, by its lease expiring or by the agent's clean stop: lost). After any
trouble with the coordinator the watch starts over with a new complete view,
so a consumer never misses a loss: a host alive before and absent from the new
complete view was lost while the watch was down.

The etcd source reads the prefix (`ha.liveness.PREFIX`) and then watches from
the read's revision + 1, so no change between the read and the watch is lost.
Every `resync_s` it starts over (a new read, a new watch), so a watch stream
that stalled without an error cannot hide a loss for longer than that.
A DELETE of `/vim/hosts/<name>/liveness` arrives as soon as etcd expires the
lease (about one TTL after the agent's last renewal).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aetcd
from aetcd import rpc as etcd_rpc

from ha.liveness import PREFIX, LivenessRecord, hostname_of, liveness_key

log = logging.getLogger(__name__)

_TRANSIENT: tuple[type[BaseException], ...] = (
    aetcd.ClientError,
    etcd_rpc.RpcError,
    etcd_rpc.BaseError,
    TimeoutError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class LivenessView:
    """A complete view (`reset`) or one change: `alive` hosts put, `lost` hosts deleted."""

    reset: bool
    alive: dict[str, LivenessRecord] = field(default_factory=dict)
    lost: frozenset[str] = frozenset()


class LivenessSource(Protocol):
    def watch(self) -> AsyncIterator[LivenessView]: ...

    async def close(self) -> None: ...


def _record(hostname: str, raw: bytes) -> LivenessRecord:
    try:
        return LivenessRecord.decode(raw)
    except (ValueError, KeyError, TypeError):
        return LivenessRecord(hostname, 0, "", "")


class EtcdLiveness:
    """Watches the liveness prefix in etcd, rotating endpoints after errors."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        prefix: str = PREFIX,
        rpc_timeout_s: float = 2.0,
        retry_s: float = 0.2,
        resync_s: float = 30.0,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self._endpoints = list(endpoints)
        self._prefix = prefix
        self._rpc_timeout_s = rpc_timeout_s
        self._retry_s = retry_s
        self._resync_s = resync_s
        self._next = 0
        self._closed = False

    def _hostname(self, key: bytes) -> str | None:
        text = key.decode(errors="replace")
        if self._prefix != PREFIX:
            if not text.startswith(self._prefix):
                return None
            text = PREFIX + text[len(self._prefix) :]
        return hostname_of(text)

    def _connect(self) -> aetcd.Client:
        endpoint = self._endpoints[self._next % len(self._endpoints)]
        self._next += 1
        host, _, port = endpoint.split("://", 1)[-1].rpartition(":")
        return aetcd.Client(host=host, port=int(port))

    async def watch(self) -> AsyncIterator[LivenessView]:
        while not self._closed:
            client = self._connect()
            try:
                async for view in self._watch_once(client):
                    yield view
            except _TRANSIENT as exc:
                log.warning("liveness watch interrupted (%s); starting over", exc)
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(1.0):
                        await client.close()
            if not self._closed:
                await asyncio.sleep(self._retry_s)

    async def _watch_once(self, client: aetcd.Client) -> AsyncIterator[LivenessView]:
        async with asyncio.timeout(self._rpc_timeout_s):
            got = await client.get_prefix(self._prefix.encode())
        revision = int(got.header.revision)
        alive: dict[str, LivenessRecord] = {}
        for kv in got:
            name = self._hostname(bytes(kv.key))
            if name is not None:
                alive[name] = _record(name, bytes(kv.value))
        yield LivenessView(True, alive)
        async with asyncio.timeout(self._rpc_timeout_s):
            watch: Any = await client.watch_prefix(
                self._prefix.encode(), start_revision=revision + 1
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._resync_s
        events = watch.__aiter__()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.__anext__(), deadline - loop.time())
                except (TimeoutError, StopAsyncIteration):
                    return  # resync: a stream that stalled silently is replaced
                name = self._hostname(bytes(event.kv.key))
                if name is None:
                    continue
                if event.kind == "DELETE":
                    yield LivenessView(False, lost=frozenset({name}))
                else:
                    yield LivenessView(False, {name: _record(name, bytes(event.kv.value))})
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await watch.cancel()

    async def close(self) -> None:
        self._closed = True


class LocalLiveness:
    """In-process liveness for the embedded demo and unit tests: `beat`, `lose`, `watch`."""

    def __init__(self) -> None:
        self._alive: dict[str, LivenessRecord] = {}
        self._queues: list[asyncio.Queue[LivenessView]] = []

    def beat(self, record: LivenessRecord) -> None:
        """The host is alive (its agent started, or renewed after a loss)."""
        self._alive[record.hostname] = record
        self._send(LivenessView(False, {record.hostname: record}))

    def lose(self, hostname: str) -> None:
        """The host's lease expired."""
        if self._alive.pop(hostname, None) is not None:
            self._send(LivenessView(False, lost=frozenset({hostname})))

    def _send(self, view: LivenessView) -> None:
        for q in self._queues:
            q.put_nowait(view)

    async def watch(self) -> AsyncIterator[LivenessView]:
        q: asyncio.Queue[LivenessView] = asyncio.Queue()
        self._queues.append(q)
        try:
            yield LivenessView(True, dict(self._alive))
            while True:
                yield await q.get()
        finally:
            self._queues.remove(q)

    async def close(self) -> None:
        return None


__all__ = ["EtcdLiveness", "LivenessSource", "LivenessView", "LocalLiveness", "liveness_key"]
