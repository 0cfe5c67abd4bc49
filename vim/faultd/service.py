"""The fault manager: notices failed hosts, fences them, and rebuilds their servers elsewhere.

One `FaultManager` acts at a time (elected like the scheduler; role `faultd`),
and every append it makes carries the term's fencing token, so a paused old
leader is refused by the log (`FencedOut`). While leading it:

1. follows the hosts' liveness leases (`vim.faultd.liveness`; standbys follow
   them too, so a new leader knows when each lease was lost): a lease deleted
   (expired) makes the host *suspected* at once; a registered host never seen
   with a lease is suspected `unleased_grace_s` after this term started (or it
   registered), which covers a loss that happened before this process started;
   while leading it also probes the agents over UDP (`vim.faultd.heartbeat`):
   a host with a usable OOB driver whose agent stopped answering is suspected
   too, whichever comes first, and un-suspected when it answers again before
   anything was recorded (once `HostFailureDetected` is recorded the fence goes
   on: it is what makes a false suspicion safe);
2. per suspected host, in one worker task that re-reads the state before each
   step (so it resumes wherever a previous leader stopped):
   - *detect*: probe the host's OOB endpoint (`ha.fencing`): it answers ->
     COMPUTE_NODE, it does not -> HARDWARE; record `HostFailureDetected` and
     FAILED;
   - *fence*: power the host off through its OOB driver and record
     `HostFenceConfirmed` + FENCED only once it is observed off; a host with no
     driver is confirmed by time (`SelfFenceTimeout`: lease loss + TTL +
     margin, or the agent's own `HostSelfFenced` report). A failed attempt is
     recorded (`HostFenceFailed`) and retried (`fence_retry_s`, doubling up to
     `fence_retry_max_s`); nothing is
     recovered meanwhile;
   - *evacuate* (zone policy auto / reserved host / none): each server still
     assigned to the FENCED host, highest priority first, goes back to BUILDING
     with its identity intact (`ServerEvacuationRequested`, with the release of
     its claim), and the scheduler places it like any other;
   - *on an operator's request* (`HostEvacuationRequested`, `vimctl host
     evacuate`): a host whose lease is not seen is suspected at once and goes
     through the same detect and fence steps, then is evacuated even under
     policy none; the request ends with `HostEvacuationEnded` (DONE when no
     server is left on the fenced host, DECLINED when its agent is alive and the
     host has not failed: a live host is never fenced on request);
   - *rejoin*: when the lease comes back after a fence, `HostRecovered`, and UP
     unless the host is flapping (`FlapPolicy`), in which case it is held FENCED;
3. records `ServerRecoveryFailed` for an evacuated server the scheduler could
   not place (ERROR, with the scheduler's reason);
4. abandons a migration whose source host (UP or in maintenance, not failed:
   a failed host's migrations are its recovery's business) has not released
   the server `migration_release_timeout_s` after it was requested
   (`ServerMigrationAbandoned`, with the target's claim given back in the same
   append; the server stays where it runs, and a drain asks again);
5. drains hosts in maintenance (planned evacuation, `evacuation.drain_step`):
   each server is migrated LIVE where it allows it, cold (OFFLINE) where it
   states no interruption bound, else `ServerDrainBlocked`; at most
   `drain.max_per_group` migrations per affinity group at a time. The
   destination is picked with the scheduler's planner and claimed in the same
   append as the `ServerMigrationRequested` (expecting the server, target host
   and group versions); the destination agent carries the migration out. The
   source claim is released once the server reports from its new host, and
   `HostDrained` is recorded when the host holds nothing any more.

Every decision comes from `vim.domain.evacuation` and every append expects the
versions the decision was made on, so two fault managers (an old leader not yet
fenced, a new one resuming) never evacuate a server twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from ha.election import Elector, Leadership
from ha.fencing import Credentials, Drivers, FenceResult, FenceTarget, default_drivers
from ha.fencing.selffence import SelfFencePolicy, SelfFenceTimeout
from ha.liveness import LivenessRecord
from vim.domain import affinity, host, server
from vim.domain import evacuation as ev
from vim.domain.base import DomainEvent, parse
from vim.domain.faults import FailureKind
from vim.domain.reservation import rfc3339
from vim.errors import FencedOut, Unavailable, VersionConflict
from vim.eventlog.model import AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.store import EventLog
from vim.faultd.heartbeat import HeartbeatMonitor
from vim.faultd.liveness import LivenessSource
from vim.projections.readmodel import ReadModel, register_kind
from vim.scheduler.planner import Failure, Planner, Snapshot, request_of

log = logging.getLogger(__name__)

ROLE = "faultd"
T = TypeVar("T")

register_kind(host.KIND, host.evolve)
register_kind(server.KIND, server.evolve)


@dataclass(frozen=True, slots=True)
class FaultdConfig:
    """How quickly the fault manager acts and what it may do."""

    lease_ttl_s: float = 2.0
    """The agents' liveness TTL (for the self-fence confirmation)."""
    self_fence_margin_s: float = 3.0
    unleased_grace_s: float | None = 6.0
    """A registered host with no lease is suspected this long after a term starts;
    None: never (the embedded demo, where hosts have no agents)."""
    probe_timeout_s: float = 3.0
    fence_timeout_s: float = 60.0
    fence_retry_s: float = 5.0
    fence_retry_max_s: float = 120.0
    zone_policies: Mapping[str, ev.ZonePolicy] = field(default_factory=dict)
    default_policy: ev.ZonePolicy = field(default_factory=ev.ZonePolicy)
    flap: ev.FlapPolicy = field(default_factory=ev.FlapPolicy)
    drain: ev.DrainPolicy = field(default_factory=ev.DrainPolicy)
    evacuation_interval_s: float = 0.0
    """Pause between two evacuations of one host (spreads a rebuild storm)."""
    reconcile_interval_s: float = 1.0
    migration_release_timeout_s: float = 300.0
    """A migration its source has not released this long after the request is abandoned."""
    static_token: int | None = None
    """Fencing token when running without an elector (None: no fencing metadata)."""
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def policy(self, zone: str) -> ev.ZonePolicy:
        return self.zone_policies.get(zone, self.default_policy)


