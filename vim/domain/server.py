"""Servers (IFA005 "virtualised compute"): what was asked for, where it is, what state it is in.

Stream: `server-<id>`. Who writes what:

- the API: `ServerAllocated` (BUILDING, task SCHEDULING), `ServerUpdated`,
  `ServerOperationRequested`, `ServerMigrationRequested`, `ServerTerminated`;
- the scheduler (a later issue): `ServerScheduled` (host chosen, task SPAWNING)
  or `ServerSchedulingFailed` (ERROR, with the reason);
- the compute agent of the server's host (a later issue): `ServerStateReported`,
  the actual state and power state, which ends the task in progress;
- during a migration, the agent of the source host: `ServerMigrationSourceReleased`
  once its copy is stopped and removed; only then may the target start it.

`state` is therefore what the control plane last learned, while
`desired_power_state` is what was last asked for; an operation only records the
request (`task` names it) and the agent reconciles. The operation table
(`TRANSITIONS`) is checked against `state`, and a second operation is refused
while a task is in progress, except in ERROR, from which recovery must always be
possible. DELETED is final: the tombstone keeps the server's last facts (its
NICs, MACs and addresses) for audit and for recovery to recreate it from.

A migration is a hand-off between two agents, never a server on two hosts: the
source host stops and removes its copy and records `ServerMigrationSourceReleased`
(`release_source`); the target starts nothing before that fact, and its report
(`report_state`) moves `host` to it and ends the migration. Until the release, a
report from the target decides nothing, and a report from the source never does
while the hand-off lasts (it is giving the server up).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.domain.faults import ServerRecoveryFailed
from vim.errors import DomainError, InvalidTransition

KIND = "server"
MAX_PRIORITY = 1000


def stream(server_id: str) -> str:
    return f"{KIND}-{server_id}"


class ServerState(enum.StrEnum):
    BUILDING = "BUILDING"
    ACTIVE = "ACTIVE"
    STOPPED = "STOPPED"
    PAUSED = "PAUSED"
    SUSPENDED = "SUSPENDED"
    ERROR = "ERROR"
    DELETED = "DELETED"


class PowerState(enum.StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    RUNNING = "RUNNING"
    SHUTDOWN = "SHUTDOWN"
    PAUSED = "PAUSED"
    SUSPENDED = "SUSPENDED"
    CRASHED = "CRASHED"


class Operation(enum.StrEnum):
    START = "START"
    STOP = "STOP"
    PAUSE = "PAUSE"
    UNPAUSE = "UNPAUSE"
    SUSPEND = "SUSPEND"
    RESUME = "RESUME"
    REBOOT = "REBOOT"


class Watchdog(enum.StrEnum):
    NONE = "NONE"
    RESET = "RESET"
    POWEROFF = "POWEROFF"
    PAUSE = "PAUSE"


class MigrationType(enum.StrEnum):
    LIVE = "LIVE"
    OFFLINE = "OFFLINE"


S = ServerState


@dataclass(frozen=True, slots=True)
class Transition:
    allowed_from: frozenset[ServerState]
    desired_power: PowerState
    task: str


TRANSITIONS: Mapping[Operation, Transition] = {
    Operation.START: Transition(frozenset({S.STOPPED}), PowerState.RUNNING, "STARTING"),
    Operation.STOP: Transition(
        frozenset({S.ACTIVE, S.PAUSED, S.SUSPENDED, S.ERROR}), PowerState.SHUTDOWN, "STOPPING"
    ),
    Operation.PAUSE: Transition(frozenset({S.ACTIVE}), PowerState.PAUSED, "PAUSING"),
    Operation.UNPAUSE: Transition(frozenset({S.PAUSED}), PowerState.RUNNING, "UNPAUSING"),
    Operation.SUSPEND: Transition(frozenset({S.ACTIVE}), PowerState.SUSPENDED, "SUSPENDING"),
    Operation.RESUME: Transition(frozenset({S.SUSPENDED}), PowerState.RUNNING, "RESUMING"),
    Operation.REBOOT: Transition(frozenset({S.ACTIVE, S.ERROR}), PowerState.RUNNING, "REBOOTING"),
}
"""Which states each operation is allowed from, the power state it asks for, its task."""

LIVE_MIGRATABLE = frozenset({S.ACTIVE, S.PAUSED})
OFFLINE_MIGRATABLE = frozenset({S.ACTIVE, S.STOPPED})
REPORTABLE = frozenset({S.ACTIVE, S.STOPPED, S.PAUSED, S.SUSPENDED, S.ERROR})


class MigrationNotAllowed(DomainError):
    """The server's migration constraints forbid this migration."""


