"""Host failure recovery, as pure decisions: detect, fence, evacuate, rejoin.

The fault manager (`vim.faultd`) does the I/O: it watches liveness leases,
probes and fences through `ha.fencing`, and appends what these functions
decide. Facts go to the streams they are about:

- `host-<name>`: `HostFailureDetected` + `HostStateChanged(FAILED)`, then
  `HostFenceConfirmed` + `HostStateChanged(FENCED)` (or `HostFenceFailed`), and
  `HostRecovered` (+ `HostStateChanged(UP)` when it may rejoin);
- `server-<id>`: `ServerEvacuationRequested` (with the release of its claim on
  the failed host's stream, in the same append), later `ServerRecoveryFailed`
  when the scheduler could not place it.

Invariants:

- **Fence before recovery.** `evacuate` refuses unless the host is FENCED, so
  no server is rebuilt while its old host may still run it.
- **Same initial state.** An evacuation keeps the server's identity: id, name,
  image, flavour, NICs (port ids, MACs, IPs), metadata, affinity group,
  watchdog, priority and migration constraints; only the host is cleared, and
  the scheduler places it like any BUILDING server (anti-affinity is checked
  against the group's other members where they are now).
- **Once per failure.** Every decision is a no-op when its effect is already in
  the state (a server no longer on the failed host is not evacuated again; a
  FAILED host is not detected again), and the fault manager appends at the
  versions it read, so a second leader resuming after a crash adds nothing twice.
- **Higher priority first** (`evacuation_order`), then the oldest, then the id.
- **Operator's request.** `HostEvacuationRequested` (on the host stream) makes
  a host whose lease the fault manager does not see suspected at once; it is
  fenced exactly like a detected failure, and then evacuated even when the
  zone's policy is `none` (`must_evacuate`). The request ends with
  `HostEvacuationEnded`: DONE once the fenced host holds no server
  (`evacuation_done`), DECLINED when the agent is seen alive on a host that has
  not failed (`evacuation_declined`: a live host is never fenced on request).
- **Flap damping.** A host returning after a fence rejoins (UP) only if it has
  failed fewer than `FlapPolicy.max_failures` times within `window_s`; otherwise
  it is held FENCED until an operator returns it to service. While held it takes
  no placements, so it cannot cause another evacuation.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from vim.domain import host as hosts
from vim.domain import server as servers
from vim.domain.base import DomainEvent
from vim.domain.faults import (
    FailureKind,
    HostFailureDetected,
    HostFenceConfirmed,
    HostFenceFailed,
    HostRecovered,
    HostSelfFenced,
    ServerRecoveryFailed,
)
from vim.domain.reservation import rfc3339
from vim.errors import InvalidTransition

EVACUATING = "EVACUATING"
PLACED = "PLACED"
FAILED = "FAILED"


class RecoveryPolicy(enum.StrEnum):
    AUTO = "auto"
    """Evacuate to any host the scheduler picks."""
    RESERVED_HOST = "reserved_host"
    """Bring the zone's reserved hosts (kept in maintenance) into service, then evacuate."""
    NONE = "none"
    """Fence only; the servers stay assigned to the fenced host for an operator."""


@dataclass(frozen=True, slots=True)
class ZonePolicy:
    policy: RecoveryPolicy = RecoveryPolicy.AUTO
    reserved_hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FlapPolicy:
    window_s: float = 600.0
    max_failures: int = 2
    """A host that failed this many times within the window is held FENCED."""


class FencePhase(enum.StrEnum):
    NONE = ""
    DETECTED = "DETECTED"
    FENCE_FAILED = "FENCE_FAILED"
    FENCED = "FENCED"
    RECOVERED = "RECOVERED"


@dataclass(frozen=True, slots=True)
class HostFault:
    """A host's failure history, folded from the fault facts on its stream."""

    phase: FencePhase = FencePhase.NONE
    kind: str = ""
    lease_lost_at: str = ""
    failures: tuple[str, ...] = ()
    """When each failure was detected (RFC 3339), oldest first."""
    fence_attempts: int = 0
    self_fenced_at: str = ""
    """`fenced_at` of a HostSelfFenced recorded after the newest failure ("" if none)."""
    drained: bool = False
    """HostDrained was recorded since maintenance was last enabled."""


