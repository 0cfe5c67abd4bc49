"""`vim-api --workers N`: one node served by N processes sharing one port.

One Python process serves gRPC on one core (the GIL), so a node on a machine
with several cores runs several *workers*: each is a complete `ApiNode` (its own
event log pool, read model and projector, health and metrics) started as
`python -m vim.api.server ... --workers 1 --reuse-port`. The kernel spreads new
connections over the workers' listening sockets (SO_REUSEPORT). Correctness
never depends on node-local state: every decision is checked by the log, and
read-your-writes across workers works as across nodes (`x-vim-min-position`).

The supervisor (this module) does no gRPC and opens no event log. Invariants:

- The port is this node's alone. The supervisor first binds the address without
  SO_REUSEPORT (so a taken port fails as it does for a one-process node; port 0
  picks a free one), then holds it with a bound, non-listening SO_REUSEPORT
  socket for its whole life, so the workers can join the port but another node
  started later cannot bind it (its probe without SO_REUSEPORT fails).
- A worker never outlives its supervisor: workers get SIGKILL when it dies
  (`PR_SET_PDEATHSIG`, set by the worker itself first thing, `die_with_supervisor`),
  so a SIGKILLed node is gone at once, as a one-process one.
- `--port-file` is written once every worker serves. Metrics: the node keeps one
  scrape endpoint at `--metrics-listen` (and its port in `--metrics-port-file`),
  served by the supervisor from the workers' prometheus_client multiprocess files
  (`metrics.serve_workers`), so it counts every worker's calls. Health is per
  worker: a Check answers for the worker that got the connection, and all
  workers go NOT_SERVING together at shutdown.
- A worker that exits unexpectedly is started again (its state is all derived
  from the log); more than `MAX_RESTARTS` within `RESTART_WINDOW_S` stops the node
  with exit status 1.
- The supervisor's files (workers' port files, metrics) live in
  `$TMPDIR/vim-api-workers-<pid>-*`, removed when it exits; a supervisor that
  was SIGKILLed leaves its directory, which the next one started removes.
- SIGTERM or SIGINT: every worker gets SIGTERM and drains as a one-process node
  does; a worker still running `grace + STOP_MARGIN_S` later is SIGKILLed. Exit
  status 0 only if every worker exited 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from prometheus_client import multiprocess

from vim.api import metrics
from vim.api.server import ApiConfig, _host, _write_port_file
from vim.sdnotify import Notifier, keep_pinging

logger = structlog.get_logger("vim.api")

START_TIMEOUT_S = 120.0
STOP_MARGIN_S = 10.0
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
RESTART_DELAY_S = 0.5
PR_SET_PDEATHSIG = 1
SUPERVISOR_PID_ENV = "VIM_API_SUPERVISOR_PID"
TMP_PREFIX = "vim-api-workers-"


class _Stop(Exception):
    """The supervisor must stop all workers and exit with `status`."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass(slots=True)
class _Worker:
    index: int
    argv: list[str]
    port_file: Path
    proc: asyncio.subprocess.Process | None = None


@dataclass(slots=True)
class _Supervisor:
    config: ApiConfig
    argv: list[str]
    host: str
    port: int
    workdir: Path
    workers: list[_Worker] = field(default_factory=list)
    restarts: deque[float] = field(default_factory=deque)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    metrics_dir: Path | None = None
    """Where the workers write their metrics (prometheus_client multiprocess mode)."""
    endpoint: metrics.MetricsEndpoint | None = None
    notifier: Notifier = field(default_factory=Notifier.from_env)
    """systemd's notify socket: the supervisor is the unit's main process."""


