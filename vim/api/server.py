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

Transport: `vim-api` serves TLS (`--tls-cert`, `--tls-key`; with
`--tls-client-ca` also mutual TLS, where clients must present a certificate that
CA signed) and refuses to start without certificates unless `--insecure` asks
for plaintext (demos and tests). An in-process `ApiConfig` without certificates
serves plaintext.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import structlog
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from vim import telemetry
from vim._gen.vim.v1 import (
    admin_pb2_grpc,
    agents_pb2_grpc,
    alarms_pb2_grpc,
    compute_pb2_grpc,
    events_pb2_grpc,
    flavours_pb2_grpc,
    hosts_pb2_grpc,
    images_pb2_grpc,
    networks_pb2_grpc,
    quotas_pb2_grpc,
)
from vim.api import (
    admin,
    agents,
    alarms,
    compute,
    events,
    flavours,
    health,
    hosts,
    images,
    metrics,
    networks,
    quotas,
)
from vim.api.auth import Authenticator
from vim.api.node import Node
from vim.app.commands import CommandRunner
from vim.errors import VimError
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import (
    DEFAULT_COMMIT_GATHER_TURNS,
    MAX_COMMIT_GATHER_TURNS,
    EventLog,
    EventLogConfig,
)
from vim.projections.readmodel import Projector
from vim.sdnotify import Notifier, keep_pinging

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
    tls_cert: Path | None = None
    """PEM server certificate (chain); with `tls_key`, the node serves TLS only."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """PEM CA bundle: when set, clients must present a certificate it signed (mTLS)."""
    workers: int = 1
    """Processes serving this node (`vim-api --workers`); `ApiNode` itself is always
    one process, `vim.api.workers` runs several of them on one port."""
    reuse_port: bool = False
    """Bind with SO_REUSEPORT: set only in a worker of a node with several workers,
    whose supervisor holds the port (so a second node still cannot take it)."""
    worker_index: int | None = None
    event_loop: str = "uvloop"
    """`uvloop` (libuv) or `asyncio` (the standard library's selector loop); see
    `run_event_loop`."""
    commit_gather_turns: int = DEFAULT_COMMIT_GATHER_TURNS
    """Event loop turns the log's writer lets run before a write so that appends being
    made join its batch (`vim-api --commit-gather-turns`, 0: none); see
    `vim.eventlog.batching.GroupCommitter`."""


EVENT_LOOPS = ("uvloop", "asyncio")


def run_event_loop(main: Coroutine[Any, Any, None], kind: str) -> None:
    """Run the node's coroutine to completion on the chosen event loop.

    uvloop by default: a node spends most of its CPU in the event loop and in gRPC's
    completion-queue callbacks it drives, not in the VIM's own code, and on libuv a
    bare `Health/Check` costs ~20 % fewer instructions and an `AllocateCompute` ~6 %
    (callgrind), ~8-21 % less node CPU per allocation at full speed and a lower p99
    at 500/s (`python -m bench.api --event-loop`, docs/BENCHMARKS.md). `asyncio` is
    there to compare, and as a fallback should a loop-specific fault ever show."""
    if kind == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


class GenericHandlersOnly:
    """What the generated `add_*Servicer_to_server` functions register on, in place of
    the `grpc.aio.Server`: the generic handlers reach the server, the "registered
    method" handlers (the same handlers again) are dropped.

    grpc.aio keeps one pending request-call future per registered method, about 75
    here, and passes them all to `asyncio.wait` every time a call arrives: ~40 µs of
    the event loop's one thread per call, whichever method was called. With generic
    handlers only, one future waits for any call and a method is found by one
    dictionary lookup per service. Calls, status codes and reflection are the same.
    In alternating runs of two nodes on one log, one registering methods and one
    not: +9.6 % allocations per second (docs/BENCHMARKS.md).
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """Dropped: the service's generic handler serves the same methods."""


class Service(NamedTuple):
    """One gRPC service: how to add it to a server, its full name, how to drain it."""

    add: Callable[[GenericHandlersOnly], None]  # a generated add_*Servicer_to_server
    name: str
    drain: Callable[[], Awaitable[None]] | None = None


ServiceFactory = Callable[[Node], Sequence[Service]]


def default_services(node: Node) -> list[Service]:
    """Every service a node serves; register new servicers here."""
    event_log = events.EventLogServicer(node)
    alarm_streams = alarms.AlarmsServicer(node)
    agents_servicer = agents.AgentsServicer(node)
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
        Service(
            partial(hosts_pb2_grpc.add_HostsServicer_to_server, hosts.HostsServicer(node)),
            hosts.SERVICE_NAME,
        ),
        Service(
            partial(images_pb2_grpc.add_ImagesServicer_to_server, images.ImagesServicer(node)),
            images.SERVICE_NAME,
        ),
        Service(
            partial(quotas_pb2_grpc.add_QuotasServicer_to_server, quotas.QuotasServicer(node)),
            quotas.SERVICE_NAME,
        ),
        Service(
            partial(
                quotas_pb2_grpc.add_ReservationsServicer_to_server,
                quotas.ReservationsServicer(node),
            ),
            quotas.RESERVATIONS_SERVICE_NAME,
        ),
        Service(
            partial(
                networks_pb2_grpc.add_NetworksServicer_to_server,
                networks.NetworksServicer(node),
            ),
            networks.SERVICE_NAME,
        ),
        Service(
            partial(compute_pb2_grpc.add_ComputeServicer_to_server, compute.ComputeServicer(node)),
            compute.SERVICE_NAME,
        ),
        Service(
            partial(agents_pb2_grpc.add_AgentsServicer_to_server, agents_servicer),
            agents.SERVICE_NAME,
            agents_servicer.drain,
        ),
        Service(
            partial(alarms_pb2_grpc.add_AlarmsServicer_to_server, alarm_streams),
            alarms.SERVICE_NAME,
            alarm_streams.drain,
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
            self._log = await SqlEventLog.open(
                cfg.eventlog_url,
                config=EventLogConfig(commit_gather_turns=cfg.commit_gather_turns),
            )
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
                # A second node on a taken port must fail, not share it; only the workers
                # of one node share their port (their supervisor keeps others out).
                ("grpc.so_reuseport", 1 if cfg.reuse_port else 0),
                ("grpc.keepalive_time_ms", 30_000),  # find dead Watch clients
                ("grpc.keepalive_timeout_ms", 10_000),
            ],
        )
        self._server = server
        registry = GenericHandlersOnly(server)
        for service in self._services:
            service.add(registry)
        self._health.add_to(registry)
        await self._health.starting(names)
        # What `reflection.enable_server_reflection` does for a grpc.aio server (it
        # checks the type, and the registry is not one).
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(
                [*names, health.SERVICE_NAME, reflection.SERVICE_NAME]
            ),
            registry,
        )
        self.port = _bind(server, cfg.listen, _server_credentials(cfg))
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


