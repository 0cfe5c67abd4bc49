"""Compute hosts (IFA005 "compute resource" capacity): registration, state, claims.

Stream: `host-<hostname>`; the hostname is a lowercase DNS label, so it is the id.

- A compute agent registers its host (admin role for now). A repeat with the same
  spec decides nothing; a changed spec is a `HostReconfigured`. Registration never
  changes the state: a FENCED or FAILED host must not come back merely by
  re-registering (recovery is a later issue's process manager).
- State: UP after the first registration; MAINTENANCE only through
  `enable_maintenance` (which also sets the flag) and back to UP only through
  `disable_maintenance`. DOWN, FAILED and FENCED are set with `change_state` by
  the failure detector and fencing (later issues).
- Evacuation on request: an operator may ask for a host's servers to be rebuilt
  elsewhere (`request_evacuation`, `HostEvacuationRequested`). Refused while the
  host is UP or in maintenance with a live agent (a planned move is maintenance,
  which migrates without fencing); a repeat while one is pending decides nothing.
  The fault manager fences the host first, evacuates, and ends the request
  (`HostEvacuationEnded`, DONE or DECLINED); a host back UP has none pending.
- Claims: the scheduler claims resources per server id. The state keeps one
  claim per server id, so a repeated claim replaces the earlier one (never
  counted twice; also how a resize is recorded) and a release of an unknown id
  decides nothing. `claim` refuses anything that would make usage exceed the
  schedulable total (physical amount times allocation ratio) or the host's
  instance limit. A re-registration may shrink the host below its usage (the
  agent reports what the hardware is); then a claim may not grow any resource
  that is over its total, so claims alone never create or worsen an over-commit.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.errors import DomainError, InvalidTransition, NotFound

KIND = "host"
DEFAULT_ZONE = "default"
DEFAULT_MAX_INSTANCES = 256


def stream(hostname: str) -> str:
    return f"{KIND}-{hostname}"


class HostState(enum.StrEnum):
    UP = "UP"
    DOWN = "DOWN"
    MAINTENANCE = "MAINTENANCE"
    FAILED = "FAILED"
    FENCED = "FENCED"


class Health(enum.StrEnum):
    OK = "OK"
    DEGRADED = "DEGRADED"
    FAILED = "FAILED"


class InsufficientCapacity(DomainError):
    """A claim would over-commit the host (after allocation ratios)."""

    def __init__(self, hostname: str, shortfalls: list[str]) -> None:
        super().__init__(f"host {hostname} cannot take the claim: {'; '.join(shortfalls)}")
        self.hostname = hostname
        self.shortfalls = shortfalls


class HostNotSchedulable(DomainError):
    """The host is not UP (maintenance, down, failed, fenced): it takes no new claims."""


@dataclass(frozen=True, slots=True)
class Resources:
    """An amount of each schedulable resource."""

    vcpus: int = 0
    ram_mb: int = 0
    disk_gb: int = 0
    instances: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.vcpus + other.vcpus,
            self.ram_mb + other.ram_mb,
            self.disk_gb + other.disk_gb,
            self.instances + other.instances,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.vcpus - other.vcpus,
            self.ram_mb - other.ram_mb,
            self.disk_gb - other.disk_gb,
            self.instances - other.instances,
        )

    def clamp(self) -> Resources:
        """Negative amounts (over-commit after a shrink, over-reservation) as zero."""
        return Resources(
            max(self.vcpus, 0), max(self.ram_mb, 0), max(self.disk_gb, 0), max(self.instances, 0)
        )


@dataclass(frozen=True, slots=True)
class HostSpec:
    """What an agent reports when it registers: hardware, ratios, addresses."""

    zone: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    cpu_allocation_ratio: float = 4.0
    ram_allocation_ratio: float = 1.0
    disk_allocation_ratio: float = 1.0
    hypervisor_type: str = "KVM"
    management_address: str = ""
    bmc_endpoint: str = ""
    max_instances: int = DEFAULT_MAX_INSTANCES
    tunnel_ip: str = ""
    """The host's VXLAN tunnel endpoint (underlay) address; "" means management_address."""

    def data(self) -> dict[str, Any]:
        return {
            "zone": self.zone,
            "vcpus": self.vcpus,
            "ram_mb": self.ram_mb,
            "disk_gb": self.disk_gb,
            "cpu_allocation_ratio": self.cpu_allocation_ratio,
            "ram_allocation_ratio": self.ram_allocation_ratio,
            "disk_allocation_ratio": self.disk_allocation_ratio,
            "hypervisor_type": self.hypervisor_type,
            "management_address": self.management_address,
            "bmc_endpoint": self.bmc_endpoint,
            "max_instances": self.max_instances,
            "tunnel_ip": self.tunnel_ip,
        }