# --- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerAllocated(DomainEvent):
    server_id: str
    tenant_id: str
    name: str
    flavor: dict[str, Any]
    """flavor_id, name, vcpus, ram_mb, disk_gb: a copy, the flavour may be deleted later."""
    image_id: str
    nics: list[dict[str, Any]]
    """port_id, network_id, mac_address, ip_addresses, owned; in the order requested."""
    affinity_group_id: str = ""
    zone: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    watchdog: str = Watchdog.NONE.value
    live_migration_allowed: bool = True
    max_interruption_ms: int = 0
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerUpdated(DomainEvent):
    server_id: str
    name: str
    metadata: dict[str, str]
    updated_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerOperationRequested(DomainEvent):
    server_id: str
    operation: str
    desired_power_state: str
    requested_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerMigrationRequested(DomainEvent):
    server_id: str
    migration_type: str
    source_host: str
    target_host: str = ""
    """Empty: the scheduler picks the destination."""
    max_interruption_ms: int = 0
    requested_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerMigrationSourceReleased(DomainEvent):
    """The source host of a migration stopped and removed its copy: the target may start it."""

    server_id: str
    host: str
    released_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerMigrationAbandoned(DomainEvent):
    """A migration its source never released in time: the server stays on the source
    (which still holds it), the target's claim is given back in the same append."""

    server_id: str
    source_host: str
    target_host: str
    reason: str = ""
    abandoned_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerScheduled(DomainEvent):
    server_id: str
    host: str
    zone: str = ""
    scheduled_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerSchedulingFailed(DomainEvent):
    server_id: str
    reason: str
    failed_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerStateReported(DomainEvent):
    """What the agent of the server's host observed; ends the task in progress."""

    server_id: str
    host: str
    state: str
    power_state: str
    task: str = ""
    progress: int = 0
    fault_reason: str = ""
    reported_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerEvacuationRequested(DomainEvent):
    """The fault manager rebuilds the server elsewhere after its host was fenced.

    Back to BUILDING with no host (task EVACUATING), so the scheduler places it
    again; everything that makes it the same server (id, name, image, flavour,
    NICs with their MAC and IP addresses, metadata, group, watchdog, priority,
    migration constraints) is kept. See `vim.domain.evacuation`.
    """

    server_id: str
    from_host: str
    reason: str = ""
    requested_at: str = ""


@dataclass(frozen=True, slots=True)
class ServerTerminated(DomainEvent):
    server_id: str
    terminated_at: str = ""


# --- state --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Nic:
    port_id: str
    network_id: str
    mac_address: str
    ip_addresses: tuple[str, ...]
    owned: bool = True
    """Whether the server made the port (it is released with it) or was given it (unbound)."""

    def data(self) -> dict[str, Any]:
        return {
            "port_id": self.port_id,
            "network_id": self.network_id,
            "mac_address": self.mac_address,
            "ip_addresses": list(self.ip_addresses),
            "owned": self.owned,
        }


@dataclass(frozen=True, slots=True)
class FlavorCopy:
    flavor_id: str
    name: str
    vcpus: int
    ram_mb: int
    disk_gb: int