def fold_fault(events: Iterable[DomainEvent]) -> HostFault:
    """Fold a host stream's events (others are ignored) into its fault history."""
    f = HostFault()
    for e in events:
        match e:
            case HostFailureDetected():
                f = HostFault(
                    FencePhase.DETECTED,
                    e.kind,
                    e.lease_lost_at,
                    (*f.failures, e.at),
                    drained=f.drained,
                )
            case HostFenceConfirmed():
                f = replace(f, phase=FencePhase.FENCED)
            case HostFenceFailed():
                f = replace(f, phase=FencePhase.FENCE_FAILED, fence_attempts=f.fence_attempts + 1)
            case HostRecovered():
                f = replace(f, phase=FencePhase.RECOVERED)
            case HostSelfFenced():
                f = replace(f, self_fenced_at=e.fenced_at)
            case hosts.HostMaintenanceEnabled():
                f = replace(f, drained=False)
            case HostDrained():
                f = replace(f, drained=True)
    return f


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- detection and fencing ------------------------------------------------------------


def classify(oob_answers: bool) -> FailureKind:
    """Lease lost but the BMC answers: the software died. Neither answers: the hardware."""
    return FailureKind.COMPUTE_NODE if oob_answers else FailureKind.HARDWARE


WATCHED = frozenset({hosts.HostState.UP, hosts.HostState.DOWN, hosts.HostState.MAINTENANCE})
"""Host states in which a lost lease is a new failure (FAILED/FENCED already are one)."""


def detect(
    h: hosts.Host, kind: FailureKind, detail: str, lease_lost_at: str, now: str
) -> list[DomainEvent]:
    """Record a failure and move the host to FAILED; nothing if it is already failed."""
    if h.state not in WATCHED:
        return []
    changed = hosts.change_state(h, h.hostname, hosts.HostState.FAILED, f"{kind}: {detail}", now)
    events: list[DomainEvent] = [
        HostFailureDetected(h.hostname, kind.value, detail, lease_lost_at, now)
    ]
    if changed is not None:
        events.append(changed)
    return events


def fence_confirmed(h: hosts.Host, method: str, detail: str, now: str) -> list[DomainEvent]:
    """The host is off (or self-fenced past TTL + margin): FENCED; only from FAILED."""
    if h.state is not hosts.HostState.FAILED:
        return []
    changed = hosts.change_state(h, h.hostname, hosts.HostState.FENCED, f"fenced: {method}", now)
    assert changed is not None
    return [HostFenceConfirmed(h.hostname, method, detail, now), changed]


def fence_failed(h: hosts.Host, method: str, reason: str, now: str) -> list[DomainEvent]:
    """A fencing attempt failed: recorded (the alarm); the host stays FAILED, no recovery."""
    if h.state is not hosts.HostState.FAILED:
        return []
    return [HostFenceFailed(h.hostname, method, reason, now)]


# --- evacuation -----------------------------------------------------------------------


def evacuation_order(on_host: Iterable[servers.Server]) -> list[servers.Server]:
    """Live servers in recovery order: higher priority first, then the oldest, then the id."""
    live = [s for s in on_host if not s.deleted]
    return sorted(live, key=lambda s: (-s.priority, s.created_at, s.server_id))


def runs_on(s: servers.Server) -> str:
    """The host whose failure takes `s` with it: its host, except once the source of a
    migration has released it, when only the migration's target may run it (the
    source has no copy left: its failure changes nothing, the target's loses it)."""
    if servers.handing_off(s) and s.migration_released:
        return s.migration_target
    return s.host


def to_evacuate(h: hosts.Host, all_servers: Iterable[servers.Server]) -> list[servers.Server]:
    """The servers a fenced host takes with it (`runs_on`), in recovery order."""
    return evacuation_order(s for s in all_servers if runs_on(s) == h.hostname)


def evacuate(
    h: hosts.Host,
    s: servers.Server,
    reason: str,
    now: str,
    migration_peer: hosts.Host | None = None,
) -> dict[str, list[DomainEvent]]:
    """Rebuild `s` elsewhere: the events per stream (server, and its claim on the host).

    Refused unless the host is FENCED and the server runs there (`runs_on`). A
    server caught in a migration also gives back its claim on the migration's other
    host (`migration_peer`: the destination when the source failed, the source when
    the destination failed after the source had released it).
    """
    if h.state is not hosts.HostState.FENCED:
        raise InvalidTransition(f"host {h.hostname} is {h.state}: evacuation needs FENCED")
    if s.deleted or runs_on(s) != h.hostname:
        raise InvalidTransition(f"server {s.server_id} is not on {h.hostname}")
    out: dict[str, list[DomainEvent]] = {
        servers.stream(s.server_id): [
            servers.ServerEvacuationRequested(s.server_id, h.hostname, reason, now)
        ]
    }
    released = hosts.release(h, s.server_id)
    if released is not None:
        out[hosts.stream(h.hostname)] = [released]
    peer = migration_peer
    if (
        peer is not None
        and peer.hostname != h.hostname
        and peer.hostname == migration_peer_of(s, h.hostname)
    ):
        given_back = hosts.release(peer, s.server_id)
        if given_back is not None:
            out[hosts.stream(peer.hostname)] = [given_back]
    return out


