"""The contract between the agent's reconcile loop and the host's hypervisor and switch.

The reconcile loop (`vim.agent.reconcile`) only ever talks to these Protocols;
`vim.agent.libvirt_driver.LibvirtDriver` and `vim.agent.ovs_driver.OvsDriver`
are the real adapters, and unit tests may use fakes with the same interface.

Every method is idempotent (safe to repeat after a crash or a missed event):
`ensure_*` converges to the given spec whatever the starting point, `remove_*`
of something already gone succeeds. Methods are async; blocking library calls
run off the event loop inside the adapter.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol


class DomainPower(enum.StrEnum):
    """The power state the agent observes or wants for a domain."""

    RUNNING = "RUNNING"
    SHUTDOWN = "SHUTDOWN"
    PAUSED = "PAUSED"
    SUSPENDED = "SUSPENDED"
    CRASHED = "CRASHED"


class WatchdogAction(enum.StrEnum):
    """What the emulated i6300esb watchdog does when the guest stops feeding it."""

    NONE = "NONE"  # no watchdog device
    RESET = "RESET"
    POWEROFF = "POWEROFF"
    PAUSE = "PAUSE"


@dataclass(frozen=True, slots=True)
class NicSpec:
    port_id: str
    network_id: str
    mac_address: str
    ip_addresses: tuple[str, ...] = ()
    mtu: int = 1500


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """Everything needed to define a domain for one server (its name is `vim-<server_id>`)."""

    server_id: str
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    image_path: str = ""
    """A base image on this host; when set the domain boots a qcow2 overlay of it."""
    kernel_path: str = ""
    initrd_path: str = ""
    kernel_cmdline: str = ""
    nics: tuple[NicSpec, ...] = ()
    watchdog: WatchdogAction = WatchdogAction.NONE
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DomainStatus:
    server_id: str
    power: DomainPower
    reason: str = ""


class DomainEventKind(enum.StrEnum):
    LIFECYCLE = "LIFECYCLE"  # power changed (started, stopped, paused, resumed, crashed)
    WATCHDOG = "WATCHDOG"  # the guest's watchdog fired
    REBOOT = "REBOOT"
    CONNECTION_LOST = "CONNECTION_LOST"  # the hypervisor connection closed (libvirtd died)


@dataclass(frozen=True, slots=True)
class DomainEvent:
    kind: DomainEventKind
    server_id: str  # "" for CONNECTION_LOST
    power: DomainPower | None = None  # None when power did not change (defined, undefined)
    detail: str = ""  # e.g. the watchdog action, the lifecycle reason


class HypervisorDriver(Protocol):
    """A host's hypervisor (libvirt)."""

    async def connect(self) -> None:
        """Open (or reopen after the daemon restarted) the connection; register event callbacks."""

    async def close(self) -> None: ...

    async def node_capacity(self) -> tuple[int, int]:
        """(vCPUs, RAM in MiB) of the node."""

    async def list_domains(self) -> Sequence[DomainStatus]:
        """Every domain this agent manages (named `vim-...`), defined or running."""

    async def ensure_domain(self, spec: DomainSpec, power: DomainPower) -> DomainStatus:
        """Define the domain from spec if missing (redefine when it differs); bring it to power."""

    async def reboot_domain(self, server_id: str) -> None: ...

    async def remove_domain(self, server_id: str) -> None:
        """Destroy and undefine; remove its overlay disk. Gone already is fine."""

    async def destroy_all(self) -> int:
        """Self-fencing: destroy every managed domain as fast as possible; how many were running."""

    def events(self) -> AsyncIterator[DomainEvent]:
        """Lifecycle, watchdog and connection events as they happen."""


@dataclass(frozen=True, slots=True)
class PortBinding:
    """One server NIC plugged into the host's integration bridge."""

    port_id: str
    server_id: str
    network_id: str
    mac_address: str
    vlan_tag: int
    """The host-local VLAN tag of the port's network on br-int."""
    ofport: int = 0


@dataclass(frozen=True, slots=True)
class TunnelSpec:
    remote_host: str
    remote_ip: str


@dataclass(frozen=True, slots=True)
class NetworkPlanEntry:
    """What one network needs on this host (from the SDN controller's plan)."""

    network_id: str
    network_type: str  # "flat" | "vlan" | "vxlan"
    segmentation_id: int
    local_vlan: int
    physical_network: str = ""
    """The provider network of a flat or vlan network ("" for vxlan, or from a plan
    that does not say: taken as this host's)."""


class SwitchDriver(Protocol):
    """A host's virtual switch (Open vSwitch): br-int, br-tun, br-phy."""

    async def connect(self) -> None: ...

    async def close(self) -> None: ...

    async def ensure_bridges(self, local_ip: str) -> None:
        """Create br-int / br-tun (and the patch between them) and the tunnel endpoint.

        ``local_ip`` is ``a.b.c.d`` or ``a.b.c.d/len`` (the underlay prefix).
        """

    async def ensure_port(self, binding: PortBinding, device: str) -> None:
        """Plug `device` (a tap or veth end) into br-int with the binding's tag and external_ids."""

    async def remove_port(self, port_id: str) -> None: ...

    async def list_ports(self) -> Sequence[PortBinding]:
        """Every port on br-int that carries our external_ids."""

    async def ensure_tunnels(self, tunnels: Sequence[TunnelSpec]) -> None:
        """Exactly these VXLAN tunnels on br-tun (extra ones are removed)."""

    async def ensure_flows(self, networks: Sequence[NetworkPlanEntry]) -> None:
        """(Re)install the VLAN <-> VNI flows; needed again after ovs-vswitchd restarts.

        Call it after :meth:`ensure_tunnels`: the flood flows name the current tunnels.
        """
