"""A placement workload for scheduler tests and benchmarks, written straight to the log.

Role: register roomy compute hosts and append BUILDING servers (``ServerAllocated``
through the domain's own decision functions, as the API's command would), then
read back which term placed what. The scheduler under test only ever sees the
event log, so this is exactly the input it gets in production.

Invariants:

* Every append expects version 0 of a fresh stream: a server or host is
  created once, whatever the caller retries.
* :func:`placements` reads ``ServerScheduled`` events with the fencing token
  they were written under; a server placed twice shows up twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from vim.domain import host, network, server
from vim.domain.base import DomainEvent
from vim.eventlog.model import AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.store import EventLog

__all__ = ["Placement", "create_network", "placements", "register_hosts", "request_server"]

NOW = "2030-01-01T00:00:00.000Z"
_META = Metadata(actor="harness:placement")
_FLAVOR = server.FlavorCopy("f1", "m1.tiny", 1, 512, 1)


def _encode(events: Sequence[DomainEvent]) -> list[NewEvent]:
    return [NewEvent(e.type, e.to_data(), e.SCHEMA_VERSION) for e in events]


async def _create(log: EventLog, stream_id: str, events: Sequence[DomainEvent]) -> int:
    result = await log.append(
        AppendRequest(streams=[StreamAppend(stream_id, 0, _encode(events))], metadata=_META)
    )
    return result.last_position


async def register_hosts(log: EventLog, count: int, *, instances: int = 10_000) -> None:
    """``count`` UP hosts named ``cmp-NNN`` with room for ``instances`` tiny servers each."""
    for i in range(count):
        name = f"cmp-{i:03d}"
        spec = host.HostSpec(
            "z1", 1024, 1024 * 1024, 100_000, 16.0, 1.0, 1.0, max_instances=instances
        )
        await _create(log, host.stream(name), host.register(None, name, spec, NOW))


async def create_network(log: EventLog, network_id: str) -> None:
    """A VLAN network on ``physnet1`` (with its segment), for servers' NICs."""
    created, reserved = network.allocate(
        network_id, "t1", network_id, network.NetworkType.VLAN, "physnet1", False, {}, None, NOW
    )
    pool = network.pool_stream(network.pool_id(network.NetworkType.VLAN, "physnet1"))
    await log.append(
        AppendRequest(
            streams=[
                StreamAppend(network.stream(network_id), 0, _encode([created])),
                StreamAppend(pool, 0, _encode([reserved])),
            ],
            metadata=_META,
        )
    )


def _mac(server_id: str) -> str:
    tail = hashlib.blake2s(server_id.encode(), digest_size=3).digest()
    return "fa:16:3e:" + ":".join(f"{b:02x}" for b in tail)


async def request_server(log: EventLog, server_id: str, *, network_id: str = "") -> int:
    """Append a BUILDING server ``server_id`` (1 vCPU; one NIC on ``network_id`` if
    given, port ``port-<server_id>``); its log position."""
    nics = [server.Nic(f"port-{server_id}", network_id, _mac(server_id), ())] if network_id else []
    event = server.allocate(server_id, "t1", server_id, _FLAVOR, "img", nics, now=NOW)
    return await _create(log, server.stream(server_id), [event])


@dataclass(frozen=True, slots=True)
class Placement:
    """One committed ``ServerScheduled``: where in the log, which server, which term."""

    position: int
    server_id: str
    host: str
    token: int | None


async def placements(log: EventLog, *, after: int = 0, limit: int = 1000) -> list[Placement]:
    """``ServerScheduled`` events after position ``after`` (at most ``limit``), in order."""
    events = await log.read_all(after=after, limit=limit, types=["ServerScheduled"])
    return [
        Placement(
            e.position,
            str(e.data.get("server_id", e.stream_id.removeprefix("server-"))),
            str(e.data.get("host", "")),
            e.metadata.fencing_token,
        )
        for e in events
    ]