def migration_peer_of(s: servers.Server, failed: str) -> str:
    """The other host of a migration of `s` in progress, seen from `failed` ("" if none)."""
    if not s.migration_target or s.migration_target == s.host:
        return ""
    if failed == s.host:
        return s.migration_target
    return s.host if failed == s.migration_target else ""


def migration_stalled(
    s: servers.Server, now: datetime, timeout_s: float
) -> servers.ServerMigrationAbandoned | None:
    """A migration whose source has not released the server `timeout_s` after it was
    requested: abandon it (the server stays where it runs). None while it may still
    complete, once released (the target has it then: a failing target is a host
    fault), and for a migration recorded before its request time was kept."""
    if not servers.handing_off(s) or s.migration_released or not s.migration_requested_at:
        return None
    try:
        requested = parse_time(s.migration_requested_at)
    except ValueError:
        return None  # a time this cannot read: nothing to measure the wait against
    if requested.tzinfo is None:
        requested = requested.replace(tzinfo=UTC)
    waited = (now - requested).total_seconds()
    if waited < timeout_s:
        return None
    reason = (
        f"source host {s.host} did not release the server within {timeout_s:g} s "
        f"of the migration to {s.migration_target}"
    )
    return servers.abandon_migration(s, reason, rfc3339(now))


def recovery_failed(s: servers.Server, now: str) -> ServerRecoveryFailed | None:
    """An evacuated server the scheduler could not place (ERROR): record it, once."""
    if s.recovery != EVACUATING or s.state is not servers.ServerState.ERROR:
        return None
    reason = s.fault_reason or "no host could take it"
    return ServerRecoveryFailed(s.server_id, s.evacuated_from, reason, now)


def reserved_to_enable(policy: ZonePolicy, all_hosts: Mapping[str, hosts.Host]) -> list[hosts.Host]:
    """The zone's reserved hosts still held in maintenance (to bring into service)."""
    if policy.policy is not RecoveryPolicy.RESERVED_HOST:
        return []
    found = (all_hosts.get(name) for name in policy.reserved_hosts)
    return [h for h in found if h is not None and h.maintenance]


# --- an operator's request -------------------------------------------------------------


def must_evacuate(h: hosts.Host, policy: ZonePolicy) -> bool:
    """Whether a fenced host's servers are rebuilt elsewhere: by the zone's policy, or
    because an operator asked (policy `none` leaves that decision to an operator)."""
    return policy.policy is not RecoveryPolicy.NONE or h.evacuation_requested


def evacuation_declined(h: hosts.Host, now: str) -> list[DomainEvent]:
    """End a request on a host whose agent is alive and that has not failed: nothing is
    fenced (the API refuses such a request; this covers a lease that came back since)."""
    if not h.evacuation_requested or h.state not in WATCHED:
        return []
    detail = "the host's agent holds its liveness lease: not fenced, nothing moved"
    return [hosts.HostEvacuationEnded(h.hostname, hosts.EvacuationOutcome.DECLINED, detail, now)]


def evacuation_done(
    h: hosts.Host, on_host: Iterable[servers.Server], now: str
) -> list[DomainEvent]:
    """End a request once the host is FENCED and no live server is assigned to it."""
    if not h.evacuation_requested or h.state is not hosts.HostState.FENCED:
        return []
    if any(not s.deleted and runs_on(s) == h.hostname for s in on_host):
        return []
    detail = "fenced; every server handed to the scheduler"
    return [hosts.HostEvacuationEnded(h.hostname, hosts.EvacuationOutcome.DONE, detail, now)]


# --- rejoin ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rejoin:
    events: list[DomainEvent] = field(default_factory=list)
    held: bool = False
    """True when the host stays FENCED for an operator (flapping)."""