@dataclass(frozen=True, slots=True)
class Server:
    server_id: str
    tenant_id: str
    name: str
    flavor: FlavorCopy
    image_id: str
    nics: tuple[Nic, ...]
    affinity_group_id: str
    zone: str
    metadata: dict[str, str]
    priority: int
    watchdog: Watchdog
    live_migration_allowed: bool
    max_interruption_ms: int
    created_at: str
    updated_at: str
    host: str = ""
    state: ServerState = ServerState.BUILDING
    task: str = "SCHEDULING"
    progress: int = 0
    fault_reason: str = ""
    power_state: PowerState = PowerState.UNSPECIFIED
    desired_power_state: PowerState = PowerState.RUNNING
    migration_target: str = ""
    migration_released: bool = False
    """The migration's source host has stopped and removed its copy (the target may start)."""
    migration_released_at: str = ""
    migration_requested_at: str = ""
    evacuated_from: str = ""
    """The failed host the server was last evacuated from (empty if never)."""
    recovery: str = ""
    """Evacuation progress: "" (none), EVACUATING, PLACED, FAILED."""

    @property
    def deleted(self) -> bool:
        return self.state is ServerState.DELETED

    def quota_amounts(self) -> dict[str, int]:
        """What the server holds of its tenant's quota."""
        owned_ports = sum(1 for n in self.nics if n.owned)
        return {
            "cores": self.flavor.vcpus,
            "ram_mb": self.flavor.ram_mb,
            "instances": 1,
            "ports": owned_ports,
        }

    def view(self) -> dict[str, Any]:
        """The proto3 JSON view (the API's `Server` message)."""
        f = self.flavor
        return {
            "serverId": self.server_id,
            "name": self.name,
            "tenantId": self.tenant_id,
            "flavour": {
                "flavourId": f.flavor_id,
                "name": f.name,
                "vcpus": f.vcpus,
                "ramMb": str(f.ram_mb),
                "diskGb": str(f.disk_gb),
            },
            "imageId": self.image_id,
            "nics": [
                {
                    "portId": n.port_id,
                    "networkId": n.network_id,
                    "macAddress": n.mac_address,
                    "ipAddresses": list(n.ip_addresses),
                }
                for n in self.nics
            ],
            "affinityGroupId": self.affinity_group_id,
            "zone": self.zone,
            "host": self.host,
            "state": f"SERVER_STATE_{self.state.value}",
            "task": self.task,
            "progress": self.progress,
            "faultReason": self.fault_reason,
            "powerState": f"POWER_STATE_{self.power_state.value}",
            "desiredPowerState": f"POWER_STATE_{self.desired_power_state.value}",
            "metadata": dict(self.metadata),
            "priority": self.priority,
            "watchdog": f"WATCHDOG_POLICY_{self.watchdog.value}",
            "migration": {
                "liveMigrationAllowed": self.live_migration_allowed,
                "maxInterruptionMs": self.max_interruption_ms,
            },
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            **({"recovery": self.recovery} if self.recovery else {}),
            **({"evacuatedFrom": self.evacuated_from} if self.evacuated_from else {}),
            **({"migrationTarget": self.migration_target} if self.migration_target else {}),
        }


def _allocated(e: ServerAllocated) -> Server:
    f = e.flavor
    return Server(
        server_id=e.server_id,
        tenant_id=e.tenant_id,
        name=e.name,
        flavor=FlavorCopy(
            str(f["flavor_id"]),
            str(f["name"]),
            int(f["vcpus"]),
            int(f["ram_mb"]),
            int(f["disk_gb"]),
        ),
        image_id=e.image_id,
        nics=tuple(
            Nic(
                n["port_id"],
                n["network_id"],
                n["mac_address"],
                tuple(n["ip_addresses"]),
                bool(n.get("owned", True)),
            )
            for n in e.nics
        ),
        affinity_group_id=e.affinity_group_id,
        zone=e.zone,
        metadata=dict(e.metadata),
        priority=e.priority,
        watchdog=Watchdog(e.watchdog),
        live_migration_allowed=e.live_migration_allowed,
        max_interruption_ms=e.max_interruption_ms,
        created_at=e.created_at,
        updated_at=e.created_at,
    )


def _reported(s: Server, e: ServerStateReported) -> Server:
    return replace(
        s,
        host=e.host or s.host,
        state=ServerState(e.state),
        power_state=PowerState(e.power_state),
        task=e.task,
        progress=e.progress,
        fault_reason=e.fault_reason,
        migration_target="",
        migration_released=False,
        migration_released_at="",
        migration_requested_at="",
        updated_at=e.reported_at or s.updated_at,
    )


