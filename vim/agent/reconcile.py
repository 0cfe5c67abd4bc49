"""Level-triggered reconciliation: desired state (from the API) vs actual (from the drivers).

`plan(desired, actual)` is a pure function returning the actions that make the
host match the desired state; `Reconciler.run_once` lists the actual state
through the `HypervisorDriver` and `SwitchDriver` Protocols (nothing else),
plans, executes each action (one failure does not stop the others) and reports
what changed back through a `Reporter`.

Invariants:

* Whatever the starting point (fresh start, restart after SIGKILL, missed
  events, a restarted ovs-vswitchd), one successful pass converges: every
  action is idempotent (`vim.agent.drivers`), so a pass after a converged pass
  defines, starts or removes nothing. Only cheap "ensure" calls are repeated
  every pass: bridges, tunnels and flows (flows are lost when ovs-vswitchd
  restarts, so reinstalling them is a reconcile duty).
* A managed domain (named `vim-<server_id>`) whose server is not desired on
  this host is removed; a desired one missing or in the wrong power state is
  ensured. Nothing is ever started while `hold` is set (after a self-fence,
  until the control plane says the host is UP again); removals still happen.
* The switch is touched only when the SDN plan is present: a missing plan
  means "not known yet", never "tear everything down" (an empty plan does).
* Reports: a server's observed power is reported when it is what was asked
  for and the control plane does not know it yet, when no task is in progress
  and the state changed by itself, or when an action failed (with the reason).
  A reboot is done once per REBOOTING task.
* Migrations are a hand-off, never a server on two hosts (`may_start`): the
  source (`MigrationRole.SOURCE`) removes its domain like an unwanted one and,
  once a listing shows it gone, reports the release
  (`Reporter.release_source`); the target defines and starts nothing (and
  removes a stray copy) until the control plane says the source released it,
  then ensures it like any other server and its report ends the migration.
  Neither side reports the server's state while it may not run it.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from vim.agent.domain_xml import tap_name
from vim.agent.drivers import (
    DomainPower,
    DomainSpec,
    DomainStatus,
    HypervisorDriver,
    NetworkPlanEntry,
    PortBinding,
    SwitchDriver,
    TunnelSpec,
)

log = logging.getLogger(__name__)

DOMAIN_PREFIX = "vim-"
MAX_REASON = 255


def domain_name(server_id: str) -> str:
    return f"{DOMAIN_PREFIX}{server_id}"


def device_name(port_id: str) -> str:
    """The tap of a port, as the domain XML names it (`vim.agent.domain_xml.tap_name`)."""
    return tap_name(port_id)


class ApiState(enum.StrEnum):
    """The server states the control plane may hold (what it last learned)."""

    BUILDING = "BUILDING"
    ACTIVE = "ACTIVE"
    STOPPED = "STOPPED"
    PAUSED = "PAUSED"
    SUSPENDED = "SUSPENDED"
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN"


STATE_OF_POWER: dict[DomainPower, ApiState] = {
    DomainPower.RUNNING: ApiState.ACTIVE,
    DomainPower.SHUTDOWN: ApiState.STOPPED,
    DomainPower.PAUSED: ApiState.PAUSED,
    DomainPower.SUSPENDED: ApiState.SUSPENDED,
    DomainPower.CRASHED: ApiState.ERROR,
}


class MigrationRole(enum.StrEnum):
    """This host's part in a migration of the server in progress."""

    NONE = "NONE"
    SOURCE = "SOURCE"
    TARGET = "TARGET"


@dataclass(frozen=True, slots=True)
class DesiredServer:
    """One server placed on this host: what to run, and what the control plane knows."""

    spec: DomainSpec
    power: DomainPower
    """The desired power state."""
    task: str = ""
    """The operation in progress ("" none, "REBOOTING", "SPAWNING", ...)."""
    known_state: ApiState = ApiState.UNKNOWN
    known_power: DomainPower | None = None
    migration_role: MigrationRole = MigrationRole.NONE
    may_start: bool = True
    """False on a migration's source, and on its target until the source released it."""
    correlation_id: str = ""
    """The correlation id of the last request that touched the server (for the logs)."""


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    """The SDN controller's plan for this host (see `vim.domain.netplan`)."""

    local_ip: str = ""
    networks: tuple[NetworkPlanEntry, ...] = ()
    tunnels: tuple[TunnelSpec, ...] = ()
    ports: tuple[PortBinding, ...] = ()


@dataclass(frozen=True, slots=True)
class Desired:
    hostname: str
    servers: tuple[DesiredServer, ...] = ()
    plan: NetworkPlan | None = None
    host_up: bool = True
    position: int = 0


@dataclass(frozen=True, slots=True)
class Actual:
    domains: tuple[DomainStatus, ...] = ()
    ports: tuple[PortBinding, ...] | None = None
    """None when the host has no switch to manage (`--ovs none`)."""


