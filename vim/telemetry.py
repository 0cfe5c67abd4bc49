"""Logs and metrics for every long-running service (scheduler, SDN controller, fault
manager, agent): structlog JSON lines on stderr and a Prometheus scrape endpoint.

    telemetry.configure_logging("INFO")
    metrics = telemetry.ServiceMetrics("scheduler")
    endpoint = metrics.serve("127.0.0.1:0", port_file=Path("metrics.port"))
    metrics.leading(True, term=42)
    metrics.action("place", "ok")

Labels are bounded: `service` and `role` are fixed per process, `action` and
`outcome` come from small fixed vocabularies in the calling code (never ids).
Each service gets its own registry, so tests may run several in one process.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import prometheus_client
import structlog


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


class ServiceMetrics:
    """The metrics every elected or per-host service exports."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = prometheus_client.CollectorRegistry()
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
        if term:
            self._term.set(term)

    def action(self, action: str, outcome: str = "ok", amount: int = 1) -> None:
        self._actions.labels(self.service, action, outcome).inc(amount)

    def fenced_write(self) -> None:
        self._fenced.inc()

    def serve(self, listen: str, port_file: Path | None = None) -> MetricsServer:
        return serve_registry(self.registry, listen, port_file)