@dataclass(slots=True)
class Stats:
    """Counters for this process (`vim_faultd_<field>_total`, see STATS_HELP)."""

    detected: int = 0
    fenced: int = 0
    fence_failed: int = 0
    evacuated: int = 0
    recovery_failed: int = 0
    rejoined: int = 0
    held: int = 0
    migrations: int = 0
    migrations_abandoned: int = 0
    conflicts: int = 0
    heartbeat_suspected: int = 0


STATS_HELP = {
    "detected": "Host failures detected (HostFailureDetected recorded) by this process",
    "fenced": "Host fences confirmed by this process",
    "fence_failed": "Fence attempts that failed (retried)",
    "evacuated": "Servers sent back to BUILDING off a fenced host",
    "recovery_failed": "Evacuated servers the scheduler could not place",
    "rejoined": "Fenced hosts back UP after their lease returned",
    "held": "Hosts whose lease returned but that stay FENCED (flapping)",
    "migrations": "Maintenance migrations requested",
    "migrations_abandoned": "Migrations abandoned: the source did not release the server in time",
    "conflicts": "Appends refused by a version check (another writer moved first)",
    "heartbeat_suspected": "Hosts suspected because their agent stopped answering heartbeats",
}


_SOURCE_STATES = (host.HostState.UP, host.HostState.MAINTENANCE)


class Companion(Protocol):
    """Something else that runs only while this fault manager leads (the alarm reactor)."""

    async def run(self) -> None: ...

    async def stop(self) -> None: ...