# Events. Registration events carry the whole spec, flat, so a stored event reads
# on its own in the audit trail.


@dataclass(frozen=True, slots=True)
class HostRegistered(DomainEvent):
    hostname: str
    zone: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    cpu_allocation_ratio: float
    ram_allocation_ratio: float
    disk_allocation_ratio: float
    hypervisor_type: str
    management_address: str
    bmc_endpoint: str = ""
    max_instances: int = DEFAULT_MAX_INSTANCES
    at: str = ""
    tunnel_ip: str = ""


@dataclass(frozen=True, slots=True)
class HostReconfigured(DomainEvent):
    """A re-registration that changed the spec (capacity, ratios, addresses, zone)."""

    hostname: str
    zone: str
    vcpus: int
    ram_mb: int
    disk_gb: int
    cpu_allocation_ratio: float
    ram_allocation_ratio: float
    disk_allocation_ratio: float
    hypervisor_type: str
    management_address: str
    bmc_endpoint: str = ""
    max_instances: int = DEFAULT_MAX_INSTANCES
    at: str = ""
    tunnel_ip: str = ""


@dataclass(frozen=True, slots=True)
class HostStateChanged(DomainEvent):
    hostname: str
    state: str
    previous: str
    reason: str = ""
    at: str = ""


@dataclass(frozen=True, slots=True)
class HostHealthChanged(DomainEvent):
    hostname: str
    health: str
    reasons: list[str] = field(default_factory=list)
    at: str = ""


@dataclass(frozen=True, slots=True)
class HostMaintenanceEnabled(DomainEvent):
    hostname: str
    reason: str = ""
    at: str = ""


@dataclass(frozen=True, slots=True)
class HostMaintenanceDisabled(DomainEvent):
    hostname: str
    at: str = ""


@dataclass(frozen=True, slots=True)
class HostEvacuationRequested(DomainEvent):
    """An operator asked for the host's servers to be rebuilt elsewhere (fence first)."""

    hostname: str
    reason: str = ""
    at: str = ""


class EvacuationOutcome(enum.StrEnum):
    DONE = "DONE"
    """The host is fenced and every server on it was handed to the scheduler."""
    DECLINED = "DECLINED"
    """The fault manager saw the host's agent alive: nothing was fenced or moved."""


@dataclass(frozen=True, slots=True)
class HostEvacuationEnded(DomainEvent):
    """The fault manager finished with an operator's evacuation request."""

    hostname: str
    outcome: str  # an EvacuationOutcome value
    detail: str = ""
    at: str = ""


@dataclass(frozen=True, slots=True)
class HostResourcesClaimed(DomainEvent):
    hostname: str
    server_id: str
    vcpus: int
    ram_mb: int
    disk_gb: int


@dataclass(frozen=True, slots=True)
class HostResourcesReleased(DomainEvent):
    hostname: str
    server_id: str
    vcpus: int = 0
    ram_mb: int = 0
    disk_gb: int = 0


