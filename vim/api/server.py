"""`vim-api`: one stateless API node, serving the control plane's gRPC services.

A node opens the event log, registers its services (`default_services`, the one
list to extend when a new service arrives), health checking and reflection,
binds, and only then reports SERVING. Any number of nodes may run against the
same log (active/active); they share nothing else.

Shutdown, on `stop()` or SIGTERM/SIGINT, runs in this order and only once:
health goes NOT_SERVING (clients and balancers move away), services drain (open
Watch streams end with UNAVAILABLE and a resume position), `server.stop(grace)`
lets unary RPCs finish and then cancels what is left, the metrics endpoint
closes, and finally the event log closes (it is still needed by RPCs in grace).

Before serving, the node replays the log into its read model (`Projector`) and
then follows it. Every call needs a bearer token signed with the cluster secret.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import grpc
import structlog
from grpc_reflection.v1alpha import reflection

from vim._gen.vim.v1 import admin_pb2_grpc, events_pb2_grpc, flavours_pb2_grpc
from vim.api import admin, events, flavours, health, metrics
from vim.api.auth import Authenticator
from vim.api.node import Node
from vim.app.commands import CommandRunner
from vim.errors import VimError
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import EventLog
from vim.projections.readmodel import Projector

logger = structlog.get_logger("vim.api")

MiB = 1024 * 1024
DEFAULT_EVENTLOG_URL = "sqlite:///./var/eventlog.db"
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9464"
DEFAULT_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Where a node listens and what it serves from; see `vim-api --help`."""

    listen: str = DEFAULT_LISTEN
    eventlog_url: str = DEFAULT_EVENTLOG_URL
    metrics_listen: str | None = DEFAULT_METRICS_LISTEN
    port_file: Path | None = None
    metrics_port_file: Path | None = None
    grace_s: float = DEFAULT_GRACE_S
    max_receive_message_bytes: int = 4 * MiB
    auth_secret: bytes = b""
    """The shared secret bearer tokens are signed with (≥ 32 bytes)."""


class Service(NamedTuple):
    """One gRPC service: how to add it to a server, its full name, how to drain it."""

    add: Callable[[grpc.aio.Server], None]
    name: str
    drain: Callable[[], Awaitable[None]] | None = None


ServiceFactory = Callable[[Node], Sequence[Service]]


def default_services(node: Node) -> list[Service]:
    """Every service a node serves; register new servicers here."""
    event_log = events.EventLogServicer(node)
    return [
        Service(
            partial(events_pb2_grpc.add_EventLogServicer_to_server, event_log),
            events.SERVICE_NAME,
            event_log.drain,
        ),
        Service(
            partial(admin_pb2_grpc.add_AdminServicer_to_server, admin.AdminServicer(node)),
            admin.SERVICE_NAME,
        ),
        Service(
            partial(
                flavours_pb2_grpc.add_FlavoursServicer_to_server, flavours.FlavoursServicer(node)
            ),
            flavours.SERVICE_NAME,
        ),
    ]


