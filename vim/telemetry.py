"""Logs and metrics for every long-running service (scheduler, SDN controller, fault
manager, agent): structlog JSON lines on stderr and a Prometheus scrape endpoint.

    telemetry.configure_logging("INFO")
    metrics = telemetry.ServiceMetrics("scheduler")
    endpoint = metrics.serve("127.0.0.1:0", port_file=Path("metrics.port"))
    metrics.leading(True, term=42)
    metrics.action("place", "ok")
    metrics.track_stats(service.stats)       # vim_scheduler_placed_total, ...

Two views of the same process:

- cross-service families with a `service` label, for dashboards that compare
  services: `vim_service_up`, `vim_service_leader`, `vim_service_term`,
  `vim_service_actions_total{action,outcome}`, `vim_service_fenced_writes_total`;
- per-service families: `vim_<svc>_is_leader`, `vim_<svc>_term`,
  `vim_<svc>_build_info{version,python}` (always 1) and, with `track_stats`, one
  `vim_<svc>_<counter>_total` per field of the service's `stats` object, read at
  scrape time (the services keep counting in plain ints; nothing is pushed).

Labels are bounded: `service` and `role` are fixed per process, `action` and
`outcome` come from small fixed vocabularies in the calling code (never ids,
never host or server names). Each service gets its own registry, so tests may
run several in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import os
import platform
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import prometheus_client
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PACKAGE = "vim-control-plane"


def build_version() -> str:
    """The installed package's version ("unknown" when run from a bare checkout)."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def configure_logging(level: str = "INFO", *, json_output: bool = True) -> None:
    """structlog and stdlib logging both render through structlog, as JSON lines on stderr.

    `structlog.contextvars` are merged into every line, so a correlation id bound
    with `bind_contextvars(correlation_id=...)` follows the work it belongs to."""
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@dataclass(slots=True)
class MetricsServer:
    """A running scrape endpoint (prometheus_client's WSGI server in a daemon thread)."""

    host: str
    port: int
    _server: Any

    def close(self) -> None:
        """Stop serving scrapes; idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def add_metrics_arguments(p: argparse.ArgumentParser) -> None:
    """`--metrics-listen HOST:PORT` (env VIM_METRICS_LISTEN; empty or `off`: no endpoint)
    and `--metrics-port-file PATH` (the bound port, written once listening)."""
    p.add_argument(
        "--metrics-listen",
        default=os.environ.get("VIM_METRICS_LISTEN", ""),
        metavar="HOST:PORT",
        help="serve Prometheus /metrics here; port 0 picks a free one; empty or 'off': "
        "no endpoint (env VIM_METRICS_LISTEN; default off)",
    )
    p.add_argument(
        "--metrics-port-file", type=Path, help="write the bound metrics port here once listening"
    )


def metrics_listen(p: argparse.ArgumentParser, value: str) -> str | None:
    """The checked `--metrics-listen` value (None: no endpoint); `p.error` when malformed."""
    if value in ("", "off"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        p.error(f"--metrics-listen: expected HOST:PORT (port 0-65535), got {value!r}")
    return value


def serve_registry(
    registry: prometheus_client.CollectorRegistry, listen: str, port_file: Path | None = None
) -> MetricsServer:
    """Serve /metrics on `host:port` (port 0: a free one), writing the bound port to
    `port_file` once it is listening."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    server, _thread = prometheus_client.start_http_server(int(port), addr=host, registry=registry)
    bound = int(server.server_port)
    if port_file is not None:
        tmp = port_file.with_suffix(port_file.suffix + ".tmp")
        tmp.write_text(f"{bound}\n", encoding="utf-8")
        tmp.replace(port_file)
    return MetricsServer(host, bound, server)


class _Leads(Protocol):
    """What `refresh_leadership` reads of an elector (`ha.election.Elector`)."""

    @property
    def leadership(self) -> Any: ...