CompanionFactory = Callable[[Callable[[], Leadership | None]], Companion]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class FaultManager:
    """Detects, fences and recovers failed hosts while leading. See the module docstring."""

    def __init__(
        self,
        log: EventLog,
        model: ReadModel,
        liveness: LivenessSource,
        *,
        elector: Elector | None = None,
        drivers: Drivers | None = None,
        credentials: Callable[[str], Credentials] = lambda _h: Credentials(),
        config: FaultdConfig | None = None,
        clock: Callable[[], datetime] = _utc_now,
        companions: Sequence[CompanionFactory] = (),
        heartbeat: HeartbeatMonitor | None = None,
    ) -> None:
        self._log = log
        self._model = model
        self._liveness = liveness
        self._elector = elector
        self._drivers = drivers if drivers is not None else default_drivers()
        self._credentials = credentials
        self.config = config or FaultdConfig()
        self._clock = clock
        self._companions = list(companions)
        self._stopping = asyncio.Event()
        self._token: int | None = self.config.static_token
        self._fenced_out: FencedOut | None = None
        self._news = asyncio.Event()
        self._changed = asyncio.Event()
        """Replaced (after being set) on every liveness change and on stop."""
        self._alive: dict[str, LivenessRecord] = {}
        self._lost_at: dict[str, datetime] = {}
        self._synced = False
        self._term_started = _utc_now()
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._settled: dict[str, tuple[int, bool]] = {}
        self._blocked_seen: set[tuple[str, str, str]] = set()
        self._drained: dict[str, int] = {}
        """Host stream version at which HostDrained was seen recorded (saves re-reads)."""
        self._leadership: Leadership | None = None
        self.stats = Stats()
        self._heartbeat = heartbeat
        self._silent_since: dict[str, datetime] = {}
        """Hosts whose agent stopped answering heartbeats -> when that was seen (wall)."""
        if heartbeat is not None:
            heartbeat.on_change = self._heartbeat_changed

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Campaign, lead, and campaign again after losing the term, until `stop()`.

        Liveness is followed for the whole life of the process, standby included,
        so a new leader knows when each lease was lost even if that happened
        during the previous term or between terms.
        """
        follower = asyncio.create_task(self._follow_liveness(), name="faultd-liveness")
        try:
            await self._campaign_and_lead()
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower

    async def _campaign_and_lead(self) -> None:
        while not self._stopping.is_set():
            if self._elector is None:
                await self._lead(self.config.static_token)
                return
            leadership = await self._until_stopped(self._elector.campaign())
            if leadership is None:
                return
            log.info("faultd %s leads with token %d", self.config.name, leadership.token)
            self._leadership = leadership
            try:
                await self._lead(leadership.token)
            except FencedOut as exc:
                log.warning("faultd fenced out, stepping down: %s", exc)
            self._leadership = None
            await self._elector.resign()

    async def stop(self) -> None:
        self._stopping.set()
        self._poke()

    def _poke(self) -> None:
        self._news.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def leadership(self) -> Leadership | None:
        """The term this process acts in, while it does (for companions)."""
        return self._leadership if self._acting() else None

    def _acting(self) -> bool:
        if self._stopping.is_set() or self._fenced_out is not None:
            return False
        return self._elector is None or self._elector.is_leader()

    async def _lead(self, token: int | None) -> None:
        self._token = token
        self._fenced_out = None
        self._settled = {}
        self._term_started = self._clock()
        companions = [make(self.leadership) for make in self._companions]
        running = [asyncio.create_task(c.run(), name="faultd-companion") for c in companions]
        if self._heartbeat is not None and self._heartbeat.enabled:
            self._heartbeat.set_targets(self._alive)
            running.append(asyncio.create_task(self._heartbeat.run(), name="faultd-heartbeat"))
        try:
            while self._acting():
                await self.reconcile()
                await self._wait_for_news()
            if self._fenced_out is not None:
                raise self._fenced_out
        finally:
            for c in companions:
                with contextlib.suppress(Exception):
                    await c.stop()
            tasks = [*running, *self._workers.values()]
            self._workers = {}
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    # -- liveness ----------------------------------------------------------------------

    async def _follow_liveness(self) -> None:
        """Follow the liveness source until cancelled; a failed source is restarted."""
        while True:
            try:
                await self._follow_once()
            except Exception:
                log.exception("liveness watch failed; restarting it")
            self._synced = False
            await asyncio.sleep(0.5)

    async def _follow_once(self) -> None:
        async for view in self._liveness.watch():
            now = self._clock()
            if view.reset:
                for name in set(self._alive) - set(view.alive):
                    self._lost_at.setdefault(name, now)
                self._alive = dict(view.alive)
                self._synced = True
            else:
                self._alive.update(view.alive)
                for name in view.lost:
                    self._alive.pop(name, None)
                    self._lost_at[name] = now
                    log.info("liveness lease of %s lost", name)
            for name in view.alive:
                self._lost_at.pop(name, None)
            if self._heartbeat is not None:
                self._heartbeat.set_targets(self._alive)
            self._poke()

    def _heartbeat_changed(self) -> None:
        """The heartbeat monitor's suspected set changed: note when, and look again."""
        assert self._heartbeat is not None
        now = self._clock()
        silent = self._heartbeat.suspected()
        for name in silent:
            if name not in self._silent_since:
                self._silent_since[name] = now
                log.info("agent of %s stopped answering heartbeats", name)
        for name in set(self._silent_since) - set(silent):
            del self._silent_since[name]
            log.info("agent of %s answers heartbeats again", name)
        self._poke()

    def _silent(self, hostname: str) -> bool:
        """Suspected through heartbeats: its agent is silent and the host has a usable OOB
        driver (a host that can only fence itself is judged by its lease alone: its
        self-fence deadline counts from the lease's loss, see docs/FAULTS.md)."""
        if hostname not in self._silent_since:
            return False
        entry = self._model.get(host.stream(hostname))
        return (
            entry is not None
            and self._drivers.for_endpoint(entry.state.spec.bmc_endpoint) is not None
        )

    def alive(self, hostname: str) -> bool:
        """Its lease is held and its agent is not suspected through heartbeats."""
        return hostname in self._alive and not self._silent(hostname)

    # -- the loop ----------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Start a worker for every host that needs one; record unplaceable evacuations."""
        if not self._synced:
            return
        for _, entry in self._model.of_kind(host.KIND):
            h: host.Host = entry.state
            key = self._key(h.hostname)
            if self._settled.get(h.hostname) == key or h.hostname in self._workers:
                continue
            if self._needs_work(h):
                task = asyncio.create_task(self._work(h.hostname), name=f"faultd-{h.hostname}")
                self._workers[h.hostname] = task
        await self._record_recovery_failures()
        await self._abandon_stalled_migrations()

    def _key(self, hostname: str) -> tuple[int, bool]:
        """What a host's worker decided on: its stream version and liveness. A host in
        maintenance also waits on its servers' streams (migrations ending elsewhere),
        so its key is the model's position."""
        entry = self._model.get(host.stream(hostname))
        if entry is None:
            return (0, self.alive(hostname))
        if entry.state.maintenance:
            return (self._model.position, self.alive(hostname))
        return (entry.version, self.alive(hostname))

    def _needs_work(self, h: host.Host) -> bool:
        if h.evacuation_requested and h.state in ev.WATCHED:
            return True  # declined if its agent is alive, else suspected at once
        if h.state is host.HostState.MAINTENANCE and self.alive(h.hostname):
            return True
        if h.state in ev.WATCHED:
            return not self.alive(h.hostname) and self._suspected_since(h.hostname) is not None
        return h.state in (host.HostState.FAILED, host.HostState.FENCED)

    def _suspected_since(self, hostname: str) -> datetime | None:
        """When the host's lease was seen lost; for a host never seen with a lease in this
        term, the later of the term's start and its registration, once the grace passed."""
        if hostname in self._lost_at:
            return self._lost_at[hostname]
        if self._silent(hostname):
            return self._silent_since[hostname]
        entry = self._model.get(host.stream(hostname))
        if entry is not None and entry.state.evacuation_requested:
            # An operator says the host is gone and no lease is seen: suspected now
            # (never earlier than the real loss, so a self-fence wait is not cut short).
            return self._clock()
        grace = self.config.unleased_grace_s
        if grace is None:
            return None
        since = self._term_started
        if entry is not None and entry.state.registered_at:
            with contextlib.suppress(ValueError):
                since = max(since, ev.parse_time(entry.state.registered_at))
        if (self._clock() - since).total_seconds() < grace:
            return None
        return since

    async def _work(self, hostname: str) -> None:
        try:
            while self._acting():
                # What the step decides on, taken before it can await: a liveness
                # change during the step must not be marked as already handled.
                seen = self._key(hostname)
                if not await self._step(hostname):
                    self._settled[hostname] = seen
                    return
        except FencedOut as exc:
            self._fenced_out = exc
            self._poke()
        except Unavailable as exc:
            log.warning("faultd worker for %s: %s; retrying on the next round", hostname, exc)
        finally:
            self._workers.pop(hostname, None)
            self._news.set()

    async def _step(self, hostname: str) -> bool:
        """Take the next recovery step for the host; False when there is nothing to do."""
        entry = self._model.get(host.stream(hostname))
        if entry is None:
            return False
        h: host.Host = entry.state
        alive = self.alive(hostname)
        if alive and h.evacuation_requested and h.state in ev.WATCHED:
            declined = ev.evacuation_declined(h, self._now())
            if await self._append({host.stream(hostname): (entry.version, declined)}):
                log.warning("evacuation of %s declined: its agent is alive", hostname)
            return True
        if h.state is host.HostState.MAINTENANCE and alive:
            return await self._drain(h, entry.version)
        if h.state in ev.WATCHED:
            since = self._suspected_since(hostname)
            if alive or since is None:
                return False
            return await self._detect(h, entry.version, since)
        fault = await self._fault(hostname)
        if alive and h.state in (host.HostState.FAILED, host.HostState.FENCED):
            if h.state is host.HostState.FENCED:
                recovered = await self._recover(h, entry.version)
                if recovered is not None:
                    return recovered
            rejoin = ev.lease_returned(h, fault, self._clock(), self.config.flap, self._now())
            if rejoin.events:
                if await self._append({host.stream(hostname): (entry.version, rejoin.events)}):
                    self.stats.held += rejoin.held
                    self.stats.rejoined += not rejoin.held
                    log.info("%s is back (%s)", hostname, "held" if rejoin.held else "rejoined")
                return True
            if h.state is host.HostState.FENCED:
                return False
        if h.state is host.HostState.FAILED:
            return await self._fence(h, entry.version, fault)
        if h.state is host.HostState.FENCED:
            return bool(await self._recover(h, entry.version))
        return False

    # -- detect ------------------------------------------------------------------------

    async def _detect(self, h: host.Host, version: int, since: datetime) -> bool:
        target = self._target(h)
        driver = self._drivers.for_endpoint(h.spec.bmc_endpoint)
        if driver is None:
            answers, detail = False, "no out-of-band driver to probe: taken as unreachable"
        else:
            try:
                async with asyncio.timeout(self.config.probe_timeout_s):
                    answers = await driver.answers(target)
            except TimeoutError:
                answers = False
            word = "answers" if answers else "does not answer"
            lost = "lease lost"
            if h.hostname not in self._lost_at and self._silent(h.hostname):
                lost = "no heartbeat answer (lease still held)"
            detail = f"{lost}; out-of-band endpoint {word} ({driver.method})"
        if h.hostname not in self._lost_at and self.alive(h.hostname):
            return True  # it answered again while we probed its BMC: nothing to record
        if h.evacuation_requested and h.hostname not in self._lost_at:
            why = f" ({h.evacuation_reason})" if h.evacuation_reason else ""
            detail = f"evacuation requested by an operator{why}, no lease seen; {detail}"
        kind = ev.classify(answers)
        events = ev.detect(h, kind, detail, rfc3339(since), self._now())
        if not events:
            return False
        if await self._append({host.stream(h.hostname): (version, events)}):
            self.stats.detected += 1
            if h.hostname not in self._lost_at and self._silent(h.hostname):
                self.stats.heartbeat_suspected += 1
            log.warning("host %s failed: %s (%s)", h.hostname, kind, detail)
        return True

    def _target(self, h: host.Host) -> FenceTarget:
        return FenceTarget(h.hostname, h.spec.bmc_endpoint, self._credentials(h.hostname))

    # -- fence -------------------------------------------------------------------------

    async def _fence(self, h: host.Host, version: int, fault: ev.HostFault) -> bool:
        driver = self._drivers.for_endpoint(h.spec.bmc_endpoint)
        if driver is None:
            result = await self._self_fence(h, fault)
        else:
            try:
                async with asyncio.timeout(self.config.fence_timeout_s):
                    result = await driver.power_off(self._target(h))
            except TimeoutError:
                result = FenceResult(
                    False, driver.method, reason=f"no answer in {self.config.fence_timeout_s}s"
                )
        if not self._acting():
            return False
        entry = self._model.get(host.stream(h.hostname))
        if entry is None or entry.version != version:
            return True  # the host moved while we fenced (another term?): look again
        if result.confirmed:
            events = ev.fence_confirmed(h, result.method, result.detail, self._now())
            if await self._append({host.stream(h.hostname): (version, events)}):
                self.stats.fenced += 1
                log.warning("host %s fenced (%s: %s)", h.hostname, result.method, result.detail)
            return True
        events = ev.fence_failed(h, result.method, result.reason, self._now())
        if await self._append({host.stream(h.hostname): (version, events)}):
            self.stats.fence_failed += 1
            log.error("fencing %s failed (%s): %s", h.hostname, result.method, result.reason)
        attempts = fault.fence_attempts + 1
        delay = min(self.config.fence_retry_s * 2 ** (attempts - 1), self.config.fence_retry_max_s)
        await self._pause(delay, until=lambda: self.alive(h.hostname))
        return True

    async def _self_fence(self, h: host.Host, fault: ev.HostFault) -> FenceResult:
        """Confirmed by time, or earlier when the agent's HostSelfFenced is recorded
        (the host stream is re-read every `reconcile_interval_s` while waiting)."""
        policy = SelfFencePolicy(self.config.lease_ttl_s, self.config.self_fence_margin_s)
        lost = ev.parse_time(fault.lease_lost_at) if fault.lease_lost_at else self._clock()
        reported = [bool(fault.self_fenced_at)]

        async def refresh() -> None:
            while not reported[0]:
                await asyncio.sleep(self.config.reconcile_interval_s)
                with contextlib.suppress(Unavailable):
                    reported[0] = bool((await self._fault(h.hostname)).self_fenced_at)

        refresher = asyncio.create_task(refresh(), name=f"faultd-selffence-{h.hostname}")
        try:
            waiter = SelfFenceTimeout(policy, clock=self._clock)
            return await waiter.confirm(h.hostname, lost, lambda: reported[0])
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher

    async def _fault(self, hostname: str) -> ev.HostFault:
        recorded = await self._log.read_stream(host.stream(hostname))
        events = (parse(r.type, r.data) for r in recorded)
        return ev.fold_fault(e for e in events if e is not None)

    # -- evacuate ----------------------------------------------------------------------

    def _servers_on(self, h: host.Host) -> list[tuple[server.Server, int]]:
        found = []
        for _, entry in self._model.of_kind(server.KIND):
            s: server.Server = entry.state
            if not s.deleted and ev.runs_on(s) == h.hostname:
                found.append((s, entry.version))
        return found

    def _evacuable(self, h: host.Host) -> bool:
        policy = self.config.policy(h.spec.zone)
        return ev.must_evacuate(h, policy) and bool(self._servers_on(h))

    async def _recover(self, h: host.Host, version: int) -> bool | None:
        """A FENCED host: evacuate its servers, then end an operator's request (DONE);
        None when there is neither to do."""
        if self._evacuable(h):
            return await self._evacuate(h)
        done = ev.evacuation_done(h, (s for s, _ in self._servers_on(h)), self._now())
        if not done:
            return None
        if await self._append({host.stream(h.hostname): (version, done)}):
            log.info("evacuation of %s requested by an operator is done", h.hostname)
        return True

    async def _evacuate(self, h: host.Host) -> bool:
        policy = self.config.policy(h.spec.zone)
        hosts = {e.state.hostname: e.state for _, e in self._model.of_kind(host.KIND)}
        for reserved in ev.reserved_to_enable(policy, hosts):
            events = host.disable_maintenance(reserved, reserved.hostname, self._now())
            version = self._model.version(host.stream(reserved.hostname))
            await self._append({host.stream(reserved.hostname): (version, events)})
        versions = {s.server_id: v for s, v in self._servers_on(h)}
        order = ev.to_evacuate(h, (s for s, _ in self._servers_on(h)))
        reason = f"host {h.hostname} failed and was fenced"
        if h.evacuation_requested:
            why = f": {h.evacuation_reason}" if h.evacuation_reason else ""
            reason = f"evacuation of {h.hostname} requested by an operator{why}"
        for i, s in enumerate(order):
            if not self._acting():
                return False
            if i and self.config.evacuation_interval_s:
                await self._pause(self.config.evacuation_interval_s)
            current = self._model.get(host.stream(h.hostname))
            if current is None:
                return False
            fenced: host.Host = current.state
            peer_name = ev.migration_peer_of(s, h.hostname)
            target = self._model.get(host.stream(peer_name)) if peer_name else None
            decided = ev.evacuate(
                fenced, s, reason, self._now(), target.state if target is not None else None
            )
            expected = {
                server.stream(s.server_id): versions[s.server_id],
                host.stream(h.hostname): current.version,
            }
            if target is not None:
                expected[host.stream(target.state.hostname)] = target.version
            streams = {sid: (expected[sid], events) for sid, events in decided.items()}
            if not await self._append(streams):
                return True  # something moved: re-read and go on
            self.stats.evacuated += 1
            log.info("evacuating %s (priority %d) from %s", s.server_id, s.priority, h.hostname)
        return True

    # -- maintenance drain -------------------------------------------------------------

    async def _drain(self, h: host.Host, version: int) -> bool:
        """One step of emptying a host in maintenance; False when there is nothing to do now."""
        by_id = {e.state.server_id: e.state for _, e in self._model.of_kind(server.KIND)}
        released = ev.departed_claims(h, by_id)
        if released:
            await self._append({host.stream(h.hostname): (version, released)})
            return True
        on_host = [s for s in by_id.values() if s.host == h.hostname and not s.deleted]
        inflight: dict[str, int] = {}
        for s in by_id.values():
            if s.affinity_group_id and s.task == "MIGRATING" and not s.deleted:
                inflight[s.affinity_group_id] = inflight.get(s.affinity_group_id, 0) + 1
        for step in ev.drain_step(h, on_host, inflight, self.config.drain):
            if isinstance(step, ev.Blocked):
                if await self._blocked(h, step):
                    return True
                continue
            return await self._migrate(h, step)
        if on_host or self._drained.get(h.hostname) == version:
            return False  # migrations in flight, or already recorded empty
        fault = await self._fault(h.hostname)
        done = None if fault.drained else ev.drained(h, on_host, self._now())
        if done is None:
            if fault.drained:
                self._drained[h.hostname] = version
            return False
        if await self._append({host.stream(h.hostname): (version, [done])}):
            log.info("host %s is empty (maintenance)", h.hostname)
        return True

    async def _blocked(self, h: host.Host, b: ev.Blocked) -> bool:
        """Record once per maintenance period (per process) that a server cannot move."""
        mark = (h.hostname, b.server.server_id, h.maintenance_reason)
        if mark in self._blocked_seen:
            return False
        self._blocked_seen.add(mark)
        event = ev.ServerDrainBlocked(b.server.server_id, h.hostname, b.reason, self._now())
        version = self._model.version(server.stream(b.server.server_id))
        await self._append({server.stream(b.server.server_id): (version, [event])})
        log.warning("server %s cannot leave %s: %s", b.server.server_id, h.hostname, b.reason)
        return True

    async def _migrate(self, h: host.Host, move: ev.Move) -> bool:
        """Pick a destination with the scheduler's planner, claim it, request the migration."""
        s = move.server
        version = self._model.version(server.stream(s.server_id))
        snapshot = self._with_migration_targets(Snapshot.of(self._model, self._clock()))
        outcome = Planner(snapshot).place(request_of(s, version))
        if isinstance(outcome, Failure):
            return await self._blocked(h, ev.Blocked(s, outcome.reason))
        requested = server.migrate(s, move.kind, outcome.hostname, self._now())
        streams: dict[str, tuple[int, Sequence[DomainEvent]]] = {
            server.stream(s.server_id): (version, [requested]),
            host.stream(outcome.hostname): (outcome.host_version, [outcome.claim]),
        }
        if outcome.group_id and outcome.group_version is not None:
            member = affinity.AffinityMemberAdded(outcome.group_id, s.server_id)
            streams[affinity.stream(outcome.group_id)] = (outcome.group_version, [member])
        if await self._append(streams):
            self.stats.migrations += 1
            log.info(
                "maintenance: %s migration of %s from %s to %s",
                move.kind.value,
                s.server_id,
                s.host,
                outcome.hostname,
            )
        return True

    def _with_migration_targets(self, snapshot: Snapshot) -> Snapshot:
        """The snapshot with each migrating group member also counted at its destination,
        so two migrations of one group never pick the same host against anti-affinity."""
        members = {gid: list(where) for gid, where in snapshot.members.items()}
        for _, e in self._model.of_kind(server.KIND):
            s: server.Server = e.state
            if s.task == "MIGRATING" and s.migration_target and s.affinity_group_id in members:
                target = snapshot.hosts.get(s.migration_target)
                zone = target[0].spec.zone if target else s.zone
                members[s.affinity_group_id].append((s.migration_target, zone))
        return dataclasses.replace(snapshot, members=members)

    async def _record_recovery_failures(self) -> None:
        for _, entry in self._model.of_kind(server.KIND):
            if not self._acting():
                return
            s: server.Server = entry.state
            failed = ev.recovery_failed(s, self._now())
            if failed is None:
                continue
            if await self._append({server.stream(s.server_id): (entry.version, [failed])}):
                self.stats.recovery_failed += 1
                log.error("server %s could not be recovered: %s", s.server_id, failed.reason)

    async def _abandon_stalled_migrations(self) -> None:
        now = self._clock()
        timeout = self.config.migration_release_timeout_s
        for _, entry in self._model.of_kind(server.KIND):
            if not self._acting():
                return
            s: server.Server = entry.state
            abandoned = ev.migration_stalled(s, now, timeout)
            if abandoned is None:
                continue
            source = self._model.get(host.stream(s.host))
            if source is None or source.state.state not in _SOURCE_STATES:
                continue  # a failed source: detection, fencing and evacuation decide
            streams: dict[str, tuple[int, list[DomainEvent]]] = {
                server.stream(s.server_id): (entry.version, [abandoned])
            }
            target = self._model.get(host.stream(s.migration_target))
            if target is not None:
                released = host.release(target.state, s.server_id)
                if released is not None:
                    streams[host.stream(s.migration_target)] = (target.version, [released])
            if await self._append(streams):
                self.stats.migrations_abandoned += 1
                log.warning("migration of %s abandoned: %s", s.server_id, abandoned.reason)

    # -- appends -----------------------------------------------------------------------

    def _metadata(self) -> Metadata:
        actor = f"faultd:{self.config.name}"
        if self._token is None:
            return Metadata(actor=actor)
        return Metadata(actor=actor, fencing_role=ROLE, fencing_token=self._token)

    async def _append(self, streams: Mapping[str, tuple[int, Sequence[DomainEvent]]]) -> bool:
        """One atomic append at the versions read; False on a conflict (caller re-reads)."""
        if not self._acting():
            return False
        request = AppendRequest(
            streams=[
                StreamAppend(sid, version, [_encode(e) for e in events])
                for sid, (version, events) in streams.items()
                if events
            ],
            metadata=self._metadata(),
        )
        if not request.streams:
            return False
        try:
            result = await self._log.append(request)
        except VersionConflict as conflict:
            self.stats.conflicts += 1
            with contextlib.suppress(Unavailable):
                await self._model.wait_for_version(conflict.stream_id, conflict.actual, 2.0)
            return False
        with contextlib.suppress(Unavailable):
            await self._model.wait_for(result.last_position)
        return True

    def _now(self) -> str:
        return rfc3339(self._clock())

    # -- waiting -----------------------------------------------------------------------

    async def _wait_for_news(self) -> None:
        self._news.clear()
        moved = self._model.wait_for(self._model.position + 1, within_s=3600)
        await self._until_stopped(
            self._first(moved, self._news.wait(), self.config.reconcile_interval_s),
            swallow=(Unavailable,),
        )

    async def _pause(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        """Wait `seconds`, less if `until()` turns true (checked on each liveness change,
        and every 0.5 s for the term) or the term ends."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while self._acting() and not until():
            remaining = end - loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, remaining)):
                    await self._changed.wait()

    @staticmethod
    async def _first(a: Awaitable[object], b: Awaitable[object], within_s: float) -> None:
        tasks = {asyncio.ensure_future(a), asyncio.ensure_future(b)}
        try:
            await asyncio.wait(tasks, timeout=within_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Unavailable):
                    await t

    async def _until_stopped(
        self, work: Awaitable[T], swallow: tuple[type[BaseException], ...] = ()
    ) -> T | None:
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stop):
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, *swallow):
                        await t
        if not task.done() or task.cancelled():
            return None
        try:
            return task.result()
        except swallow:
            return None


def _encode(e: DomainEvent) -> NewEvent:
    return NewEvent(e.type, e.to_data(), e.SCHEMA_VERSION)


__all__ = ["ROLE", "FailureKind", "FaultManager", "FaultdConfig", "Stats"]