def lease_returned(
    h: hosts.Host, fault: HostFault, now: datetime, flap: FlapPolicy, at: str
) -> Rejoin:
    """The host's lease is back. After a fence: HostRecovered, and UP unless flapping.

    Before the fence is decided (DETECTED) nothing is decided: fencing goes on,
    because the host's servers may be in doubt. A host in maintenance stays out
    of service (only the maintenance command returns it).
    """
    if h.state not in (hosts.HostState.FENCED, hosts.HostState.FAILED):
        return Rejoin()
    if fault.phase not in (FencePhase.FENCED, FencePhase.FENCE_FAILED):
        return Rejoin()
    events: list[DomainEvent] = [HostRecovered(h.hostname, at)]
    since = now - timedelta(seconds=flap.window_s)
    recent = sum(1 for t in fault.failures if parse_time(t) >= since)
    if recent >= flap.max_failures or h.maintenance:
        return Rejoin(events, held=True)
    up = hosts.change_state(h, h.hostname, hosts.HostState.UP, "lease renewed after fence", at)
    if up is not None:
        events.append(up)
    return Rejoin(events)


# --- maintenance drain (planned evacuation) --------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerDrainBlocked(DomainEvent):
    """A server on a host in maintenance cannot be moved within its migration constraints."""

    server_id: str
    hostname: str
    reason: str
    at: str


@dataclass(frozen=True, slots=True)
class HostDrained(DomainEvent):
    """The host in maintenance runs no server and holds no claim: it may be worked on."""

    hostname: str
    at: str


@dataclass(frozen=True, slots=True)
class DrainPolicy:
    max_per_group: int = 1
    """At most this many simultaneous migrations per affinity group (one VNF)."""


@dataclass(frozen=True, slots=True)
class Move:
    server: servers.Server
    kind: servers.MigrationType


@dataclass(frozen=True, slots=True)
class Blocked:
    server: servers.Server
    reason: str


def _migrating(s: servers.Server) -> bool:
    return s.task == "MIGRATING"


def drain_step(
    h: hosts.Host,
    on_host: Iterable[servers.Server],
    group_inflight: Mapping[str, int],
    policy: DrainPolicy,
) -> list[Move | Blocked]:
    """The migrations to start now to empty a host in maintenance, in recovery order.

    Per server: LIVE where it allows live migration and its state does (the
    tolerated interruption, `max_interruption_ms`, goes with the request as the
    downtime bound); otherwise OFFLINE (cold), but only when the server states
    no interruption bound, since a cold move interrupts it for a whole rebuild;
    otherwise it is blocked, with the reason. A server already migrating or busy
    with another task is left alone; at most `policy.max_per_group` migrations
    run at once in one affinity group, counting those in flight
    (`group_inflight`, over all hosts).
    """
    if not h.maintenance:
        return []
    inflight = dict(group_inflight)
    out: list[Move | Blocked] = []
    for s in evacuation_order(on_host):
        if _migrating(s) or (s.task and s.state is not servers.ServerState.ERROR):
            continue
        gid = s.affinity_group_id
        if gid and inflight.get(gid, 0) >= policy.max_per_group:
            continue
        if s.live_migration_allowed and s.state in servers.LIVE_MIGRATABLE:
            out.append(Move(s, servers.MigrationType.LIVE))
        elif s.state in servers.OFFLINE_MIGRATABLE and s.max_interruption_ms == 0:
            out.append(Move(s, servers.MigrationType.OFFLINE))
        else:
            why = (
                f"live migration not allowed and a cold move exceeds the tolerated "
                f"{s.max_interruption_ms} ms interruption"
                if s.max_interruption_ms
                else f"state {s.state.value} can be migrated neither live nor cold"
            )
            out.append(Blocked(s, why))
            continue
        if gid:
            inflight[gid] = inflight.get(gid, 0) + 1
    return out


def departed_claims(h: hosts.Host, all_servers: Mapping[str, servers.Server]) -> list[DomainEvent]:
    """Releases of the claims a host in maintenance holds for servers now elsewhere."""
    if not h.maintenance:
        return []
    out: list[DomainEvent] = []
    for sid in sorted(h.claims):
        s = all_servers.get(sid)
        gone = s is None or s.deleted or (s.host != h.hostname and not _migrating(s))
        if gone:
            released = hosts.release(h, sid)
            if released is not None:
                out.append(released)
    return out


def drained(h: hosts.Host, on_host: Iterable[servers.Server], now: str) -> HostDrained | None:
    """HostDrained when a host in maintenance has no server and no claim left."""
    if not h.maintenance or h.claims or any(not s.deleted for s in on_host):
        return None
    return HostDrained(h.hostname, now)
