"""The `vim-scheduler` process: places BUILDING servers while it leads.

Loop (leader-only; see docs/SCHEDULER.md):

1. campaign with the `Elector` (etcd in production, in-process when embedded);
   the term's fencing token goes on every append as
   `Metadata(fencing_role="scheduler", fencing_token=token)`, so the log refuses
   a paused old leader's writes (`FencedOut`) in the append's own transaction;
2. while the term is provable (`is_leader()`): take a snapshot of the read model,
   plan the BUILDING servers (highest priority first, `batch_size` at a time),
   apply the plan (one append per placement at the planned versions), wait
   until the read model has this round's writes, re-plan the requests that
   conflicted (at most `max_replans` times each; later rounds pick the rest up);
3. with nothing left, wait for the read model to move (a notification, not a
   sleep; bounded by `idle_wait_s` so the term is re-checked);
4. on `FencedOut` or a lost term, stop acting, resign, and campaign again.

The console script (`main`) logs JSON lines (`vim.telemetry.configure_logging`),
serves Prometheus metrics on `--metrics-listen` (`vim_scheduler_*` from `Stats`,
`vim_scheduler_is_leader`, `vim_scheduler_term`, `vim_scheduler_build_info` and
the cross-service `vim_service_*`), and tells systemd READY=1 once its read model
has caught up and it campaigns, then WATCHDOG=1 from its event loop
(`vim.sdnotify`).

With no elector (tests, or an operator who runs exactly one scheduler) the
service acts at once with `static_token` (None: no fencing metadata). Safety
never depends on there being one leader: the versions checked by every append
keep two schedulers from over-committing a host or breaking a group; the
election only stops them wasting work on each other's conflicts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from ha.election import Elector, EtcdElector, LocalElector
from vim import telemetry
from vim.domain.reservation import rfc3339
from vim.errors import FencedOut, Unavailable
from vim.eventlog.model import AppendRequest, AppendResult, Metadata
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import EventLog
from vim.projections.readmodel import Projector, ReadModel
from vim.scheduler.applying import Applied, Applier
from vim.scheduler.planner import Planner, Snapshot
from vim.scheduler.weighers import Strategy
from vim.sdnotify import Notifier, keep_pinging, stop_on_signals

log = logging.getLogger(__name__)

ROLE = "scheduler"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """How the scheduler places and how hard it tries."""

    strategy: Strategy = Strategy.SPREAD
    batch_size: int = 500
    max_replans: int = 8
    idle_wait_s: float = 1.0
    static_token: int | None = None
    """Fencing token to use when running without an elector (None: no fencing)."""
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


@dataclass(slots=True)
class Stats:
    """Counters for this process (`vim_scheduler_<field>_total`, see STATS_HELP)."""

    rounds: int = 0
    placed: int = 0
    failed: int = 0
    conflicts: int = 0
    stale: int = 0
    replans: int = 0
    fenced: int = 0


STATS_HELP = {
    "rounds": "Scheduling rounds run while leading",
    "placed": "Servers placed by this process",
    "failed": "Servers this process could not place (no valid host)",
    "conflicts": "Placements refused by a version check (another writer moved first)",
    "stale": "Placements dropped because the server changed before they were applied",
    "replans": "Requests planned again after a conflict",
    "fenced": "Terms this process ended because the log refused its fencing token",
}


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SchedulerService:
    """Follows the read model and places BUILDING servers while leading."""

    def __init__(
        self,
        log: EventLog,
        model: ReadModel,
        *,
        elector: Elector | None = None,
        config: SchedulerConfig | None = None,
        clock: Callable[[], datetime] = _utc_now,
        metrics: telemetry.ServiceMetrics | None = None,
    ) -> None:
        self._log = log
        self._metrics = metrics
        self._model = model
        self._elector = elector
        self.config = config or SchedulerConfig()
        self._clock = clock
        self._stopping = asyncio.Event()
        self._token: int | None = self.config.static_token
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
            log.info("scheduler %s leads with token %d", self.config.name, leadership.token)
            try:
                await self._lead(leadership.token)
            except FencedOut as exc:
                self.stats.fenced += 1
                if self._metrics is not None:
                    self._metrics.fenced_write()
                log.warning("scheduler fenced out, stepping down: %s", exc)
            await self._elector.resign()

    async def stop(self) -> None:
        """Stop after the append in flight (idempotent)."""
        self._stopping.set()

    def _acting(self) -> bool:
        if self._stopping.is_set():
            return False
        return self._elector is None or self._elector.is_leader()

    async def _lead(self, token: int | None) -> None:
        self._token = token
        while self._acting():
            decided = await self.run_round()
            if decided == 0:
                await self._wait_for_news()

    # -- one round ---------------------------------------------------------------------

    def _metadata(self) -> Metadata:
        if self._token is None:
            return Metadata(actor=f"scheduler:{self.config.name}")
        return Metadata(
            actor=f"scheduler:{self.config.name}", fencing_role=ROLE, fencing_token=self._token
        )

    async def run_round(self, token: int | None = None) -> int:
        """Plan and apply one batch of BUILDING servers; how many were decided.

        Raises FencedOut when a newer term has written: the caller must stop.
        """
        if token is not None:
            self._token = token
        self.stats.rounds += 1
        applier = Applier(
            self._log,
            self._model,
            metadata=self._metadata,
            now=lambda: rfc3339(self._clock()),
            may_act=self._acting,
        )
        snapshot = Snapshot.of(self._model, self._clock())
        pending = snapshot.requests[: self.config.batch_size]
        attempts = dict.fromkeys((r.server_id for r in pending), 0)
        decided = 0
        while pending and self._acting():
            done = await applier.apply(Planner(snapshot, self.config.strategy).plan(pending))
            decided += len(done.placed) + len(done.failed)
            await self._account(done)
            limit = self.config.max_replans
            retry = {r.server_id for r in done.replan if attempts[r.server_id] < limit}
            for sid in retry:
                attempts[sid] += 1
            self.stats.replans += len(retry)
            snapshot = Snapshot.of(self._model, self._clock())
            pending = [r for r in snapshot.requests if r.server_id in retry]
        return decided

    async def _account(self, done: Applied) -> None:
        self.stats.placed += len(done.placed)
        self.stats.failed += len(done.failed)
        self.stats.conflicts += done.conflicts
        self.stats.stale += done.stale
        if self._metrics is not None:
            for outcome, amount in (
                ("ok", len(done.placed)),
                ("failed", len(done.failed)),
                ("conflict", done.conflicts),
                ("stale", done.stale),
            ):
                if amount:
                    self._metrics.action("place", outcome, amount)
        if done.position:
            # Read our own writes before planning again, or the next plan is stale.
            with contextlib.suppress(Unavailable):
                await self._model.wait_for(done.position)

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
    p = argparse.ArgumentParser(prog="vim-scheduler", description="Run one VIM scheduler.")
    p.add_argument(
        "--eventlog-url",
        default=env("VIM_EVENTLOG_URL", "sqlite:///./var/eventlog.db"),
        help="postgresql://... or sqlite:///PATH (env VIM_EVENTLOG_URL)",
    )
    p.add_argument(
        "--etcd",
        default=env("VIM_ETCD_ENDPOINTS", ""),
        help="comma-separated etcd host:port list (env VIM_ETCD_ENDPOINTS); "
        "empty: the in-process elector (a single scheduler)",
    )
    p.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        default=env("VIM_SCHEDULER_STRATEGY", Strategy.SPREAD.value),
    )
    p.add_argument(
        "--lease-ttl",
        type=int,
        default=int(env("VIM_SCHEDULER_LEASE_TTL", "2")),
        help="leader lease TTL in seconds (env VIM_SCHEDULER_LEASE_TTL)",
    )
    p.add_argument("--log-level", default=env("VIM_LOG_LEVEL", "INFO"))
    telemetry.add_metrics_arguments(p)
    a = p.parse_args(argv)
    a.metrics_listen = telemetry.metrics_listen(p, a.metrics_listen)
    return a


class _DelayedAppends:
    """Fault injection for tests only (env ``VIM_SCHEDULER_FAULT_APPEND_DELAY_S``).

    Every append of the scheduler waits that long *after* its leadership check:
    the window in which a leader paused there resumes with a decision made under
    a term that has since ended (tests/integration/test_paused_leader.py). The
    event log must refuse that write by its fencing token.
    """

    def __init__(self, log: EventLog, delay_s: float) -> None:
        self._log = log
        self._delay_s = delay_s

    async def append(self, request: AppendRequest) -> AppendResult:
        log.warning(
            "fault injection: append with token %s in %.2fs",
            request.metadata.fencing_token,
            self._delay_s,
        )
        await asyncio.sleep(self._delay_s)
        return await self._log.append(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._log, name)


async def serve(
    url: str,
    elector: Elector,
    config: SchedulerConfig,
    *,
    metrics: telemetry.ServiceMetrics | None = None,
    notifier: Notifier | None = None,
) -> None:
    """Open the log, follow it into a read model, and schedule until cancelled."""
    notifier = notifier or Notifier.from_env()
    event_log = await SqlEventLog.open(url)
    projector = Projector(event_log)
    delay = float(os.environ.get("VIM_SCHEDULER_FAULT_APPEND_DELAY_S") or 0)
    writes = cast(EventLog, _DelayedAppends(event_log, delay)) if delay > 0 else event_log
    service = SchedulerService(
        writes, projector.model, elector=elector, config=config, metrics=metrics
    )
    if metrics is not None:
        metrics.track_stats(service.stats, descriptions=STATS_HELP)
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
    """Entry point of `vim-scheduler`."""
    a = _parse(argv)
    telemetry.configure_logging(a.log_level)
    config = SchedulerConfig(strategy=Strategy(a.strategy))
    endpoints = [e.strip() for e in a.etcd.split(",") if e.strip()]
    elector: Elector = (
        EtcdElector(endpoints, ROLE, config.name, ttl_s=a.lease_ttl)
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