def evolve(state: Server | None, event: DomainEvent, _recorded: object = None) -> Server:
    """Fold one event; after ServerTerminated only the tombstone remains (later reports ignored)."""
    if isinstance(event, ServerAllocated):
        return _allocated(event)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before ServerAllocated")
    if state.deleted:
        return state
    match event:
        case ServerUpdated():
            return replace(
                state, name=event.name, metadata=dict(event.metadata), updated_at=event.updated_at
            )
        case ServerOperationRequested():
            task = TRANSITIONS[Operation(event.operation)].task
            power = PowerState(event.desired_power_state)
            return replace(
                state,
                task=task,
                desired_power_state=power,
                progress=0,
                updated_at=event.requested_at,
            )
        case ServerMigrationRequested():
            return replace(
                state,
                task="MIGRATING",
                progress=0,
                migration_target=event.target_host,
                migration_released=False,
                migration_released_at="",
                migration_requested_at=event.requested_at,
                updated_at=event.requested_at,
            )
        case ServerMigrationAbandoned():
            return replace(
                state,
                task="" if state.task == "MIGRATING" else state.task,
                migration_target="",
                migration_released=False,
                migration_released_at="",
                migration_requested_at="",
                updated_at=event.abandoned_at or state.updated_at,
            )
        case ServerMigrationSourceReleased():
            return replace(
                state,
                migration_released=True,
                migration_released_at=event.released_at,
                updated_at=event.released_at or state.updated_at,
            )
        case ServerScheduled():
            return replace(
                state,
                host=event.host,
                zone=event.zone or state.zone,
                task="SPAWNING",
                recovery="PLACED" if state.recovery == "EVACUATING" else state.recovery,
                updated_at=event.scheduled_at,
            )
        case ServerEvacuationRequested():
            return replace(
                state,
                host="",
                state=ServerState.BUILDING,
                task="EVACUATING",
                progress=0,
                fault_reason="",
                power_state=PowerState.UNSPECIFIED,
                migration_target="",
                migration_released=False,
                migration_released_at="",
                migration_requested_at="",
                evacuated_from=event.from_host,
                recovery="EVACUATING",
                updated_at=event.requested_at,
            )
        case ServerRecoveryFailed():
            return replace(state, recovery="FAILED", fault_reason=event.reason, updated_at=event.at)
        case ServerSchedulingFailed():
            return replace(
                state,
                state=ServerState.ERROR,
                task="",
                fault_reason=event.reason,
                updated_at=event.failed_at,
            )
        case ServerStateReported():
            return _reported(state, event)
        case ServerTerminated():
            return replace(
                state, state=ServerState.DELETED, task="", updated_at=event.terminated_at
            )
    return state


# --- decisions ----------------------------------------------------------------------------


def allocate(
    server_id: str,
    tenant_id: str,
    name: str,
    flavor: FlavorCopy,
    image_id: str,
    nics: Sequence[Nic],
    *,
    now: str,
    affinity_group_id: str = "",
    zone: str = "",
    metadata: Mapping[str, str] | None = None,
    priority: int = 0,
    watchdog: Watchdog = Watchdog.NONE,
    live_migration_allowed: bool = True,
    max_interruption_ms: int = 0,
) -> ServerAllocated:
    """A new server, BUILDING until the scheduler places it."""
    if not 0 <= priority <= MAX_PRIORITY:
        raise DomainError(f"priority must be 0-{MAX_PRIORITY}, got {priority}")
    return ServerAllocated(
        server_id,
        tenant_id,
        name,
        {
            "flavor_id": flavor.flavor_id,
            "name": flavor.name,
            "vcpus": flavor.vcpus,
            "ram_mb": flavor.ram_mb,
            "disk_gb": flavor.disk_gb,
        },
        image_id,
        [n.data() for n in nics],
        affinity_group_id,
        zone,
        dict(metadata or {}),
        priority,
        watchdog.value,
        live_migration_allowed,
        max_interruption_ms,
        now,
    )


def _alive(s: Server, action: str) -> None:
    if s.deleted:
        raise InvalidTransition(f"server {s.server_id} is DELETED: cannot {action}")


def update(
    s: Server, name: str | None, metadata: Mapping[str, str] | None, now: str
) -> list[DomainEvent]:
    """Rename and/or replace the metadata; nothing if neither changes."""
    _alive(s, "update")
    new_name = s.name if name is None else name
    new_meta = dict(s.metadata if metadata is None else metadata)
    if new_name == s.name and new_meta == s.metadata:
        return []
    return [ServerUpdated(s.server_id, new_name, new_meta, now)]


def operate(s: Server, op: Operation, now: str) -> ServerOperationRequested:
    """Request a power operation; InvalidTransition if the state does not allow it."""
    _alive(s, op.value.lower())
    t = TRANSITIONS[op]
    if s.state not in t.allowed_from:
        allowed = ", ".join(sorted(x.value for x in t.allowed_from))
        raise InvalidTransition(
            f"server {s.server_id} is {s.state.value}: {op.value} needs {allowed}"
        )
    _no_task(s, op.value)
    return ServerOperationRequested(s.server_id, op.value, t.desired_power.value, now)