# --- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnsureDomain:
    spec: DomainSpec
    power: DomainPower


@dataclass(frozen=True, slots=True)
class RemoveDomain:
    server_id: str


@dataclass(frozen=True, slots=True)
class RebootDomain:
    server_id: str


@dataclass(frozen=True, slots=True)
class EnsureBridges:
    local_ip: str


@dataclass(frozen=True, slots=True)
class EnsurePort:
    binding: PortBinding
    device: str


@dataclass(frozen=True, slots=True)
class RemovePort:
    port_id: str


@dataclass(frozen=True, slots=True)
class EnsureTunnels:
    tunnels: tuple[TunnelSpec, ...]


@dataclass(frozen=True, slots=True)
class EnsureFlows:
    networks: tuple[NetworkPlanEntry, ...]


Action = (
    EnsureDomain
    | RemoveDomain
    | RebootDomain
    | EnsureBridges
    | EnsurePort
    | RemovePort
    | EnsureTunnels
    | EnsureFlows
)


def _port_key(p: PortBinding) -> tuple[str, str, str, str, int]:
    return (p.port_id, p.server_id, p.network_id, p.mac_address.lower(), p.vlan_tag)


def plan(
    desired: Desired,
    actual: Actual,
    *,
    hold: bool = False,
    rebooted: frozenset[str] = frozenset(),
) -> list[Action]:
    """The actions that make `actual` match `desired` (see the module docstring).

    Order: removals first (free resources, never two copies), then domains, then
    the switch (bridges, ports, tunnels, flows). `rebooted`: servers already
    rebooted for their current REBOOTING task. A server this host may not start
    (a migration's source, or its target before the release) counts as unwanted.
    """
    actions: list[Action] = []
    wanted = {s.spec.server_id: s for s in desired.servers if s.may_start}
    running = {d.server_id: d for d in actual.domains}
    actions += [RemoveDomain(sid) for sid in sorted(running) if sid not in wanted]
    hold = hold or not desired.host_up
    for sid, s in sorted(wanted.items()):
        have = running.get(sid)
        if hold:
            continue
        if have is None or have.power is not s.power:
            actions.append(EnsureDomain(s.spec, s.power))
        if s.task == "REBOOTING" and sid not in rebooted and s.power is DomainPower.RUNNING:
            actions.append(RebootDomain(sid))
    if actual.ports is None or desired.plan is None:
        return actions
    p = desired.plan
    planned = {b.port_id: b for b in p.ports}
    present = {b.port_id: b for b in actual.ports}
    actions += [RemovePort(pid) for pid in sorted(present) if pid not in planned]
    actions.append(EnsureBridges(p.local_ip))
    for pid, b in sorted(planned.items()):
        have_port = present.get(pid)
        if have_port is None or _port_key(have_port) != _port_key(b):
            actions.append(EnsurePort(b, device_name(pid)))
    actions.append(EnsureTunnels(p.tunnels))
    actions.append(EnsureFlows(p.networks))
    return actions


# --- running a pass -----------------------------------------------------------------------


class Reporter(Protocol):
    """Where observations go (the API, through `vim.agent.apiclient`)."""

    async def report_state(self, server_id: str, power: DomainPower, fault_reason: str) -> None:
        """Record the observed power state of one of this host's servers."""

    async def release_source(self, server_id: str) -> bool:
        """Record that this host, a migration's source, removed its copy (True: recorded)."""


