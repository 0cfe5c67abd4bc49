"""What the agent tells the operator: Prometheus metrics and correlated log lines.

`vim-agent --metrics-listen HOST:PORT` serves, besides the cross-service
`vim_service_*` families and `vim_agent_is_leader` (1 while the agent runs),
`vim_agent_term`, `vim_agent_build_info` (`vim.telemetry.ServiceMetrics`):

- `vim_agent_reconcile_passes_total`, and `vim_agent_reconcile_errors_total`
  (passes that raised: a driver away);
- `vim_agent_reconcile_actions_total{action}` and
  `vim_agent_reconcile_failures_total{action}`: actions executed and those that
  failed, by action type (`EnsureDomain`, `RemoveDomain`, `EnsureFlows`, ...);
- `vim_agent_reports_total`: observations reported to the control plane;
- `vim_agent_domains{power}`: managed domains by power state after the last
  pass, and `vim_agent_desired_servers`;
- `vim_agent_lease_renewals_total`, `vim_agent_leases_granted_total`,
  `vim_agent_lease_alive` (0/1) and `vim_agent_self_fences_total`.

Labels are bounded: `action` is a class name of `vim.agent.reconcile`'s
actions, `power` a `DomainPower`; never a server or host name.

Correlation: each `DesiredServer` carries the correlation id of the last
request that touched it (`x-correlation-id`, else the request id, through the
event log's metadata and the API's desired state). `ObservedReconciler` binds
it (`correlation_id`, with `server_id`) in structlog's context while it acts on
that server, so its own "acting on" line and anything the drivers log meanwhile
carry it: one id follows a request from the API node to the host.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterator
from typing import Any

import prometheus_client
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vim.agent import reconcile as rc
from vim.agent.drivers import DomainPower, HypervisorDriver, SwitchDriver
from vim.agent.fencing import Fence, FenceWatchdog
from vim.telemetry import ServiceMetrics

log = logging.getLogger("vim.agent")

SERVICE = "agent"


class AgentMetrics:
    """The agent's metric families (in `ServiceMetrics("agent")`'s registry)."""

    def __init__(self) -> None:
        self.service = ServiceMetrics(SERVICE)
        registry = self.service.registry
        self.passes = prometheus_client.Counter(
            "vim_agent_reconcile_passes", "Reconcile passes completed", registry=registry
        )
        self.errors = prometheus_client.Counter(
            "vim_agent_reconcile_errors",
            "Reconcile passes that raised (a driver away; the next pass retries)",
            registry=registry,
        )
        self.actions = prometheus_client.Counter(
            "vim_agent_reconcile_actions",
            "Reconcile actions executed, by action type",
            ["action"],
            registry=registry,
        )
        self.failures = prometheus_client.Counter(
            "vim_agent_reconcile_failures",
            "Reconcile actions that failed, by action type",
            ["action"],
            registry=registry,
        )
        self.reports = prometheus_client.Counter(
            "vim_agent_reports",
            "Server observations reported to the control plane",
            registry=registry,
        )
        self.renewals = prometheus_client.Counter(
            "vim_agent_lease_renewals",
            "Successful grants and keepalives of the liveness lease",
            registry=registry,
        )
        self.domains = prometheus_client.Gauge(
            "vim_agent_domains",
            "Managed domains after the last pass, by power state",
            ["power"],
            registry=registry,
        )
        self.desired = prometheus_client.Gauge(
            "vim_agent_desired_servers",
            "Servers the control plane wants on this host (last pass)",
            registry=registry,
        )
        for power in DomainPower:
            self.domains.labels(power.value)  # every state present, 0 until seen

    @property
    def registry(self) -> prometheus_client.CollectorRegistry:
        return self.service.registry

    def passed(self, desired: rc.Desired, result: rc.PassResult) -> None:
        self.passes.inc()
        failed = Tally(type(a).__name__ for a, _ in result.failed)
        for name, count in Tally(type(a).__name__ for a in result.actions).items():
            self.actions.labels(name).inc(count)
            ok = count - failed.get(name, 0)
            if ok:
                self.service.action(name, "ok", ok)
        for name, count in failed.items():
            self.failures.labels(name).inc(count)
            self.service.action(name, "failed", count)
        if result.reported:
            self.reports.inc(len(result.reported))
        self.desired.set(len(desired.servers))
        if result.after is not None:
            powers = Tally(d.power.value for d in result.after.domains)
            for power in DomainPower:
                self.domains.labels(power.value).set(powers.get(power.value, 0))

    def watch(self, agent: Any) -> None:
        """Families read from the running agent at scrape time (plain attributes only:
        the scrape runs on another thread than the agent's loop)."""

        def collect() -> Iterator[Metric]:
            keeper = agent.keeper
            yield GaugeMetricFamily(
                "vim_agent_lease_alive",
                "1 while the last liveness renewal is younger than the TTL",
                value=1 if keeper is not None and keeper.proven_alive() else 0,
            )
            yield CounterMetricFamily(
                "vim_agent_leases_granted",
                "Liveness leases granted (1, plus one per lease lost and granted again)",
                value=keeper.leases_granted if keeper is not None else 0,
            )
            yield CounterMetricFamily(
                "vim_agent_self_fences",
                "Self-fences recorded through the API by this process",
                value=agent.fences,
            )

        self.service.add_collector(collect)


class CountingWatchdog(FenceWatchdog):
    """The self-fencing watchdog, counting the lease renewals it is told of."""

    def __init__(self, ttl_s: float, fence: Fence, metrics: AgentMetrics) -> None:
        super().__init__(ttl_s, fence)
        self._metrics = metrics

    def renewed(self, sent: float) -> None:
        self._metrics.renewals.inc()
        super().renewed(sent)


class ObservedReconciler(rc.Reconciler):
    """The reconciler, counted (`AgentMetrics`) and logging each server action under
    the server's correlation id."""

    def __init__(
        self,
        hypervisor: HypervisorDriver,
        switch: SwitchDriver | None,
        reporter: rc.Reporter,
        metrics: AgentMetrics | None = None,
    ) -> None:
        super().__init__(hypervisor, switch, reporter)
        self._metrics = metrics
        self._correlations: dict[str, str] = {}

    async def run_once(self, desired: rc.Desired, *, hold: bool = False) -> rc.PassResult:
        self._correlations = {
            s.spec.server_id: s.correlation_id for s in desired.servers if s.correlation_id
        }
        try:
            result = await super().run_once(desired, hold=hold)
        except Exception:
            if self._metrics is not None:
                self._metrics.errors.inc()
            raise
        if self._metrics is not None:
            self._metrics.passed(desired, result)
        return result

    async def _execute(self, action: rc.Action) -> None:
        sid = server_of(action)
        if not sid:
            await super()._execute(action)
            return
        bound: dict[str, str] = {"server_id": sid}
        cid = self._correlations.get(sid)
        if cid:
            bound["correlation_id"] = cid
        with structlog.contextvars.bound_contextvars(**bound):
            log.info("acting on server %s: %s", sid, type(action).__name__)
            await super()._execute(action)


def server_of(action: rc.Action) -> str:
    """The server an action is about ("" for the host-wide ones: bridges, tunnels, flows)."""
    sid = getattr(action, "server_id", "")
    if not sid:
        sid = getattr(getattr(action, "spec", None), "server_id", "")
    if not sid:
        sid = getattr(getattr(action, "binding", None), "server_id", "")
    return str(sid or "")