@dataclass(frozen=True, slots=True)
class Host:
    hostname: str
    spec: HostSpec
    state: HostState = HostState.UP
    health: Health = Health.OK
    health_reasons: tuple[str, ...] = ()
    maintenance: bool = False
    maintenance_reason: str = ""
    claims: Mapping[str, Resources] = field(default_factory=dict)
    used: Resources = Resources()
    registered_at: str = ""
    updated_at: str = ""
    evacuation_requested: bool = False
    """An operator's evacuation request is pending (`request_evacuation`)."""
    evacuation_reason: str = ""

    @property
    def total(self) -> Resources:
        """Schedulable totals: physical amounts times allocation ratios, rounded down."""
        s = self.spec
        return Resources(
            math.floor(s.vcpus * s.cpu_allocation_ratio),
            math.floor(s.ram_mb * s.ram_allocation_ratio),
            math.floor(s.disk_gb * s.disk_allocation_ratio),
            s.max_instances,
        )

    @property
    def free(self) -> Resources:
        """What a claim may still take (zero when over-committed after a shrink)."""
        return (self.total - self.used).clamp()

    @property
    def schedulable(self) -> bool:
        return self.state is HostState.UP and not self.maintenance


def _spec_of(e: HostRegistered | HostReconfigured) -> HostSpec:
    return HostSpec(
        e.zone,
        e.vcpus,
        e.ram_mb,
        e.disk_gb,
        e.cpu_allocation_ratio,
        e.ram_allocation_ratio,
        e.disk_allocation_ratio,
        e.hypervisor_type,
        e.management_address,
        e.bmc_endpoint,
        e.max_instances,
        e.tunnel_ip,
    )


def evolve(state: Host | None, event: DomainEvent, _recorded: object = None) -> Host:
    """Fold one event into the host (None before HostRegistered)."""
    if isinstance(event, HostRegistered):
        return Host(event.hostname, _spec_of(event), registered_at=event.at, updated_at=event.at)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before HostRegistered")
    match event:
        case HostReconfigured():
            return replace(state, spec=_spec_of(event), updated_at=event.at)
        case HostStateChanged():
            changed = replace(state, state=HostState(event.state), updated_at=event.at)
            if changed.state is HostState.UP:  # back in service: no request is pending
                return replace(changed, evacuation_requested=False, evacuation_reason="")
            return changed
        case HostHealthChanged():
            return replace(
                state,
                health=Health(event.health),
                health_reasons=tuple(event.reasons),
                updated_at=event.at,
            )
        case HostMaintenanceEnabled():
            return replace(state, maintenance=True, maintenance_reason=event.reason)
        case HostMaintenanceDisabled():
            return replace(state, maintenance=False, maintenance_reason="")
        case HostEvacuationRequested():
            return replace(state, evacuation_requested=True, evacuation_reason=event.reason)
        case HostEvacuationEnded():
            return replace(state, evacuation_requested=False, evacuation_reason="")
        case HostResourcesClaimed():
            claim = Resources(event.vcpus, event.ram_mb, event.disk_gb, 1)
            return _with_claims(state, {**state.claims, event.server_id: claim})
        case HostResourcesReleased():
            rest = {k: v for k, v in state.claims.items() if k != event.server_id}
            return _with_claims(state, rest)
    return state


def _with_claims(state: Host, claims: dict[str, Resources]) -> Host:
    used = sum(claims.values(), Resources())
    return replace(state, claims=claims, used=used)


# Decisions.


def register(state: Host | None, hostname: str, spec: HostSpec, now: str) -> list[DomainEvent]:
    """Register a host, or update its spec; nothing when the spec is unchanged."""
    if state is None:
        return [HostRegistered(hostname, **spec.data(), at=now)]
    if state.spec == spec:
        return []
    return [HostReconfigured(hostname, **spec.data(), at=now)]


def enable_maintenance(
    state: Host | None, hostname: str, reason: str, now: str
) -> list[DomainEvent]:
    """Set the maintenance flag and move to MAINTENANCE; nothing if already set."""
    host = _existing(state, hostname)
    if host.maintenance:
        return []
    return [
        HostMaintenanceEnabled(hostname, reason, now),
        HostStateChanged(
            hostname, HostState.MAINTENANCE.value, host.state.value, reason or "maintenance", now
        ),
    ]


def disable_maintenance(state: Host | None, hostname: str, now: str) -> list[DomainEvent]:
    """Clear the flag and return to UP; nothing if the host is not in maintenance."""
    host = _existing(state, hostname)
    if not host.maintenance:
        return []
    events: list[DomainEvent] = [HostMaintenanceDisabled(hostname, now)]
    if host.state is not HostState.UP:
        events.append(
            HostStateChanged(
                hostname, HostState.UP.value, host.state.value, "maintenance ended", now
            )
        )
    return events


