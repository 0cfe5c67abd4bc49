"""Virtual networks (IFA005 "virtual network"), their subnets and segmentation-id pools.

Streams:
- `network-<id>`: `NetworkAllocated`, `NetworkUpdated`, `NetworkTerminated`.
- `subnet-<id>`: `SubnetAllocated`, `SubnetTerminated`; the subnet's addressing
  is also recorded in the network's IPAM stream (`vim.domain.ipam`), which is
  where overlaps and addresses in use are checked.
- `segments-<pool>`: the segmentation ids held in one pool, `vlan-<physnet>`
  (1-4094), `vxlan-global` (1-16777215) or `flat-<physnet>` (only id 0: one flat
  network per physical network). A network's allocation appends to its pool at
  the version it was decided against, in the same append as the network stream,
  so two networks never get the same id even when decided concurrently; the id
  returns to the pool when the network is terminated.

Tenancy: a network, subnet or port belongs to the tenant that allocated it.
Shared networks (admin-made) are visible to every tenant, which may attach ports.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.domain.ipam import PoolExhausted
from vim.errors import InvalidTransition, NotFound

KIND = "network"
SUBNET_KIND = "subnet"
SEGMENTS_KIND = "segments"
PHYSNET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")


class NetworkType(enum.StrEnum):
    FLAT = "FLAT"
    VLAN = "VLAN"
    VXLAN = "VXLAN"


SEGMENT_RANGES = {
    NetworkType.FLAT: (0, 0),
    NetworkType.VLAN: (1, 4094),
    NetworkType.VXLAN: (1, 16_777_215),
}


def stream(network_id: str) -> str:
    return f"{KIND}-{network_id}"


def subnet_stream(subnet_id: str) -> str:
    return f"{SUBNET_KIND}-{subnet_id}"


def pool_id(network_type: NetworkType, physical_network: str) -> str:
    """The segmentation pool a network draws from."""
    if network_type is NetworkType.VXLAN:
        return "vxlan-global"
    return f"{network_type.value.lower()}-{physical_network}"


def pool_stream(pool: str) -> str:
    return f"{SEGMENTS_KIND}-{pool}"


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NetworkAllocated(DomainEvent):
    network_id: str
    tenant_id: str
    name: str
    network_type: str
    physical_network: str
    segmentation_id: int
    shared: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class NetworkUpdated(DomainEvent):
    network_id: str
    name: str
    metadata: dict[str, str] = field(default_factory=dict)
    updated_at: str = ""


@dataclass(frozen=True, slots=True)
class NetworkTerminated(DomainEvent):
    network_id: str
    terminated_at: str = ""


@dataclass(frozen=True, slots=True)
class SubnetAllocated(DomainEvent):
    subnet_id: str
    network_id: str
    tenant_id: str
    name: str
    cidr: str
    ip_version: int
    gateway_ip: str
    allocation_pools: list[list[str]] = field(default_factory=list)
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class SubnetTerminated(DomainEvent):
    subnet_id: str
    network_id: str
    terminated_at: str = ""


@dataclass(frozen=True, slots=True)
class SegmentReserved(DomainEvent):
    pool: str
    segmentation_id: int
    network_id: str


@dataclass(frozen=True, slots=True)
class SegmentReleased(DomainEvent):
    pool: str
    segmentation_id: int
    network_id: str


# -- states ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Network:
    network_id: str
    tenant_id: str
    name: str
    network_type: NetworkType
    physical_network: str
    segmentation_id: int
    shared: bool
    metadata: dict[str, str]
    created_at: str
    updated_at: str
    terminated: bool = False

    def visible_to(self, tenant: str, admin: bool) -> bool:
        return admin or self.shared or self.tenant_id == tenant

    def view(self) -> dict[str, Any]:
        """The proto3 JSON view (the API's `Network` message)."""
        return {
            "networkId": self.network_id,
            "tenantId": self.tenant_id,
            "name": self.name,
            "networkType": f"NETWORK_TYPE_{self.network_type.value}",
            "physicalNetwork": self.physical_network,
            "segmentationId": self.segmentation_id,
            "shared": self.shared,
            "metadata": dict(self.metadata),
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class Subnet:
    subnet_id: str
    network_id: str
    tenant_id: str
    name: str
    cidr: str
    ip_version: int
    gateway_ip: str
    allocation_pools: tuple[tuple[str, str], ...]
    created_at: str
    terminated: bool = False

    def view(self) -> dict[str, Any]:
        """The proto3 JSON view (the API's `Subnet` message)."""
        return {
            "subnetId": self.subnet_id,
            "networkId": self.network_id,
            "tenantId": self.tenant_id,
            "name": self.name,
            "cidr": self.cidr,
            "ipVersion": self.ip_version,
            "gatewayIp": self.gateway_ip,
            "allocationPools": [{"start": a, "end": b} for a, b in self.allocation_pools],
            "createdAt": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class SegmentPool:
    pool: str
    held: dict[int, str] = field(default_factory=dict)  # segmentation id -> network id


def evolve(state: Network | None, event: DomainEvent, _recorded: object = None) -> Network:
    match event:
        case NetworkAllocated():
            return Network(
                event.network_id,
                event.tenant_id,
                event.name,
                NetworkType(event.network_type),
                event.physical_network,
                event.segmentation_id,
                event.shared,
                dict(event.metadata),
                event.created_at,
                event.created_at,
            )
        case NetworkUpdated() if state is not None:
            return replace(
                state, name=event.name, metadata=dict(event.metadata), updated_at=event.updated_at
            )
        case NetworkTerminated() if state is not None:
            return replace(state, terminated=True, updated_at=event.terminated_at)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before NetworkAllocated")
    return state


def evolve_subnet(state: Subnet | None, event: DomainEvent, _recorded: object = None) -> Subnet:
    match event:
        case SubnetAllocated():
            pools = tuple((p[0], p[1]) for p in event.allocation_pools)
            return Subnet(
                event.subnet_id,
                event.network_id,
                event.tenant_id,
                event.name,
                event.cidr,
                event.ip_version,
                event.gateway_ip,
                pools,
                event.created_at,
            )
        case SubnetTerminated() if state is not None:
            return replace(state, terminated=True)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before SubnetAllocated")
    return state


def evolve_pool(
    state: SegmentPool | None, event: DomainEvent, _recorded: object = None
) -> SegmentPool:
    match event:
        case SegmentReserved():
            s = state or SegmentPool(event.pool)
            return replace(s, held={**s.held, event.segmentation_id: event.network_id})
        case SegmentReleased() if state is not None:
            held = {k: v for k, v in state.held.items() if k != event.segmentation_id}
            return replace(state, held=held)
    return state or SegmentPool(getattr(event, "pool", ""))


# -- decisions ---------------------------------------------------------------------------


def reserve_segment(
    pool: SegmentPool | None, pool_name: str, network_type: NetworkType, network_id: str
) -> SegmentReserved:
    """The lowest free segmentation id of the pool; PoolExhausted when none is left."""
    held = pool.held if pool else {}
    low, high = SEGMENT_RANGES[network_type]
    for seg in range(low, min(high, low + len(held)) + 1):
        if seg not in held:
            return SegmentReserved(pool_name, seg, network_id)
    if network_type is NetworkType.FLAT:
        raise PoolExhausted(
            f"physical network {pool_name.split('-', 1)[1]} already has a flat network"
        )
    raise PoolExhausted(f"no free {network_type.value} segmentation id left in pool {pool_name}")


def allocate(
    network_id: str,
    tenant_id: str,
    name: str,
    network_type: NetworkType,
    physical_network: str,
    shared: bool,
    metadata: Mapping[str, str],
    pool: SegmentPool | None,
    now: str,
) -> tuple[NetworkAllocated, SegmentReserved]:
    """A new network and the segmentation id it holds."""
    pool_name = pool_id(network_type, physical_network)
    seg = reserve_segment(pool, pool_name, network_type, network_id)
    created = NetworkAllocated(
        network_id,
        tenant_id,
        name,
        network_type.value,
        physical_network,
        seg.segmentation_id,
        shared,
        dict(metadata),
        now,
    )
    return created, seg


def update(
    state: Network, name: str | None, metadata: Mapping[str, str] | None, now: str
) -> list[NetworkUpdated]:
    """Change name and/or metadata; nothing when both are unchanged."""
    live(state)
    new_name = state.name if name is None else name
    new_meta = dict(state.metadata if metadata is None else metadata)
    if new_name == state.name and new_meta == state.metadata:
        return []
    return [NetworkUpdated(state.network_id, new_name, new_meta, now)]


def terminate(state: Network, now: str) -> tuple[NetworkTerminated, SegmentReleased]:
    """Terminate the network and give its segmentation id back to its pool."""
    live(state)
    pool = pool_id(state.network_type, state.physical_network)
    return (
        NetworkTerminated(state.network_id, now),
        SegmentReleased(pool, state.segmentation_id, state.network_id),
    )


def live(state: Network | None, network_id: str = "") -> Network:
    if state is None or state.terminated:
        raise NotFound(f"network {state.network_id if state else network_id} not found")
    return state


def allocate_subnet(
    subnet_id: str,
    network: Network,
    tenant_id: str,
    name: str,
    cidr: str,
    ip_version: int,
    gateway_ip: str,
    pools: tuple[tuple[str, str], ...],
    now: str,
) -> SubnetAllocated:
    live(network)
    return SubnetAllocated(
        subnet_id,
        network.network_id,
        tenant_id,
        name,
        cidr,
        ip_version,
        gateway_ip,
        [[a, b] for a, b in pools],
        now,
    )


def terminate_subnet(state: Subnet | None, subnet_id: str, now: str) -> SubnetTerminated:
    if state is None or state.terminated:
        raise NotFound(f"subnet {subnet_id} not found")
    return SubnetTerminated(state.subnet_id, state.network_id, now)