def supervise(config: ApiConfig, argv: Sequence[str]) -> int:
    """Run the node as `config.workers` worker processes until SIGTERM/SIGINT; the
    exit status `vim-api` returns (1 when the port cannot be had or a worker cannot
    start)."""
    try:
        host, port, holders = reserve(config.listen)
    except OSError as exc:
        logger.error("api node failed to start", error=str(exc), kind=type(exc).__name__)
        return 1
    try:
        _sweep_stale(Path(tempfile.gettempdir()))
        with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
            sup = _Supervisor(config, list(argv), host, port, Path(tmp))
            if config.metrics_listen:
                sup.metrics_dir = sup.workdir / "metrics"
                sup.metrics_dir.mkdir()
                try:
                    sup.endpoint = metrics.serve_workers(sup.metrics_dir, config.metrics_listen)
                except OSError as exc:
                    logger.error("api node failed to start", error=f"metrics: {exc}")
                    return 1
            try:
                return asyncio.run(_run(sup))
            finally:
                if sup.endpoint is not None:
                    sup.endpoint.close()
    finally:
        for s in holders:
            s.close()


def _sweep_stale(tmp: Path) -> None:
    """Remove the directories of supervisors that died without cleaning up (SIGKILL):
    `TMP_PREFIX<pid>-*` whose process is gone."""
    for d in tmp.glob(f"{TMP_PREFIX}*-*"):
        pid = d.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(d, ignore_errors=True)


def reserve(listen: str) -> tuple[str, int, list[socket.socket]]:
    """(host, port, sockets holding it) for `listen`; see the module docstring."""
    host, _, port_text = listen.rpartition(":")
    bare = host.strip("[]") or "0.0.0.0"
    try:
        wanted = int(port_text)
    except ValueError:
        raise OSError(f"cannot listen on {listen}: not host:port") from None
    infos = socket.getaddrinfo(bare, wanted, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot listen on {listen}: no address")
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(addr)
        except OSError as exc:
            raise OSError(f"cannot listen on {listen}: {exc}") from exc
        port = int(probe.getsockname()[1])
    holders: list[socket.socket] = []
    try:
        for family, _, _, _, addr in infos:
            s = socket.socket(family, socket.SOCK_STREAM)
            holders.append(s)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((addr[0], port, *addr[2:]))
    except OSError as exc:
        for s in holders:
            s.close()
        raise OSError(f"cannot listen on {listen}: {exc}") from exc
    return host or "0.0.0.0", port, holders


def _worker_argv(sup: _Supervisor, index: int, port_file: Path) -> list[str]:
    """The node's own arguments, then the overrides that make it worker `index`
    (argparse keeps the last value of an option). A worker serves no metrics itself:
    it writes them for the supervisor's endpoint."""
    return [
        sys.executable,
        *("-m", "vim.api.server", *sup.argv),
        *("--listen", f"{sup.host}:{sup.port}", "--workers", "1", "--reuse-port"),
        *("--worker-index", str(index), "--port-file", str(port_file)),
        *("--metrics-listen", "off"),
    ]


def die_with_supervisor() -> None:
    """In a worker, first thing: SIGKILL when the supervisor dies (Linux), and exit
    now if it already has (it died before this ran: the worker was reparented).
    Done in the worker rather than between fork and exec, since the supervisor has
    threads (the metrics endpoint, the child watcher)."""
    expected = os.environ.get(SUPERVISOR_PID_ENV)
    if not expected:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(expected):
        os._exit(1)


async def _spawn(sup: _Supervisor, w: _Worker) -> None:
    w.port_file.unlink(missing_ok=True)
    env = dict(os.environ) | {SUPERVISOR_PID_ENV: str(os.getpid())}
    if sup.metrics_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(sup.metrics_dir)
    w.proc = await asyncio.create_subprocess_exec(
        *w.argv, stdin=asyncio.subprocess.DEVNULL, env=env
    )
    logger.info("api worker started", worker=w.index, pid=w.proc.pid)


async def _run(sup: _Supervisor) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sup.stopping.set)
    for i in range(sup.config.workers):
        port_file = sup.workdir / f"worker-{i}.port"
        sup.workers.append(_Worker(i, _worker_argv(sup, i, port_file), port_file))
    status = 0
    try:
        for w in sup.workers:
            await _spawn(sup, w)
        await _until_serving(sup)
        if sup.stopping.is_set():
            raise _Stop(0)
        _announce(sup)
        pings = asyncio.create_task(keep_pinging(sup.notifier))
        sup.notifier.ready(f"serving with {len(sup.workers)} workers")
        try:
            await _watch(sup)
        finally:
            pings.cancel()
    except _Stop as stop:
        status = stop.status
    finally:
        sup.notifier.stopping()
        status = max(status, await _stop_all(sup))
    logger.info("api supervisor stopped", status=status)
    return status