def request_evacuation(
    state: Host | None, hostname: str, reason: str, agent_alive: bool, now: str
) -> list[DomainEvent]:
    """Record an operator's evacuation request; nothing if one is already pending.

    `agent_alive`: the host's agent holds its liveness lease (as the caller read
    it). A live agent on a host that has not failed refuses the request: fencing
    it would power off a working host, and moving its servers is what
    maintenance does (live or cold migration, no fencing). A FAILED or FENCED
    host may be evacuated whatever its lease says (a held, flapping host).
    """
    host = _existing(state, hostname)
    if host.evacuation_requested:
        return []
    if agent_alive and host.state not in (HostState.FAILED, HostState.FENCED):
        if host.maintenance:
            raise InvalidTransition(
                f"host {hostname} is in maintenance and its agent is alive: its servers are "
                "being migrated off it (see `vimctl host servers`); evacuation fences a host, "
                "so it is only for a host whose agent is gone"
            )
        raise InvalidTransition(
            f"host {hostname} is {host.state} and its agent is alive: evacuation fences the "
            "host (powers it off); for a planned move enable maintenance instead "
            f"(`vimctl host maintenance enable {hostname} --wait`)"
        )
    return [HostEvacuationRequested(hostname, reason, now)]


def change_state(
    state: Host | None, hostname: str, to: HostState, reason: str, now: str
) -> HostStateChanged | None:
    """Move to DOWN, FAILED, FENCED or UP (failure detection, fencing); None if already there.

    MAINTENANCE is entered and left only through the maintenance commands, so a
    host under maintenance is not declared UP by a heartbeat.
    """
    host = _existing(state, hostname)
    if to is HostState.MAINTENANCE:
        raise InvalidTransition("use enable_maintenance to put a host into maintenance")
    if to is HostState.UP and host.maintenance:
        raise InvalidTransition(f"host {hostname} is in maintenance; disable maintenance first")
    if host.state is to:
        return None
    return HostStateChanged(hostname, to.value, host.state.value, reason, now)


def report_health(
    state: Host | None, hostname: str, health: Health, reasons: list[str], now: str
) -> HostHealthChanged | None:
    """Record the host's health; None when health and reasons are unchanged."""
    host = _existing(state, hostname)
    if host.health is health and host.health_reasons == tuple(reasons):
        return None
    return HostHealthChanged(hostname, health.value, list(reasons), now)


def claim(
    state: Host | None, server_id: str, vcpus: int, ram_mb: int, disk_gb: int
) -> HostResourcesClaimed:
    """Claim resources for a server; replaces its earlier claim; InsufficientCapacity if over."""
    if state is None:
        raise NotFound("host not found")
    if min(vcpus, ram_mb, disk_gb) < 0:
        raise InvalidTransition("a claim cannot be negative")
    if not state.schedulable:
        raise HostNotSchedulable(f"host {state.hostname} is {state.state}, not schedulable")
    prior = state.claims.get(server_id, Resources())
    after = state.used - prior + Resources(vcpus, ram_mb, disk_gb, 1)
    total = state.total
    short = [
        f"{name} {getattr(after, name)} > {getattr(total, name)}"
        for name in ("vcpus", "ram_mb", "disk_gb", "instances")
        if getattr(after, name) > getattr(total, name)
        and getattr(after, name) > getattr(state.used, name)
    ]
    if short:
        raise InsufficientCapacity(state.hostname, short)
    return HostResourcesClaimed(state.hostname, server_id, vcpus, ram_mb, disk_gb)


def release(state: Host | None, server_id: str) -> HostResourcesReleased | None:
    """Release a server's claim; None when it holds none (so a repeat is harmless)."""
    if state is None:
        raise NotFound("host not found")
    held = state.claims.get(server_id)
    if held is None:
        return None
    return HostResourcesReleased(state.hostname, server_id, held.vcpus, held.ram_mb, held.disk_gb)


def _existing(state: Host | None, hostname: str) -> Host:
    if state is None:
        raise NotFound(f"host {hostname} not found")
    return state