def _server_credentials(cfg: ApiConfig) -> grpc.ServerCredentials | None:
    """TLS (and mTLS with a client CA) from the config's PEM files; None for plaintext."""
    if cfg.tls_cert is None and cfg.tls_key is None:
        if cfg.tls_client_ca is not None:
            raise ValueError("a client CA (mTLS) needs a server certificate and key")
        return None
    if cfg.tls_cert is None or cfg.tls_key is None:
        raise ValueError("TLS needs both a certificate and its private key")
    client_ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def _bind(server: grpc.aio.Server, listen: str, creds: grpc.ServerCredentials | None) -> int:
    try:
        if creds is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, creds)
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
    """structlog and stdlib logging both render through structlog, as JSON lines on
    stderr (`vim.telemetry.configure_logging`, which every service uses)."""
    telemetry.configure_logging(level, json_output=json_output)


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
    _add_tls_arguments(p)
    p.add_argument("--log-level", default=env("VIM_LOG_LEVEL", "INFO"))
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes serving this node on one port (SO_REUSEPORT), each with its own "
        "read model and pool (env VIM_API_WORKERS; default: the number of cores with "
        "PostgreSQL, 1 with SQLite)",
    )
    p.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=env("VIM_API_EVENT_LOOP", "uvloop"),
        help="the asyncio event loop implementation (env VIM_API_EVENT_LOOP; default %(default)s)",
    )
    p.add_argument(
        "--commit-gather-turns",
        type=int,
        # A string default goes through `type` too: a bad value is a usage error.
        default=env("VIM_API_COMMIT_GATHER_TURNS") or str(DEFAULT_COMMIT_GATHER_TURNS),
        help="event loop turns a log write lets run first so that appends being made join "
        "its batch, 0 for none (env VIM_API_COMMIT_GATHER_TURNS; default %(default)s)",
    )
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    workers_env = env("VIM_API_WORKERS", "").strip()
    if a.workers is None and workers_env:  # 0 means the default, as no value does
        try:
            a.workers = int(workers_env) or None
        except ValueError:
            p.error(f"VIM_API_WORKERS must be a number of workers, got {workers_env!r}")
    workers = a.workers if a.workers is not None else default_workers(a.eventlog_url)
    if not 1 <= workers <= 64:
        p.error(f"--workers must be 1-64, got {workers}")
    if a.event_loop not in EVENT_LOOPS:  # from the environment: argparse checks flags only
        p.error(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}, got {a.event_loop!r}")
    if not 0 <= a.commit_gather_turns <= MAX_COMMIT_GATHER_TURNS:
        p.error(
            f"--commit-gather-turns must be 0-{MAX_COMMIT_GATHER_TURNS}, "
            f"got {a.commit_gather_turns}"
        )
    _check_tls_arguments(p, a)
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
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        tls_client_ca=a.tls_client_ca,
        workers=workers,
        reuse_port=a.reuse_port,
        worker_index=a.worker_index,
        event_loop=a.event_loop,
        commit_gather_turns=a.commit_gather_turns,
    )
    return config, a.log_level