class ApiNode:
    """One API node: `start()` or `run()` it, then `stop()` it (idempotent)."""

    def __init__(
        self,
        config: ApiConfig,
        *,
        log: EventLog | None = None,
        services: ServiceFactory = default_services,
    ) -> None:
        self.config = config
        self._log = log
        self._owns_log = log is None
        self._service_factory = services
        self._services: Sequence[Service] = ()
        self._health = health.Health()
        self._metrics = metrics.ApiMetrics()
        self._metrics_endpoint: metrics.MetricsEndpoint | None = None
        self._server: grpc.aio.Server | None = None
        self._projector: Projector | None = None
        self.node: Node | None = None
        self._started = False
        self._stopping: asyncio.Future[None] | None = None
        self._stopped = asyncio.Event()
        self.port = 0
        """The bound gRPC port, once started."""

    @property
    def address(self) -> str:
        """`host:port` that clients dial, once started."""
        return f"{_host(self.config.listen)}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        return self._metrics_endpoint.port if self._metrics_endpoint else None

    async def start(self) -> None:
        """Open the log, bind, serve, then report SERVING; cleans up if any step fails."""
        if self._stopping is not None:
            raise RuntimeError("this API node was stopped; create a new one")
        if self._started:
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def run(self) -> None:
        """Start, then serve until `stop()` has finished."""
        await self.start()
        await self._stopped.wait()

    async def stop(self) -> None:
        """Shut down in order (see the module docstring); later calls wait for the first."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._stopping)

    async def _start(self) -> None:
        cfg = self.config
        if self._log is None:
            _ensure_sqlite_dir(cfg.eventlog_url)
            self._log = await SqlEventLog.open(cfg.eventlog_url)
        self._projector = Projector(self._log)
        await self._projector.catch_up()
        self._projector.start()
        model = self._projector.model
        self.node = Node(
            log=self._log,
            model=model,
            runner=CommandRunner(self._log, model),
            authenticator=Authenticator(cfg.auth_secret),
        )
        self._services = list(self._service_factory(self.node))
        names = [s.name for s in self._services]
        server = grpc.aio.server(
            interceptors=[metrics.MetricsInterceptor(self._metrics)],
            options=[
                ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
                ("grpc.so_reuseport", 0),  # a second node on a taken port must fail, not share it
                ("grpc.keepalive_time_ms", 30_000),  # find dead Watch clients
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
        )
        self._server = server
        for service in self._services:
            service.add(server)
        self._health.add_to(server)
        await self._health.starting(names)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        self.port = _bind(server, cfg.listen)
        if cfg.metrics_listen:
            self._metrics_endpoint = metrics.serve(self._metrics, cfg.metrics_listen)
        await server.start()
        await self._health.serving()
        _write_port_file(cfg.port_file, self.port)
        _write_port_file(cfg.metrics_port_file, self.metrics_port)
        logger.info(
            "api node serving", address=self.address, metrics_port=self.metrics_port, services=names
        )

    async def _shutdown(self) -> None:
        logger.info("api node stopping", address=self.address)
        try:
            await self._health.shutting_down()
            for service in self._services:
                if service.drain is not None:
                    await service.drain()
            if self._server is not None:
                await self._server.stop(self.config.grace_s)
            if self._metrics_endpoint is not None:
                # Blocks for up to the HTTP server's 0.5 s poll interval: keep the loop free.
                await asyncio.to_thread(self._metrics_endpoint.close)
            if self._projector is not None:
                await self._projector.stop()
            if self._log is not None and self._owns_log:
                await self._log.close()
        finally:
            self._stopped.set()
        logger.info("api node stopped", address=self.address)


def _host(listen: str) -> str:
    """The host part of host:port, with a wildcard replaced by the loopback to dial."""
    host = listen.rpartition(":")[0]
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)


def _bind(server: grpc.aio.Server, listen: str) -> int:
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return port


def _ensure_sqlite_dir(url: str) -> None:
    """SQLite creates the file but not its directory (`./var/` on a fresh clone)."""
    prefix = "sqlite:///"
    if url.startswith(prefix):
        Path(url[len(prefix) :].split("?", 1)[0]).parent.mkdir(parents=True, exist_ok=True)


def _write_port_file(path: Path | None, port: int | None) -> None:
    """Write atomically, so a reader polling for the file never sees it half-written."""
    if path is None or port is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n", encoding="utf-8")
    tmp.replace(path)


def configure_logging(level: str = "INFO", *, json_output: bool = True) -> None:
    """structlog and stdlib logging both render through structlog, as JSON lines on stderr."""
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


def parse_args(argv: Sequence[str] | None = None) -> tuple[ApiConfig, str]:
    """The node's configuration and the log level, from flags and VIM_* variables."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog="vim-api", description="Run one VIM API node.")
    p.add_argument(
        "--listen",
        default=env("VIM_API_LISTEN", DEFAULT_LISTEN),
        help="gRPC host:port; port 0 picks a free one (default %(default)s)",
    )
    p.add_argument(
        "--eventlog-url",
        default=env("VIM_EVENTLOG_URL", DEFAULT_EVENTLOG_URL),
        help="postgresql://... or sqlite:///PATH (env VIM_EVENTLOG_URL; default %(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default=env("VIM_METRICS_LISTEN", DEFAULT_METRICS_LISTEN),
        help="Prometheus host:port, port 0 for a free one, 'off' for none (default %(default)s)",
    )
    p.add_argument("--port-file", type=Path, help="write the bound gRPC port here once serving")
    p.add_argument("--metrics-port-file", type=Path, help="write the bound metrics port here")
    p.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        help="seconds in-flight RPCs get at shutdown (default %(default)s)",
    )
    p.add_argument(
        "--auth-secret-file",
        type=Path,
        default=env("VIM_AUTH_SECRET_FILE"),
        help="file holding the bearer-token signing secret (env VIM_AUTH_SECRET_FILE, "
        "or the secret itself in VIM_AUTH_SECRET)",
    )
    p.add_argument("--log-level", default=env("VIM_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    secret = env("VIM_AUTH_SECRET", "").encode()
    if a.auth_secret_file:
        secret = Path(a.auth_secret_file).read_bytes().strip()
    if len(secret) < 32:
        p.error("a token secret of at least 32 bytes is required (--auth-secret-file)")
    config = ApiConfig(
        listen=a.listen,
        eventlog_url=a.eventlog_url,
        metrics_listen=None if a.metrics_listen in ("", "off") else a.metrics_listen,
        port_file=a.port_file,
        metrics_port_file=a.metrics_port_file,
        grace_s=a.grace,
        auth_secret=secret,
    )
    return config, a.log_level


async def serve(config: ApiConfig) -> None:
    """Run a node until SIGTERM or SIGINT, then stop it gracefully."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    node = ApiNode(config)
    await node.start()
    metrics_at = f", metrics on http://{_host(config.metrics_listen or '')}:{node.metrics_port}"
    print(f"vim-api serving on {node.address}{metrics_at if node.metrics_port else ''}", flush=True)
    await stop_requested.wait()
    await node.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `vim-api`: 0 after a clean shutdown, 1 when the node cannot start."""
    config, log_level = parse_args(argv)
    configure_logging(log_level)
    try:
        asyncio.run(serve(config))
    except (OSError, ValueError, VimError) as exc:
        logger.error("api node failed to start", error=str(exc), kind=type(exc).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
