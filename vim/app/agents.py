"""What a compute agent may read and record, decided against the read model.

An agent speaks only for itself (docs/AGENT.md): every function here takes the
caller's hostname (from its token, never from the request alone) and refuses,
with `PermissionDenied`, anything about another host or about a server that is
not placed on the caller's host (its `host`, or the target of a migration in
progress). An unknown server is refused the same way, so an agent learns
nothing about servers that are not its own.

- `desired(model, hostname)`: the full desired state of the host (servers
  placed on it and not deleted, its state, its network plan), level-triggered.
- `report_state`: the observed power state of one of its servers; the server
  state follows from it (`STATE_OF_POWER`); unchanged observations decide
  nothing (`server.report_state`).
- `release_source`: the source host of a migration stopped and removed its copy
  (`ServerMigrationSourceReleased`); only the source may say so, a repeat decides
  nothing. The target's desired state carries the fact (`may_start`), and the
  fingerprint covers it, so the target's watch wakes up at once.
- `server_fault`, `host_fault`, `self_fenced`: the facts of `vim.domain.faults`,
  on the server's or the host's stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from vim.app.commands import Change, Decision
from vim.domain import faults, host, netplan, server
from vim.domain.base import DomainEvent
from vim.errors import NotFound, PermissionDenied
from vim.projections.readmodel import ReadModel

STATE_OF_POWER: Mapping[server.PowerState, server.ServerState] = {
    server.PowerState.RUNNING: server.ServerState.ACTIVE,
    server.PowerState.SHUTDOWN: server.ServerState.STOPPED,
    server.PowerState.PAUSED: server.ServerState.PAUSED,
    server.PowerState.SUSPENDED: server.ServerState.SUSPENDED,
    server.PowerState.CRASHED: server.ServerState.ERROR,
}
"""The server state an observed power state means."""


@dataclass(frozen=True, slots=True)
class HostDesired:
    """Everything one host must run (see `desired`)."""

    hostname: str
    host_state: host.HostState | None
    """None when the host is not registered (yet)."""
    servers: tuple[server.Server, ...]
    plan: netplan.HostPlan | None
    position: int
    correlations: Mapping[str, str] = field(default_factory=dict)
    """Per server id, the correlation id of the last request that touched it."""

    def fingerprint(self) -> str:
        """Equal for equal desired states (whatever the position)."""
        h = hashlib.sha256(f"{self.hostname}\0{self.host_state}\0".encode())
        for s in self.servers:
            h.update(repr(s).encode())
        h.update(repr(self.plan).encode())
        h.update(repr(sorted(self.correlations.items())).encode())
        return h.hexdigest()[:32]


def placements(model: ReadModel) -> dict[str, tuple[server.Server, ...]]:
    """Every host's live servers (placed there or migrating there), by server id; one scan."""
    by_host: dict[str, list[server.Server]] = {}
    for s in _servers(model):
        if s.deleted:
            continue
        for h in {s.host, s.migration_target} - {""}:
            by_host.setdefault(h, []).append(s)
    return {h: tuple(sorted(v, key=lambda s: s.server_id)) for h, v in by_host.items()}


def desired(
    model: ReadModel,
    hostname: str,
    placed: dict[str, tuple[server.Server, ...]] | None = None,
) -> HostDesired:
    """The servers placed on `hostname` (by id), its state and its network plan.

    `placed`: `placements(model)` at the model's current position, when the caller
    has it (many hosts' snapshots from one scan); computed otherwise.
    """
    entry = model.get(host.stream(hostname))
    state: host.Host | None = entry.state if entry else None
    if placed is None:
        placed = placements(model)
    plan_entry = model.get(netplan.stream(hostname))
    plan: netplan.HostPlan | None = plan_entry.state if plan_entry else None
    servers = placed.get(hostname, ())
    correlations = {
        s.server_id: cid
        for s in servers
        if (cid := model.correlations.get(server.stream(s.server_id)))
    }
    return HostDesired(
        hostname,
        state.state if state else None,
        servers,
        plan,
        model.position,
        correlations,
    )


def _servers(model: ReadModel) -> list[server.Server]:
    return [e.state for _, e in model.of_kind(server.KIND) if isinstance(e.state, server.Server)]