def default_workers(eventlog_url: str) -> int:
    """On PostgreSQL one worker per core beyond the first; one on SQLite, the
    embedded single-file log (no NOTIFY between processes, one writer at a time).

    Every worker is a whole read model applying every event, and reads back the
    other workers' appends (its own it does not: `vim.eventlog.sql`), so a second
    worker pays only where it has a core to itself: on a 2-core machine shared
    with PostgreSQL, one worker answers 500 allocations/s with a p99 of 35-39 ms
    and two with 0.7 s (docs/BENCHMARKS.md)."""
    if eventlog_url.startswith("sqlite"):
        return 1
    return max(1, (os.cpu_count() or 1) - 1)


def _add_tls_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    tls = p.add_argument_group(
        "TLS", "TLS is on by default: give a certificate and key, or --insecure for plaintext"
    )
    tls.add_argument(
        "--tls-cert", type=Path, default=env("VIM_TLS_CERT"), help="PEM server certificate"
    )
    tls.add_argument("--tls-key", type=Path, default=env("VIM_TLS_KEY"), help="PEM private key")
    tls.add_argument(
        "--tls-client-ca",
        type=Path,
        default=env("VIM_TLS_CLIENT_CA"),
        help="PEM CA: require and verify client certificates it signed (mutual TLS)",
    )
    tls.add_argument(
        "--insecure",
        action="store_true",
        default=env("VIM_INSECURE", "") == "1",
        help="serve plaintext gRPC (demos and tests only; env VIM_INSECURE=1)",
    )


def _check_tls_arguments(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse, before anything starts, a node that would serve plaintext by accident."""
    given = [f for f in ("tls_cert", "tls_key", "tls_client_ca") if getattr(a, f)]
    if a.insecure:
        if given:
            p.error("--insecure (plaintext) conflicts with --tls-cert/--tls-key/--tls-client-ca")
        return
    if not (a.tls_cert and a.tls_key):
        p.error(
            "TLS is required: give --tls-cert and --tls-key (PEM files; "
            "`python -m vim.security.certs` makes a CA and certificates), "
            "or --insecure to serve plaintext for a demo or a test"
        )
    for flag in given:
        if not Path(getattr(a, flag)).is_file():
            p.error(f"--{flag.replace('_', '-')}: no such file: {getattr(a, flag)}")


async def serve(config: ApiConfig, notifier: Notifier | None = None) -> None:
    """Run a node until SIGTERM or SIGINT, then stop it gracefully.

    systemd (`Type=notify`): READY=1 once the node serves (port bound, read model
    caught up), WATCHDOG=1 from this event loop while it runs, STOPPING=1 at stop."""
    notifier = notifier or Notifier.from_env()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    node = ApiNode(config)
    await node.start()
    _tune_gc()
    metrics_at = f", metrics on http://{_host(config.metrics_listen or '')}:{node.metrics_port}"
    tls = "TLS" if config.tls_cert else "plaintext"
    print(
        f"vim-api serving {tls} on {node.address}{metrics_at if node.metrics_port else ''}",
        flush=True,
    )
    pings = asyncio.create_task(keep_pinging(notifier))
    notifier.ready(f"serving on {node.address}")
    try:
        await stop_requested.wait()
    finally:
        notifier.stopping()
        pings.cancel()
        await node.stop()


GC_THRESHOLDS = (700, 10, 100)
"""Young collections as often as Python's default; full ones 10x rarer (see `_tune_gc`)."""


def _tune_gc() -> None:
    """Once the node serves: everything allocated so far (modules, the replayed read
    model) moves to the collector's permanent generation, never walked again, and
    full collections come every 1 000 young ones instead of 100.

    What sets a node's pauses (measured with `gc.callbacks` under `bench.api
    --quick`): every gRPC call leaves a reference cycle of its own (grpc.aio's
    `_find_method_handler` closure and its call details, 5 objects), so young
    collections always have garbage to free, and their pause grows with the
    threshold: 0.3 ms median, 6 ms at most at the default 700 net allocations,
    12-47 ms at 20 000 (the setting before). Full collections walk everything not
    frozen, which grows with the read model: 24-92 ms each, a few per minute at
    the default. The collector's total time is the same either way (~0.5 % of the
    node's CPU); only the pauses differ, and at 500 allocations/s one pause of
    40 ms delays 20 calls, enough to set the p99 by itself (p99 19-32 ms with these
    thresholds against 42-46 ms with the old ones, in alternating runs). Cycles
    among long-lived objects are still collected, only later."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `vim-api`: 0 after a clean shutdown, 1 when the node cannot start."""
    config, log_level = parse_args(argv)
    configure_logging(log_level)
    if config.worker_index is not None:
        from vim.api import workers

        # The supervisor speaks to systemd for the node; a worker must not (its pid is
        # not the unit's main pid, and its READY=1 would not mean the node serves).
        os.environ.pop("NOTIFY_SOCKET", None)
        workers.die_with_supervisor()
        structlog.contextvars.bind_contextvars(worker=config.worker_index)
    if config.workers > 1:
        from vim.api import workers

        return workers.supervise(config, list(sys.argv[1:] if argv is None else argv))
    try:
        run_event_loop(serve(config), config.event_loop)
    except (OSError, ValueError, VimError) as exc:
        logger.error("api node failed to start", error=str(exc), kind=type(exc).__name__)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