def _no_task(s: Server, what: str) -> None:
    if s.task and s.state is not ServerState.ERROR:
        raise InvalidTransition(
            f"server {s.server_id} is busy ({s.task}): {what} must wait until it ends"
        )


def migrate(s: Server, kind: MigrationType, target_host: str, now: str) -> ServerMigrationRequested:
    """Request a migration, within the server's migration constraints."""
    _alive(s, "migrate")
    if kind is MigrationType.LIVE and not s.live_migration_allowed:
        raise MigrationNotAllowed(f"server {s.server_id} does not allow live migration")
    allowed = LIVE_MIGRATABLE if kind is MigrationType.LIVE else OFFLINE_MIGRATABLE
    if s.state not in allowed or not s.host:
        names = ", ".join(sorted(x.value for x in allowed))
        raise InvalidTransition(
            f"server {s.server_id} is {s.state.value}: {kind.value} migration needs {names}"
        )
    _no_task(s, "migration")
    if target_host == s.host:
        raise InvalidTransition(f"server {s.server_id} is already on {target_host}")
    return ServerMigrationRequested(
        s.server_id, kind.value, s.host, target_host, s.max_interruption_ms, now
    )


def terminate(s: Server, now: str) -> ServerTerminated:
    """Delete the server (from any state but DELETED); the caller releases what it held."""
    _alive(s, "terminate")
    return ServerTerminated(s.server_id, now)


def schedule(s: Server, host: str, zone: str, now: str) -> ServerScheduled:
    """The scheduler placed a BUILDING server."""
    if s.state is not ServerState.BUILDING or s.host:
        raise InvalidTransition(f"server {s.server_id} is {s.state.value}: cannot schedule")
    return ServerScheduled(s.server_id, host, zone, now)


def scheduling_failed(s: Server, reason: str, now: str) -> ServerSchedulingFailed:
    """The scheduler found no place for a BUILDING server: it goes to ERROR."""
    if s.state is not ServerState.BUILDING:
        raise InvalidTransition(f"server {s.server_id} is {s.state.value}: not scheduling")
    return ServerSchedulingFailed(s.server_id, reason, now)


def report_state(
    s: Server,
    host: str,
    state: ServerState,
    power: PowerState,
    now: str,
    *,
    fault_reason: str = "",
) -> list[DomainEvent]:
    """An agent's observation; only the server's own host may report, nothing if unchanged."""
    if s.deleted:
        return []
    if not s.host or host not in (s.host, s.migration_target):
        raise DomainError(f"host {host} may not report on server {s.server_id}")
    if state not in REPORTABLE:
        raise DomainError(f"a host cannot report state {state.value}")
    if handing_off(s) and (host == s.host or not s.migration_released):
        return []  # the source is giving the server up; the target may speak once it has
    if (s.state, s.power_state, s.task, s.fault_reason, s.host) == (
        state,
        power,
        "",
        fault_reason,
        host,
    ):
        return []
    return [
        ServerStateReported(
            s.server_id, host, state.value, power.value, fault_reason=fault_reason, reported_at=now
        )
    ]


def handing_off(s: Server) -> bool:
    """A migration to another host is in progress (source `host`, target `migration_target`)."""
    return (
        not s.deleted
        and s.task == "MIGRATING"
        and bool(s.migration_target)
        and s.migration_target != s.host
    )


def abandon_migration(s: Server, reason: str, now: str) -> ServerMigrationAbandoned:
    """Give up a migration whose source has not released the server: it stays there."""
    if not handing_off(s) or s.migration_released:
        raise InvalidTransition(
            f"server {s.server_id} has no migration waiting for its source to release it"
        )
    return ServerMigrationAbandoned(s.server_id, s.host, s.migration_target, reason, now)


def release_source(s: Server, host: str, now: str) -> list[DomainEvent]:
    """The source host of a migration stopped and removed its copy; nothing if already said.

    Only the source (`host`) of a migration in progress may say so: anything else is
    a DomainError (the caller maps a host that is not the source to PermissionDenied).
    """
    if s.deleted:
        return []
    if not handing_off(s) or host != s.host:
        raise DomainError(f"host {host} is not the source of a migration of {s.server_id}")
    if s.migration_released:
        return []
    return [ServerMigrationSourceReleased(s.server_id, host, now)]
