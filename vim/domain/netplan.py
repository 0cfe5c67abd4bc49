"""Per-host network plans: what each compute host's switch must hold. Pure, no I/O.

The SDN controller (`vim.sdn`) computes one `HostPlan` per host from the facts in
the log and records it on the stream `netplan-<hostname>` as a
`HostNetworkPlanned` event carrying the *whole* desired plan, so an agent is
level-triggered: it reads the latest plan and converges to it, whatever it missed.

A plan holds, for one host:

- `networks`: every live network that has a port on the host (because a server
  placed there has a NIC on it), with its type, segmentation id and the
  host-local VLAN tag it gets on `br-int`;
- `tunnels`: one VXLAN tunnel to every other host that shares at least one VXLAN
  network with this one (remote host and its tunnel IP); never to itself;
- `ports`: every NIC of a server placed on the host (port, server, network, MAC)
  with its network's local tag.

Invariants `compute` keeps (and the unit tests check):

- local tags are unique on a host and in 1..4094;
- a network keeps its local tag on a host for as long as it stays present there
  (the previous plan is an input); new networks take the lowest free tags, in
  network-id order, so the result is a pure function of (facts, previous plans):
  a new master recomputing from the same log gets the same plans and writes nothing;
- tunnels are symmetric: h has a tunnel to r exactly when r has one to h, which is
  exactly when both have a tunnel IP and share a VXLAN network;
- everything is sorted (networks and ports by id, tunnels by remote host), so two
  equal plans compare equal and serialise identically.

A host that had a plan and no longer has any port gets an empty plan (once), so
its agent tears everything down. Networks beyond the 4094 local tags of one host
are left out of its plan and named in `unplanned` (never happens with sane
densities; an operator must see it rather than a silent cap).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vim.domain import network, server
from vim.domain.base import DomainEvent
from vim.errors import InvalidTransition

KIND = "netplan"
LOCAL_VLAN_MIN = 1
LOCAL_VLAN_MAX = 4094


def stream(hostname: str) -> str:
    return f"{KIND}-{hostname}"


# -- plan values -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class PlannedNetwork:
    """One network present on a host."""

    network_id: str
    network_type: str
    """"flat" | "vlan" | "vxlan" (the agent's `NetworkPlanEntry.network_type`)."""
    physical_network: str
    segmentation_id: int
    local_vlan: int

    def data(self) -> dict[str, Any]:
        return {
            "network_id": self.network_id,
            "network_type": self.network_type,
            "physical_network": self.physical_network,
            "segmentation_id": self.segmentation_id,
            "local_vlan": self.local_vlan,
        }


@dataclass(frozen=True, slots=True, order=True)
class PlannedTunnel:
    """A VXLAN tunnel from the plan's host to a remote host."""

    remote_host: str
    remote_ip: str

    def data(self) -> dict[str, Any]:
        return {"remote_host": self.remote_host, "remote_ip": self.remote_ip}


@dataclass(frozen=True, slots=True, order=True)
class PlannedPort:
    """One server NIC to plug into `br-int` with its network's local tag."""

    port_id: str
    server_id: str
    network_id: str
    mac_address: str
    local_vlan: int

    def data(self) -> dict[str, Any]:
        return {
            "port_id": self.port_id,
            "server_id": self.server_id,
            "network_id": self.network_id,
            "mac_address": self.mac_address,
            "local_vlan": self.local_vlan,
        }


@dataclass(frozen=True, slots=True)
class HostPlan:
    """The desired network state of one host (see the module docstring)."""

    hostname: str
    tunnel_ip: str = ""
    networks: tuple[PlannedNetwork, ...] = ()
    tunnels: tuple[PlannedTunnel, ...] = ()
    ports: tuple[PlannedPort, ...] = ()
    unplanned: tuple[str, ...] = ()
    """Networks left out because the host ran out of local VLAN tags."""

    @property
    def empty(self) -> bool:
        return not (self.networks or self.tunnels or self.ports or self.unplanned)

    def local_tags(self) -> dict[str, int]:
        """Network id -> local VLAN tag on this host."""
        return {n.network_id: n.local_vlan for n in self.networks}

    def event(self) -> HostNetworkPlanned:
        """The event recording this plan."""
        return HostNetworkPlanned(
            self.hostname,
            self.tunnel_ip,
            [n.data() for n in self.networks],
            [t.data() for t in self.tunnels],
            [p.data() for p in self.ports],
            list(self.unplanned),
        )

    def view(self) -> dict[str, Any]:
        """A JSON view in the API's camelCase style (for vimctl and logs)."""
        return {
            "hostname": self.hostname,
            "tunnelIp": self.tunnel_ip,
            "networks": [
                {
                    "networkId": n.network_id,
                    "networkType": n.network_type,
                    "physicalNetwork": n.physical_network,
                    "segmentationId": n.segmentation_id,
                    "localVlan": n.local_vlan,
                }
                for n in self.networks
            ],
            "tunnels": [
                {"remoteHost": t.remote_host, "remoteIp": t.remote_ip} for t in self.tunnels
            ],
            "ports": [
                {
                    "portId": p.port_id,
                    "serverId": p.server_id,
                    "networkId": p.network_id,
                    "macAddress": p.mac_address,
                    "localVlan": p.local_vlan,
                }
                for p in self.ports
            ],
            "unplanned": list(self.unplanned),
        }


# -- events and state --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostNetworkPlanned(DomainEvent):
    """The whole desired network plan of a host (replaces the previous one)."""

    hostname: str
    tunnel_ip: str
    networks: list[dict[str, Any]] = field(default_factory=list)
    tunnels: list[dict[str, Any]] = field(default_factory=list)
    ports: list[dict[str, Any]] = field(default_factory=list)
    unplanned: list[str] = field(default_factory=list)


def plan_of(e: HostNetworkPlanned) -> HostPlan:
    """The plan an event records."""
    return HostPlan(
        e.hostname,
        e.tunnel_ip,
        tuple(
            PlannedNetwork(
                str(n["network_id"]),
                str(n["network_type"]),
                str(n.get("physical_network", "")),
                int(n["segmentation_id"]),
                int(n["local_vlan"]),
            )
            for n in e.networks
        ),
        tuple(PlannedTunnel(str(t["remote_host"]), str(t["remote_ip"])) for t in e.tunnels),
        tuple(
            PlannedPort(
                str(p["port_id"]),
                str(p["server_id"]),
                str(p["network_id"]),
                str(p["mac_address"]),
                int(p["local_vlan"]),
            )
            for p in e.ports
        ),
        tuple(e.unplanned),
    )


def evolve(state: HostPlan | None, event: DomainEvent, _recorded: object = None) -> HostPlan:
    """The latest plan wins whole; any other event on the stream is a bug."""
    if isinstance(event, HostNetworkPlanned):
        return plan_of(event)
    raise InvalidTransition(f"{type(event).__name__} on a network plan stream")


# -- inputs --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Attachment:
    """A server NIC on a host: the fact a plan is made from."""

    host: str
    server_id: str
    port_id: str
    network_id: str
    mac_address: str


def attachments(servers: Iterable[server.Server]) -> Iterator[Attachment]:
    """Every NIC of every placed, not deleted server (where its port must be plugged)."""
    for s in servers:
        if s.deleted or not s.host:
            continue
        for nic in s.nics:
            yield Attachment(s.host, s.server_id, nic.port_id, nic.network_id, nic.mac_address)


def tunnel_ip(spec_tunnel_ip: str, management_address: str) -> str:
    """A host's tunnel endpoint: its own tunnel IP, else its management address."""
    return spec_tunnel_ip or management_address


# -- the computation -------------------------------------------------------------------


def compute(
    tunnel_ips: Mapping[str, str],
    networks: Mapping[str, network.Network],
    attached: Iterable[Attachment],
    previous: Mapping[str, HostPlan],
) -> dict[str, HostPlan]:
    """The plan of every host that has a port now or had a plan before.

    `tunnel_ips`: hostname -> tunnel endpoint ("" or absent: no tunnels to or from
    it). `networks`: by id; terminated or unknown networks are not planned (their
    ports are left out too). `previous`: the plans recorded so far, for tag
    stability. Deterministic: the same arguments always give equal plans.
    """
    by_host: dict[str, list[Attachment]] = {}
    for a in attached:
        net = networks.get(a.network_id)
        if net is None or net.terminated:
            continue
        by_host.setdefault(a.host, []).append(a)

    plans: dict[str, HostPlan] = {}
    tags: dict[str, dict[str, int]] = {}
    unplanned: dict[str, tuple[str, ...]] = {}
    for hostname in sorted(set(by_host) | set(previous)):
        present = sorted({a.network_id for a in by_host.get(hostname, [])})
        prior = previous.get(hostname)
        tags[hostname], unplanned[hostname] = assign_local_tags(
            present, prior.local_tags() if prior else {}
        )

    vxlan_hosts: dict[str, set[str]] = {}
    for hostname, host_tags in tags.items():
        if not tunnel_ips.get(hostname):
            continue
        for nid in host_tags:
            if networks[nid].network_type is network.NetworkType.VXLAN:
                vxlan_hosts.setdefault(nid, set()).add(hostname)

    # One tunnel object per remote host, shared by every plan that names it: a full
    # mesh is hosts^2 tunnels, so sort names (cheap) and never build duplicates.
    endpoints = {h: PlannedTunnel(h, ip) for h, ip in tunnel_ips.items() if ip}
    for hostname, host_tags in tags.items():
        own_ip = tunnel_ips.get(hostname, "")
        remotes: set[str] = set()
        if own_ip:
            for nid in host_tags:
                remotes |= vxlan_hosts.get(nid, set())
        remotes.discard(hostname)
        ports = sorted(
            (a for a in by_host.get(hostname, []) if a.network_id in host_tags),
            key=lambda a: (a.port_id, a.server_id, a.network_id, a.mac_address),
        )
        plans[hostname] = HostPlan(
            hostname,
            own_ip,
            tuple(_planned_network(networks[nid], tag) for nid, tag in sorted(host_tags.items())),
            tuple(endpoints[r] for r in sorted(remotes)),
            tuple(
                PlannedPort(
                    a.port_id, a.server_id, a.network_id, a.mac_address, host_tags[a.network_id]
                )
                for a in ports
            ),
            unplanned[hostname],
        )
    return plans


def assign_local_tags(
    present: Iterable[str], prior: Mapping[str, int]
) -> tuple[dict[str, int], tuple[str, ...]]:
    """Local tags for the networks present on a host, keeping the prior tags.

    Returns (network id -> tag, networks that got no tag). A prior tag is kept only
    if it is in range and not already kept for another network (lowest network id
    wins), so even a corrupt prior plan yields unique tags.
    """
    wanted = sorted(set(present))
    kept: dict[str, int] = {}
    used: set[int] = set()
    for nid in wanted:
        tag = prior.get(nid)
        if tag is not None and LOCAL_VLAN_MIN <= tag <= LOCAL_VLAN_MAX and tag not in used:
            kept[nid] = tag
            used.add(tag)
    left: list[str] = []
    candidate = LOCAL_VLAN_MIN
    for nid in wanted:
        if nid in kept:
            continue
        while candidate in used:
            candidate += 1
        if candidate > LOCAL_VLAN_MAX:
            left.append(nid)
            continue
        kept[nid] = candidate
        used.add(candidate)
    return kept, tuple(left)


def _planned_network(net: network.Network, tag: int) -> PlannedNetwork:
    return PlannedNetwork(
        net.network_id,
        net.network_type.value.lower(),
        net.physical_network,
        net.segmentation_id,
        tag,
    )


def changed(previous: HostPlan | None, plan: HostPlan) -> bool:
    """Whether `plan` must be recorded: it differs, or it is the first non-empty one."""
    if previous is None:
        return not plan.empty
    return previous != plan


# -- segmentation ids ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SegmentClash:
    """Two or more live networks holding the same id of one segmentation pool."""

    pool: str
    segmentation_id: int
    network_ids: tuple[str, ...]


def segment_clashes(networks: Iterable[network.Network]) -> list[SegmentClash]:
    """Live networks sharing a segmentation id within a pool (must always be empty).

    The API allocates ids through the pool streams (`vim.domain.network`), which
    makes a duplicate impossible by construction; the SDN master re-checks the
    result on every change as a guard against a bug or a hand-edited log.
    """
    holders: dict[tuple[str, int], list[str]] = {}
    for n in networks:
        if n.terminated:
            continue
        key = (network.pool_id(n.network_type, n.physical_network), n.segmentation_id)
        holders.setdefault(key, []).append(n.network_id)
    return [
        SegmentClash(pool, seg, tuple(sorted(ids)))
        for (pool, seg), ids in sorted(holders.items())
        if len(ids) > 1
    ]
