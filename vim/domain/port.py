"""Ports (IFA006 "virtual network interface"): a MAC and addresses on one network.

Stream: `port-<id>`. A port is allocated together with its addresses in the
network's IPAM stream (`vim.domain.ipam`), at version 0, in one append; it is
terminated together with their release. The port keeps its own copy of what it
holds (MAC, fixed IPs), so a server rebuilt elsewhere gets the same ones.

A port is bound to at most one device (a server id) at a time: binding it to
another device while bound is refused, binding it again to the same device
decides nothing (a retried bind is harmless). A bound port cannot be terminated
by its owner (unbind first); the server's own teardown releases it with `force`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.domain.ipam import fixed_ip_views
from vim.errors import InvalidTransition, NotFound

KIND = "port"


def stream(port_id: str) -> str:
    return f"{KIND}-{port_id}"


@dataclass(frozen=True, slots=True)
class PortAllocated(DomainEvent):
    port_id: str
    network_id: str
    tenant_id: str
    name: str
    mac_address: str
    fixed_ips: list[dict[str, str]] = field(default_factory=list)
    device_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class PortUpdated(DomainEvent):
    port_id: str
    name: str
    metadata: dict[str, str] = field(default_factory=dict)
    updated_at: str = ""


@dataclass(frozen=True, slots=True)
class PortBound(DomainEvent):
    port_id: str
    device_id: str
    bound_at: str = ""


@dataclass(frozen=True, slots=True)
class PortUnbound(DomainEvent):
    port_id: str
    device_id: str
    unbound_at: str = ""


@dataclass(frozen=True, slots=True)
class PortTerminated(DomainEvent):
    port_id: str
    network_id: str
    terminated_at: str = ""


@dataclass(frozen=True, slots=True)
class Port:
    port_id: str
    network_id: str
    tenant_id: str
    name: str
    mac_address: str
    fixed_ips: list[dict[str, str]]
    """[{"subnet_id": ..., "ip_address": ...}], in the order they were allocated."""
    device_id: str
    metadata: dict[str, str]
    created_at: str
    updated_at: str
    terminated: bool = False

    def view(self) -> dict[str, Any]:
        """The proto3 JSON view (the API's `Port` message)."""
        return {
            "portId": self.port_id,
            "networkId": self.network_id,
            "tenantId": self.tenant_id,
            "name": self.name,
            "macAddress": self.mac_address,
            "fixedIps": fixed_ip_views(self.fixed_ips),
            "deviceId": self.device_id,
            "metadata": dict(self.metadata),
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }


def evolve(state: Port | None, event: DomainEvent, _recorded: object = None) -> Port:
    match event:
        case PortAllocated():
            return Port(
                event.port_id,
                event.network_id,
                event.tenant_id,
                event.name,
                event.mac_address,
                [dict(f) for f in event.fixed_ips],
                event.device_id,
                dict(event.metadata),
                event.created_at,
                event.created_at,
            )
        case PortUpdated() if state is not None:
            meta = dict(event.metadata)
            return replace(state, name=event.name, metadata=meta, updated_at=event.updated_at)
        case PortBound() if state is not None:
            return replace(state, device_id=event.device_id, updated_at=event.bound_at)
        case PortUnbound() if state is not None:
            return replace(state, device_id="", updated_at=event.unbound_at)
        case PortTerminated() if state is not None:
            return replace(state, terminated=True, updated_at=event.terminated_at)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before PortAllocated")
    return state


def live(state: Port | None, port_id: str) -> Port:
    if state is None or state.terminated:
        raise NotFound(f"port {port_id} not found")
    return state


def allocate(
    port_id: str,
    network_id: str,
    tenant_id: str,
    name: str,
    mac_address: str,
    fixed_ips: Sequence[Mapping[str, str]],
    device_id: str,
    metadata: Mapping[str, str],
    now: str,
) -> PortAllocated:
    return PortAllocated(
        port_id,
        network_id,
        tenant_id,
        name,
        mac_address,
        [dict(f) for f in fixed_ips],
        device_id,
        dict(metadata),
        now,
    )


def update(
    state: Port, name: str | None, metadata: Mapping[str, str] | None, now: str
) -> list[DomainEvent]:
    """Change name and/or metadata; nothing when both are unchanged."""
    new_name = state.name if name is None else name
    new_meta = dict(state.metadata if metadata is None else metadata)
    if new_name == state.name and new_meta == state.metadata:
        return []
    return [PortUpdated(state.port_id, new_name, new_meta, now)]


def bind(state: Port, device_id: str, now: str) -> list[DomainEvent]:
    """Attach to a device; a repeat is a no-op, another device while bound is refused."""
    if state.device_id == device_id:
        return []
    if state.device_id:
        raise InvalidTransition(
            f"port {state.port_id} is bound to {state.device_id}; unbind it first"
        )
    return [PortBound(state.port_id, device_id, now)]


def unbind(state: Port, now: str) -> list[DomainEvent]:
    """Detach from its device; nothing if it is not bound."""
    if not state.device_id:
        return []
    return [PortUnbound(state.port_id, state.device_id, now)]


def set_device(state: Port, device_id: str, now: str) -> list[DomainEvent]:
    """Bind, unbind or move to `device_id` ("" unbinds)."""
    if device_id == state.device_id:
        return []
    return [
        *unbind(state, now),
        *(bind(replace(state, device_id=""), device_id, now) if device_id else []),
    ]


def terminate(state: Port, now: str, *, force: bool = False) -> PortTerminated:
    """Terminate; a bound port only with `force` (its device's own teardown)."""
    if state.device_id and not force:
        raise InvalidTransition(
            f"port {state.port_id} is bound to {state.device_id}; unbind it first"
        )
    return PortTerminated(state.port_id, state.network_id, now)
