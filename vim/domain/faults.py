"""Faults reported from a compute host: the raw facts that alarms are made from.

The agent records these (through the API, about its own host and servers only);
the fault manager and the alarm projection turn them into IFA005 alarms. Host
facts go to the host's stream, server facts to the server's stream.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vim.domain.base import DomainEvent


class HostService(enum.StrEnum):
    LIBVIRTD = "libvirtd"
    OVS_VSWITCHD = "ovs-vswitchd"
    OVSDB_SERVER = "ovsdb-server"
    AGENT = "vim-agent"


@dataclass(frozen=True, slots=True)
class HostServiceFailed(DomainEvent):
    """A supervised process on the host died or stopped answering."""

    hostname: str
    service: str  # a HostService value
    detail: str
    at: str


@dataclass(frozen=True, slots=True)
class HostServiceRecovered(DomainEvent):
    """The supervised process is running and healthy again (after a restart)."""

    hostname: str
    service: str
    restarts: int
    at: str


@dataclass(frozen=True, slots=True)
class HostSelfFenced(DomainEvent):
    """The agent lost its liveness lease for longer than the TTL and destroyed its domains.

    Recorded when the agent reaches the control plane again; `fenced_at` is when
    the domains were destroyed, which may be long before `at`.
    """

    hostname: str
    domains_destroyed: int
    lease_lost_at: str
    fenced_at: str
    at: str


@dataclass(frozen=True, slots=True)
class ServerWatchdogFired(DomainEvent):
    """The guest's watchdog device fired (the guest stopped feeding it)."""

    server_id: str
    hostname: str
    action: str  # what the hypervisor did: RESET, POWEROFF, PAUSE, ...
    at: str


@dataclass(frozen=True, slots=True)
class ServerCrashed(DomainEvent):
    """The domain stopped without being asked to (crash, or killed on the host)."""

    server_id: str
    hostname: str
    reason: str
    at: str


# --- decided by the fault manager (vim-faultd, elected and fenced) ---------------------


class FailureKind(enum.StrEnum):
    COMPUTE_NODE = "COMPUTE_NODE"
    """The agent or hypervisor software is down; the host still answers out of band."""
    HARDWARE = "HARDWARE"
    """The host is powered off or unreachable, out of band too."""


@dataclass(frozen=True, slots=True)
class HostFailureDetected(DomainEvent):
    """The host's liveness lapsed and the fault manager classified the failure."""

    hostname: str
    kind: str  # a FailureKind value
    detail: str
    lease_lost_at: str
    at: str


@dataclass(frozen=True, slots=True)
class HostFenceConfirmed(DomainEvent):
    """The host can no longer run its servers: powered off, or self-fenced past TTL + margin."""

    hostname: str
    method: str  # "redfish", "netns-power", "self-fence-timeout", ...
    detail: str
    at: str


@dataclass(frozen=True, slots=True)
class HostFenceFailed(DomainEvent):
    hostname: str
    method: str
    reason: str
    at: str


@dataclass(frozen=True, slots=True)
class HostRecovered(DomainEvent):
    """The host is alive again (lease renewed) after a detected failure."""

    hostname: str
    at: str


@dataclass(frozen=True, slots=True)
class ServerRecoveryFailed(DomainEvent):
    """A server of a failed host could not be recreated elsewhere (no capacity, ...)."""

    server_id: str
    hostname: str
    reason: str
    at: str
