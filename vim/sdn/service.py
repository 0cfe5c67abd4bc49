"""The `vim-sdn` process: keeps every host's network plan in the log while it is master.

Any number run; one is master (elected through etcd, role `sdn`), the others are
hot standbys that follow the same log into the same read model, so a takeover
only has to win the election, not load anything.

Loop (master only; see docs/SDN.md):

1. campaign with the `Elector`; the term's fencing token goes on every append as
   `Metadata(fencing_role="sdn", fencing_token=token)`, so the log refuses a
   paused old master's writes (`FencedOut`) in the append's own transaction;
2. while the term is provable (`is_leader()`): compute every host's plan from
   the read model (`netplan.compute`: hosts' tunnel IPs, live networks, NICs of
   placed servers, and the plans recorded so far for tag stability) and append
   a `HostNetworkPlanned` to `netplan-<host>` for each host whose plan differs
   from the recorded one, expecting the stream's version in the read model;
3. wait until the read model has this round's writes, then until it moves again
   (a notification, bounded by `idle_wait_s` so the term is re-checked);
4. on `FencedOut` or a lost term, stop acting, resign, and campaign again.

The console script (`main`) logs JSON lines, serves Prometheus metrics on
`--metrics-listen` (`vim_sdn_*` from `Stats`, `vim_sdn_is_leader`, `vim_sdn_term`,
`vim_sdn_build_info`, the cross-service `vim_service_*`) and tells systemd
READY=1 once its read model has caught up and it campaigns, then WATCHDOG=1
from its event loop (`vim.sdnotify`).

Safety does not rest on the election. Each plan append expects the version the
plan was computed against, so two masters at once cannot interleave stale plans
(the loser gets `VersionConflict`, catches up and recomputes), and because the
plan is a pure function of the log a new master that recomputes what its
predecessor already wrote finds nothing to write: the agents see no change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ha.election import Elector, EtcdElector, LocalElector
from vim import telemetry
from vim.domain import host, netplan, network, server
from vim.errors import EventLogUnavailable, FencedOut, Unavailable, VersionConflict
from vim.eventlog.model import AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import EventLog
from vim.projections.readmodel import Projector, ReadModel, register_kind
from vim.sdnotify import Notifier, keep_pinging, stop_on_signals

log = logging.getLogger(__name__)

ROLE = "sdn"
T = TypeVar("T")

# The kinds the controller folds; the same functions the API registers.
register_kind(host.KIND, host.evolve)
register_kind(server.KIND, server.evolve)
register_kind(network.KIND, network.evolve)
register_kind(netplan.KIND, netplan.evolve)

CATCH_UP_S = 2.0
"""How long to wait for the read model to see a conflicting or own write."""


@dataclass(frozen=True, slots=True)
class SdnConfig:
    """How the controller runs."""

    idle_wait_s: float = 1.0
    max_parallel_appends: int = 32
    static_token: int | None = None
    """Fencing token to use when running without an elector (None: no fencing)."""
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


@dataclass(slots=True)
class Stats:
    """Counters for this process (`vim_sdn_<field>_total`, see STATS_HELP)."""

    rounds: int = 0
    written: int = 0
    """Plans appended by this process."""
    conflicts: int = 0
    unknown: int = 0
    """Appends whose outcome is unknown (the database went away mid-commit)."""
    fenced: int = 0
    terms: int = 0
    segment_clashes: int = 0
    """Live networks sharing a segmentation id in one pool, at the last round (must be 0)."""


STATS_HELP = {
    "rounds": "Planning rounds run while master",
    "written": "Host network plans appended by this process",
    "conflicts": "Plan appends refused by a version check",
    "unknown": "Plan appends whose outcome is unknown (the database went away mid-commit)",
    "fenced": "Terms this process ended because the log refused its fencing token",
    "terms": "Terms this process won",
    "segment_clashes": "Live networks sharing a segmentation id in one pool (must be 0)",
}
STATS_GAUGES = ("segment_clashes",)


def desired_plans(model: ReadModel) -> dict[str, netplan.HostPlan]:
    """Every host's plan as the read model's facts make it (O(hosts + servers + networks))."""
    tunnel_ips = {
        e.state.hostname: netplan.tunnel_ip(e.state.spec.tunnel_ip, e.state.spec.management_address)
        for _, e in model.of_kind(host.KIND)
    }
    networks = {e.state.network_id: e.state for _, e in model.of_kind(network.KIND)}
    servers = (e.state for _, e in model.of_kind(server.KIND))
    return netplan.compute(
        tunnel_ips, networks, netplan.attachments(servers), recorded_plans(model)
    )


def recorded_plans(model: ReadModel) -> dict[str, netplan.HostPlan]:
    """The latest plan recorded for each host."""
    return {e.state.hostname: e.state for _, e in model.of_kind(netplan.KIND)}


class SdnService:
    """Follows the read model and records changed host plans while master."""

    def __init__(
        self,
        log: EventLog,
        model: ReadModel,
        *,
        elector: Elector | None = None,
        config: SdnConfig | None = None,
        metrics: telemetry.ServiceMetrics | None = None,
    ) -> None:
        self._log = log
        self._metrics = metrics
        self._model = model
        self._elector = elector
        self.config = config or SdnConfig()
        self._stopping = asyncio.Event()
        self._token: int | None = self.config.static_token
        self._clashes: list[netplan.SegmentClash] = []
        self.stats = Stats()

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        """Campaign, lead, and campaign again after losing the term, until `stop()`."""
        while not self._stopping.is_set():
            if self._elector is None:
                await self._lead(self.config.static_token)
                return
            leadership = await self._until_stopped(self._elector.campaign())
            if leadership is None:
                return
            self.stats.terms += 1
            log.info("sdn %s is master with token %d", self.config.name, leadership.token)
            try:
                await self._lead(leadership.token)
            except FencedOut as exc:
                self.stats.fenced += 1
                if self._metrics is not None:
                    self._metrics.fenced_write()
                log.warning("sdn master fenced out, stepping down: %s", exc)
            await self._elector.resign()

    async def stop(self) -> None:
        """Stop after the appends in flight (idempotent)."""
        self._stopping.set()

    def _acting(self) -> bool:
        if self._stopping.is_set():
            return False
        return self._elector is None or self._elector.is_leader()

    async def _lead(self, token: int | None) -> None:
        self._token = token
        while self._acting():
            before = (self.stats.written, self.stats.conflicts)
            attempted = await self.run_round()
            if attempted == 0 or (self.stats.written, self.stats.conflicts) == before:
                # Nothing to do, or nothing landed (the log is unreachable): no busy loop.
                await self._wait_for_news()

    # -- one round ---------------------------------------------------------------------

    def _metadata(self) -> Metadata:
        actor = f"sdn:{self.config.name}"
        if self._token is None:
            return Metadata(actor=actor)
        return Metadata(actor=actor, fencing_role=ROLE, fencing_token=self._token)

    async def run_round(self, token: int | None = None) -> int:
        """Record every changed host plan once; how many appends were attempted.

        Raises FencedOut when a newer term has written: the caller must stop.
        """
        if token is not None:
            self._token = token
        self.stats.rounds += 1
        self._check_segments()
        recorded = recorded_plans(self._model)
        todo = [
            (hostname, plan, self._model.version(netplan.stream(hostname)))
            for hostname, plan in desired_plans(self._model).items()
            if netplan.changed(recorded.get(hostname), plan)
        ]
        if not todo:
            return 0
        gate = asyncio.Semaphore(self.config.max_parallel_appends)

        async def write(hostname: str, plan: netplan.HostPlan, version: int) -> int:
            async with gate:
                return await self._write(hostname, plan, version) if self._acting() else 0

        positions = await asyncio.gather(*(write(h, p, v) for h, p, v in todo))
        if max(positions, default=0):
            # Read our own writes before computing again, or the next round repeats them.
            with contextlib.suppress(Unavailable):
                await self._model.wait_for(max(positions), within_s=CATCH_UP_S)
        return len(todo)

    async def _write(self, hostname: str, plan: netplan.HostPlan, version: int) -> int:
        """Append one plan at `version`; the position written, or 0 when it did not land."""
        event = plan.event()
        sid = netplan.stream(hostname)
        request = AppendRequest(
            streams=[
                StreamAppend(sid, version, [NewEvent(event.type, event.to_data(), 1)]),
            ],
            metadata=self._metadata(),
        )
        try:
            result = await self._log.append(request)
        except VersionConflict as conflict:
            self.stats.conflicts += 1
            self._action("conflict")
            with contextlib.suppress(Unavailable):
                await self._model.wait_for_version(sid, conflict.actual, within_s=CATCH_UP_S)
            return 0
        except EventLogUnavailable:
            # Outcome unknown: the next round reads whether it landed; a repeat
            # expects the same version, so it can never land twice.
            self.stats.unknown += 1
            self._action("unknown")
            log.warning("plan append for %s: outcome unknown; recomputing", hostname)
            return 0
        self.stats.written += 1
        self._action("ok")
        return result.last_position

    def _action(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.action("plan", outcome)

    def _check_segments(self) -> None:
        nets = (e.state for _, e in self._model.of_kind(network.KIND))
        clashes = netplan.segment_clashes(nets)
        if clashes != self._clashes:
            for c in clashes:
                log.error(
                    "segmentation id %d of pool %s is held by several networks: %s",
                    c.segmentation_id,
                    c.pool,
                    ", ".join(c.network_ids),
                )
            self._clashes = clashes
        self.stats.segment_clashes = len(clashes)

    async def _wait_for_news(self) -> None:
        """Until the read model moves, `stop()`, or `idle_wait_s` (to re-check the term)."""
        await self._until_stopped(
            self._model.wait_for(self._model.position + 1, within_s=self.config.idle_wait_s),
            swallow=(Unavailable,),
        )

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


# -- the console script ----------------------------------------------------------------


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="vim-sdn", description="Run one VIM SDN controller.")
    p.add_argument(
        "--eventlog-url",
        default=env("VIM_EVENTLOG_URL", "sqlite:///./var/eventlog.db"),
        help="postgresql://... or sqlite:///PATH (env VIM_EVENTLOG_URL)",
    )
    p.add_argument(
        "--etcd",
        default=env("VIM_ETCD_ENDPOINTS", ""),
        help="comma-separated etcd host:port list (env VIM_ETCD_ENDPOINTS); "
        "empty: the in-process elector (a single controller)",
    )
    p.add_argument(
        "--election-prefix",
        default=env("VIM_ELECTION_PREFIX", "/vim/election/"),
        help="etcd key prefix of the elections (env VIM_ELECTION_PREFIX)",
    )
    p.add_argument("--name", default="", help="candidate name (default host:pid)")
    p.add_argument("--log-level", default=env("VIM_LOG_LEVEL", "INFO"))
    telemetry.add_metrics_arguments(p)
    a = p.parse_args(argv)
    a.metrics_listen = telemetry.metrics_listen(p, a.metrics_listen)
    return a


async def serve(
    url: str,
    elector: Elector,
    config: SdnConfig,
    *,
    metrics: telemetry.ServiceMetrics | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Open the log, follow it into a read model, and plan until cancelled."""
    notifier = notifier or Notifier.from_env()
    event_log = await SqlEventLog.open(url)
    projector = Projector(event_log)
    service = SdnService(
        event_log, projector.model, elector=elector, config=config, metrics=metrics
    )
    if metrics is not None:
        metrics.track_stats(service.stats, descriptions=STATS_HELP, gauges=STATS_GAUGES)
    pings: asyncio.Task[None] | None = None
    try:
        await projector.catch_up()
        projector.start()
        tick = telemetry.leader_tick(metrics, elector)
        pings = asyncio.create_task(keep_pinging(notifier, tick=tick))
        stop_on_signals(service.stop)
        notifier.ready(f"campaigning as {config.name}")
        await service.run()
    finally:
        notifier.stopping()
        if pings is not None:
            pings.cancel()
        await service.stop()
        await projector.stop()
        await elector.close()
        await event_log.close()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `vim-sdn`."""
    a = _parse(argv)
    telemetry.configure_logging(a.log_level)
    config = SdnConfig(name=a.name) if a.name else SdnConfig()
    endpoints = [e.strip() for e in a.etcd.split(",") if e.strip()]
    elector: Elector = (
        EtcdElector(endpoints, ROLE, config.name, prefix=a.election_prefix)
        if endpoints
        else LocalElector(ROLE, config.name)
    )
    metrics = telemetry.ServiceMetrics(ROLE) if a.metrics_listen else None
    endpoint = metrics.serve(a.metrics_listen, a.metrics_port_file) if metrics else None
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(a.eventlog_url, elector, config, metrics=metrics))
    finally:
        if endpoint is not None:
            endpoint.close()


if __name__ == "__main__":
    main()