def own_server(model: ReadModel, hostname: str, server_id: str) -> server.Server:
    """The server if it is placed on `hostname` (or migrating to it); else PermissionDenied."""
    entry = model.get(server.stream(server_id))
    s: server.Server | None = entry.state if entry else None
    if s is None or hostname not in (s.host, s.migration_target):
        raise PermissionDenied(f"server {server_id} is not placed on host {hostname}")
    return s


def own_host(model: ReadModel, hostname: str) -> host.Host:
    entry = model.get(host.stream(hostname))
    if entry is None:
        raise NotFound(f"host {hostname} is not registered")
    found: host.Host = entry.state
    return found


def report_state(
    model: ReadModel,
    hostname: str,
    server_id: str,
    power: server.PowerState,
    fault_reason: str,
    now: str,
) -> Decision:
    """Record an observed power state (nothing when the control plane knows it already)."""
    s = own_server(model, hostname, server_id)
    events = server.report_state(
        s, hostname, STATE_OF_POWER[power], power, now, fault_reason=fault_reason
    )
    decision = _on(model, server.stream(server_id), events)
    if events and s.host and s.host != hostname:
        # The migration ended on this host: the source's claim is given back in the same append.
        source = model.get(host.stream(s.host))
        released = host.release(source.state, server_id) if source else None
        if source is not None and released is not None:
            change = Change(host.stream(s.host), source.version, [released])
            return Decision([*decision.changes, change], decision.response)
    return decision


def migration_role(s: server.Server, hostname: str) -> str:
    """`hostname`'s part in a migration of `s` in progress: "SOURCE", "TARGET" or ""."""
    if not server.handing_off(s):
        return ""
    if hostname == s.host:
        return "SOURCE"
    return "TARGET" if hostname == s.migration_target else ""


def may_start(s: server.Server, hostname: str) -> bool:
    """Whether `hostname` may run `s`: never a migration's source, and its target only
    once the source released it (a server never runs on two hosts)."""
    role = migration_role(s, hostname)
    return role == "" or (role == "TARGET" and s.migration_released)


def release_source(model: ReadModel, hostname: str, server_id: str, now: str) -> Decision:
    """The source of a migration stopped and removed its copy (nothing if already recorded)."""
    s = own_server(model, hostname, server_id)
    if migration_role(s, hostname) != "SOURCE":
        raise PermissionDenied(
            f"host {hostname} is not the source of a migration of server {server_id}"
        )
    events = server.release_source(s, hostname, now)
    return _on(model, server.stream(server_id), events)


def server_fault(
    model: ReadModel, hostname: str, server_id: str, watchdog: bool, detail: str, now: str
) -> Decision:
    """A watchdog firing (`watchdog`) or an unexpected stop of one of the host's servers."""
    own_server(model, hostname, server_id)
    event: DomainEvent
    if watchdog:
        event = faults.ServerWatchdogFired(server_id, hostname, detail, now)
    else:
        event = faults.ServerCrashed(server_id, hostname, detail, now)
    return _on(model, server.stream(server_id), [event])


def host_fault(
    model: ReadModel,
    hostname: str,
    service: faults.HostService,
    recovered: bool,
    detail: str,
    restarts: int,
    now: str,
) -> Decision:
    """A supervised service failed, or recovered after `restarts` restarts."""
    own_host(model, hostname)
    event: DomainEvent
    if recovered:
        event = faults.HostServiceRecovered(hostname, service.value, restarts, now)
    else:
        event = faults.HostServiceFailed(hostname, service.value, detail, now)
    return _on(model, host.stream(hostname), [event])


def self_fenced(
    model: ReadModel,
    hostname: str,
    domains_destroyed: int,
    lease_lost_at: str,
    fenced_at: str,
    now: str,
) -> Decision:
    """The agent destroyed its domains after losing its lease (recorded once it is back)."""
    own_host(model, hostname)
    event = faults.HostSelfFenced(hostname, domains_destroyed, lease_lost_at, fenced_at, now)
    return _on(model, host.stream(hostname), [event])


def _on(model: ReadModel, sid: str, events: Sequence[DomainEvent]) -> Decision:
    changes = [Change(sid, model.version(sid), list(events))] if events else []
    return Decision(changes, {"recorded": bool(events)})