async def _until_serving(sup: _Supervisor) -> None:
    """Every worker has written its port file (it serves); a worker exiting first
    fails the start."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not sup.stopping.is_set():
        for w in sup.workers:
            if w.proc is not None and w.proc.returncode is not None:
                logger.error("api node failed to start", worker=w.index, status=w.proc.returncode)
                raise _Stop(1)
        if all(_port_of(w.port_file) for w in sup.workers):
            return
        if time.monotonic() > deadline:
            logger.error("api node failed to start", error="workers did not serve in time")
            raise _Stop(1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sup.stopping.wait(), 0.05)  # polling files, with a deadline


def _port_of(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def _announce(sup: _Supervisor) -> None:
    cfg = sup.config
    _write_port_file(cfg.port_file, sup.port)
    metrics_port = sup.endpoint.port if sup.endpoint else None
    _write_port_file(cfg.metrics_port_file, metrics_port)
    tls = "TLS" if cfg.tls_cert else "plaintext"
    at = f", metrics on http://{sup.endpoint.host}:{metrics_port}" if sup.endpoint else ""
    print(
        f"vim-api serving {tls} on {_host(cfg.listen)}:{sup.port} "
        f"with {len(sup.workers)} workers{at}",
        flush=True,
    )
    logger.info(
        "api node serving", port=sup.port, workers=len(sup.workers), metrics_port=metrics_port
    )


async def _watch(sup: _Supervisor) -> None:
    """Until asked to stop: start again any worker that exits."""
    while not sup.stopping.is_set():
        waits = {asyncio.ensure_future(w.proc.wait()): w for w in sup.workers if w.proc is not None}
        stop = asyncio.ensure_future(sup.stopping.wait())
        done, _ = await asyncio.wait([*waits, stop], return_when=asyncio.FIRST_COMPLETED)
        for task in [*waits, stop]:
            if task not in done:
                task.cancel()
        if sup.stopping.is_set():
            return
        for task in done:
            w = waits.get(task)
            if w is not None:
                await _restart(sup, w)


async def _restart(sup: _Supervisor, w: _Worker) -> None:
    status = w.proc.returncode if w.proc else None
    if w.proc is not None and sup.metrics_dir is not None:
        # Its live gauges (open streams) end with it; its counters still count.
        multiprocess.mark_process_dead(w.proc.pid, str(sup.metrics_dir))  # type: ignore[no-untyped-call]
    now = time.monotonic()
    while sup.restarts and now - sup.restarts[0] > RESTART_WINDOW_S:
        sup.restarts.popleft()
    if len(sup.restarts) >= MAX_RESTARTS:
        logger.error("api workers keep exiting: stopping the node", worker=w.index, status=status)
        raise _Stop(1)
    sup.restarts.append(now)
    logger.warning("api worker exited: starting it again", worker=w.index, status=status)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(sup.stopping.wait(), RESTART_DELAY_S)  # back-off, or stop
    if not sup.stopping.is_set():
        await _spawn(sup, w)


async def _stop_all(sup: _Supervisor) -> int:
    """SIGTERM every worker, SIGKILL those still running after the grace; the worst
    exit status (0 when all drained cleanly)."""
    running = [w.proc for w in sup.workers if w.proc is not None and w.proc.returncode is None]
    for p in running:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + sup.config.grace_s + STOP_MARGIN_S
    status = 0
    for p in running:
        try:
            code = await asyncio.wait_for(p.wait(), max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            code = await p.wait()
        status = max(status, 0 if code == 0 else 1)
    return status


if __name__ == "__main__":  # pragma: no cover - run through `vim-api --workers N`
    sys.exit("run `vim-api --workers N`")