class ServiceMetrics:
    """The metrics every elected or per-host service exports."""

    def __init__(self, service: str) -> None:
        if not service.isidentifier():
            raise ValueError(f"service name {service!r} must be usable in a metric name")
        self.service = service
        self.registry = prometheus_client.CollectorRegistry()
        self._is_leader = prometheus_client.Gauge(
            f"vim_{service}_is_leader",
            f"1 while this {service} process leads its role (or, unelected, is active)",
            registry=self.registry,
        )
        self._own_term = prometheus_client.Gauge(
            f"vim_{service}_term",
            f"The fencing token of the current (or last) term this {service} process held",
            registry=self.registry,
        )
        prometheus_client.Gauge(
            f"vim_{service}_build_info",
            "Always 1; the labels say which build runs",
            ["version", "python"],
            registry=self.registry,
        ).labels(build_version(), platform.python_version()).set(1)
        self._leader = prometheus_client.Gauge(
            "vim_service_leader",
            "1 while this process leads its role (or, unelected, is active)",
            ["service"],
            registry=self.registry,
        ).labels(service)
        self._term = prometheus_client.Gauge(
            "vim_service_term",
            "The fencing token of the current (or last) term this process held",
            ["service"],
            registry=self.registry,
        ).labels(service)
        self._actions = prometheus_client.Counter(
            "vim_service_actions",
            "Work done by the service, by action and outcome",
            ["service", "action", "outcome"],
            registry=self.registry,
        )
        self._fenced = prometheus_client.Counter(
            "vim_service_fenced_writes",
            "Writes the event log refused because this process's fencing token was stale",
            ["service"],
            registry=self.registry,
        ).labels(service)
        self._up = prometheus_client.Gauge(
            "vim_service_up", "1 while the service runs", ["service"], registry=self.registry
        ).labels(service)
        self._up.set(1)

    def leading(self, is_leader: bool, term: int = 0) -> None:
        self._leader.set(1 if is_leader else 0)
        self._is_leader.set(1 if is_leader else 0)
        if term:
            self._term.set(term)
            self._own_term.set(term)

    def refresh_leadership(self, elector: _Leads) -> None:
        """Leader gauges from the elector's current term. Call it on the elector's event
        loop (`keep_pinging`'s tick): reading the term may end it (a passed deadline)."""
        held = elector.leadership
        self.leading(held is not None, int(held.token) if held is not None else 0)

    def track_stats(
        self,
        stats: object,
        *,
        descriptions: Mapping[str, str] | None = None,
        gauges: Iterable[str] = (),
    ) -> None:
        """Export every int field of the dataclass `stats` as `vim_<svc>_<field>_total`
        (fields named in `gauges`: `vim_<svc>_<field>`, a level, not a count), read at
        each scrape."""
        self.registry.register(
            _StatsCollector(self.service, stats, dict(descriptions or {}), gauges)
        )

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Families computed at scrape time by `collect()` (called on the scrape thread:
        it may only read plain attributes, never call into the event loop)."""
        self.registry.register(_FunctionCollector(collect))

    def action(self, action: str, outcome: str = "ok", amount: int = 1) -> None:
        self._actions.labels(self.service, action, outcome).inc(amount)

    def fenced_write(self) -> None:
        self._fenced.inc()

    def serve(self, listen: str, port_file: Path | None = None) -> MetricsServer:
        return serve_registry(self.registry, listen, port_file)


def leader_tick(metrics: ServiceMetrics | None, elector: _Leads) -> Callable[[], None] | None:
    """A watchdog tick (`vim.sdnotify.keep_pinging`) that keeps the leader gauges
    current from `elector`; None without metrics."""
    if metrics is None:
        return None
    return lambda: metrics.refresh_leadership(elector)


class _StatsCollector(Collector):
    """A service's `stats` dataclass as counters, read at scrape time."""

    def __init__(
        self, service: str, stats: object, descriptions: dict[str, str], gauges: Iterable[str]
    ) -> None:
        if not dataclasses.is_dataclass(stats):
            raise TypeError("track_stats wants a dataclass instance")
        self._service = service
        self._stats = stats
        self._help = descriptions
        self._gauges = frozenset(gauges)
        self._fields = [f.name for f in dataclasses.fields(stats)]

    def collect(self) -> Iterator[Metric]:
        for name in self._fields:
            value = getattr(self._stats, name, None)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            text = self._help.get(name, f"{self._service} stats.{name}")
            metric = f"vim_{self._service}_{name}"
            if name in self._gauges:
                yield GaugeMetricFamily(metric, text, value=value)
            else:
                yield CounterMetricFamily(metric, text, value=value)


class _FunctionCollector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()