@dataclass(slots=True)
class PassResult:
    actions: list[Action] = field(default_factory=list)
    failed: list[tuple[Action, str]] = field(default_factory=list)
    reported: list[tuple[str, DomainPower, str]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    """Migrating servers whose release this pass reported (this host is their source)."""
    after: Actual | None = None
    """The actual state at the end of the pass (re-listed when the pass changed domains)."""

    @property
    def changed(self) -> bool:
        """Whether the pass did anything beyond the always-repeated ensures."""
        repeated = (EnsureBridges, EnsureTunnels, EnsureFlows)
        return any(not isinstance(a, repeated) for a in self.actions)


class Reconciler:
    """Runs passes against one host's drivers; keeps only what a pass needs to remember."""

    def __init__(
        self,
        hypervisor: HypervisorDriver,
        switch: SwitchDriver | None,
        reporter: Reporter,
    ) -> None:
        self.hypervisor = hypervisor
        self.switch = switch
        self.reporter = reporter
        self._rebooted: set[str] = set()
        self._released: set[str] = set()
        self.passes = 0

    async def actual(self) -> Actual:
        domains = tuple(await self.hypervisor.list_domains())
        ports = tuple(await self.switch.list_ports()) if self.switch is not None else None
        return Actual(domains, ports)

    async def run_once(self, desired: Desired, *, hold: bool = False) -> PassResult:
        """One pass: observe, plan, act, report (see the module docstring)."""
        self.passes += 1
        rebooting = {s.spec.server_id for s in desired.servers if s.task == "REBOOTING"}
        self._rebooted &= rebooting  # a finished REBOOTING task may be asked for again
        self._released &= {
            s.spec.server_id for s in desired.servers if s.migration_role is MigrationRole.SOURCE
        }
        actual = await self.actual()
        result = PassResult(plan(desired, actual, hold=hold, rebooted=frozenset(self._rebooted)))
        failures: dict[str, str] = {}
        arriving = {
            s.spec.server_id for s in desired.servers if s.migration_role is MigrationRole.TARGET
        }
        for action in result.actions:
            if isinstance(action, EnsureDomain) and action.spec.server_id in arriving:
                log.info(
                    "migration of %s: released by the source, starting here", action.spec.server_id
                )
            try:
                await self._execute(action)
            except Exception as exc:  # a failed call must not stop the other actions
                reason = f"{type(action).__name__}: {exc}"[:MAX_REASON]
                log.warning("reconcile action failed: %s", reason)
                result.failed.append((action, reason))
                sid = getattr(action, "server_id", "") or getattr(
                    getattr(action, "spec", None), "server_id", ""
                )
                if sid:
                    failures[sid] = reason
        if result.changed:
            actual = Actual(tuple(await self.hypervisor.list_domains()), actual.ports)
        result.after = actual
        await self._report(desired, actual, failures, result, hold=hold or not desired.host_up)
        return result

    async def _execute(self, action: Action) -> None:
        hv, sw = self.hypervisor, self.switch
        match action:
            case RemoveDomain(server_id=sid):
                await hv.remove_domain(sid)
            case EnsureDomain(spec=spec, power=power):
                await hv.ensure_domain(spec, power)
            case RebootDomain(server_id=sid):
                await hv.reboot_domain(sid)
                self._rebooted.add(sid)
            case EnsureBridges(local_ip=ip) if sw is not None:
                await sw.ensure_bridges(ip)
            case EnsurePort(binding=b, device=dev) if sw is not None:
                await sw.ensure_port(b, dev)
            case RemovePort(port_id=pid) if sw is not None:
                await sw.remove_port(pid)
            case EnsureTunnels(tunnels=t) if sw is not None:
                await sw.ensure_tunnels(t)
            case EnsureFlows(networks=n) if sw is not None:
                await sw.ensure_flows(n)

    async def _report(
        self,
        desired: Desired,
        actual: Actual,
        failures: dict[str, str],
        result: PassResult,
        *,
        hold: bool,
    ) -> None:
        observed = {d.server_id: d for d in actual.domains}
        for s in desired.servers:
            sid = s.spec.server_id
            if should_release(s, sid in observed) and sid not in self._released:
                await self._release(sid, result)
            have = observed.get(sid)
            power = have.power if have is not None else DomainPower.SHUTDOWN
            reason = failures.get(sid, "")
            if not should_report(s, power, reason, hold=hold):
                continue
            try:
                await self.reporter.report_state(sid, power, reason)
            except Exception as exc:  # the next pass reports again
                log.warning("report of %s failed: %r", sid, exc)
                continue
            result.reported.append((sid, power, reason))

    async def _release(self, sid: str, result: PassResult) -> None:
        try:
            recorded = await self.reporter.release_source(sid)
        except Exception as exc:  # the next pass reports again
            log.warning("release of %s failed: %r", sid, exc)
            return
        self._released.add(sid)
        result.released.append(sid)
        log.info(
            "migration of %s: domain removed here, release %s",
            sid,
            "recorded" if recorded else "already known",
        )


def should_release(s: DesiredServer, present: bool) -> bool:
    """Whether to report that this host, a migration's source, let the server go: its
    domain is gone (listed after the removal)."""
    return s.migration_role is MigrationRole.SOURCE and not present


def should_report(s: DesiredServer, observed: DomainPower, reason: str, *, hold: bool) -> bool:
    """Whether the observation is news the control plane must get (see the module docstring)."""
    if hold:
        return False  # the host is not UP: the fault manager owns these servers now
    if not s.may_start:
        return False  # a migration's source, or its target before the release: nothing to say
    known = (s.known_state, s.known_power, s.task)
    news = known != (STATE_OF_POWER[observed], observed, "")
    if reason:
        return True
    if observed is s.power:
        return news
    return not s.task and news


def converged(desired: Desired, actual: Actual) -> bool:
    """True when a pass would change no domain and no port (the ensures aside)."""
    repeated = (EnsureBridges, EnsureTunnels, EnsureFlows)
    return all(isinstance(a, repeated) for a in plan(desired, actual))


def managed(statuses: Sequence[DomainStatus]) -> list[str]:
    """The server ids of managed domains, sorted."""
    return sorted(d.server_id for d in statuses)
