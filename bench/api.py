"""API benchmark: durably accepted AllocateCompute per second through real `vim-api` nodes.

Run ``python -m bench.api --quick`` (under 2 minutes) or ``python -m bench.api`` (a few
minutes). Method:

* One fresh PostgreSQL 15 server from ``vim.harness.postgres`` with durable settings
  (``fsync``, ``synchronous_commit``, ``full_page_writes`` on; checked with ``SHOW``),
  one migrated database, and ``vim-api`` node processes (``--insecure`` plaintext,
  random ports, metrics off) on that database: first one node, later three. The
  nodes run on vim-api's default event loop, uvloop (``--event-loop asyncio``
  compares); the load generators on asyncio.
* A public flavour and image are created first (admin). The measured operation is
  ``vim.v1.Compute/AllocateCompute`` (``--operation create_flavour`` measures the admin
  ``CreateFlavour`` instead). A response means the server's events are committed and
  flushed (accepted durably). Requests spread over 64 tenants (no quota set, so
  unlimited) so per-tenant quota streams do not serialise everything; a tenant always
  goes to the same node (tenant ``i`` to node ``i mod N``), as a client sticking to
  one endpoint would, so nodes do not fight over one tenant's quota stream.
* The load generator runs in separate processes (``multiprocessing``, spawn), with raw
  ``grpc.aio`` stubs, tokens minted up front and many calls in flight. Each generator
  reports its own CPU use (``generator_cpu_pct``, of one core) to show it is not the
  bottleneck; the nodes' and PostgreSQL's CPU use over the window come from ``/proc``.
* Closed loop: ``concurrency`` callers each send the next request when the previous one
  is answered. After a warm-up, only calls answered inside the measurement window
  count: rate, p50, p99 (client-side, from send to answer).
* Open loop (coordinated-omission-safe): requests are due at a fixed rate (500/s) on a
  schedule fixed in advance; the latency of each is measured from its *intended* send
  time, so a stalled server or generator is charged for the time a request waited to be
  sent. Every request due in the window counts; one that fails (times out, or is still
  queued when the generator gives up 12 s after the window) counts with the time until
  it failed, a lower bound. The achieved rate counts answers inside the window.
  A second open-loop run offers half the closed-loop rate just measured, to show the
  latency of a node that is not overloaded.
* Baseline in the same run, on the same node: the ``grpc.health.v1.Health/Check`` RPC
  (no auth, no log), closed loop and at 500/s; ratios are against it.
* Checks at the end: the log holds exactly one ``ServerAllocated`` per acknowledged
  allocation (when no call failed), and nothing failed.

``--profile`` runs node 1 under ``cProfile`` for one closed-loop allocation run (figures
then include profiling overhead) and prints the functions that take the most time.

Progress goes to stderr; the last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import psycopg

from bench._common import Window, emit_result, median, percentile, progress, ratio
from vim.harness.postgres import PostgresServer

Mode = Literal["closed", "open"]
OPERATIONS = ("allocate", "create_flavour", "health")
TENANTS = 64
DB = "bench_api"
SECRET = b"bench-api-token-secret-of-32-bytes-or-more"
CALL_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
DRAIN_S = CALL_TIMEOUT_S + 2.0
MAX_IN_FLIGHT = 4096
CONNECTIONS_PER_NODE = 8
"""Per generator and node; 64 tenants over them (a multiple of 8, so each gets 8)."""
OPEN_RATE = 500.0
TARGET_P99_MS_AT_500 = 25.0
TARGET_RPS_1NODE = 1500.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how hard; QUICK must finish in under 2 minutes on 2 cores."""

    rounds: int
    warmup_s: float
    measure_s: float
    open_s: float
    concurrency: int
    generators: int


QUICK = Settings(rounds=1, warmup_s=1.0, measure_s=4.0, open_s=6.0, concurrency=64, generators=1)
FULL = Settings(rounds=3, warmup_s=2.0, measure_s=10.0, open_s=20.0, concurrency=64, generators=1)


# -- the load generator (runs in child processes) ----------------------------------------


@dataclass(frozen=True, slots=True)
class Catalogue:
    """What an allocation refers to."""

    flavour_id: str = ""
    image_id: str = ""


@dataclass(frozen=True, slots=True)
class GenSpec:
    """One generator process's part of a run."""

    index: int
    generators: int
    operation: str
    mode: Mode
    addresses: tuple[str, ...]
    catalogue: Catalogue
    tag: str
    concurrency: int = 0
    """Closed loop: callers in all generators together."""
    rate: float = 0.0
    """Open loop: requests per second over all generators together."""


@dataclass(slots=True)
class GenResult:
    """What one generator measured; latencies in seconds."""

    latencies: list[float] = field(default_factory=list)
    """Closed: answered OK inside the window. Open: due inside the window and answered OK."""
    finished_in_window: int = 0
    """Answered OK inside the window (the achieved throughput, in both modes)."""
    failed_in_window: int = 0
    failed_latencies: list[float] = field(default_factory=list)
    """Open loop: from the intended send time to the failure (a lower bound of its latency)."""
    errors: dict[str, int] = field(default_factory=dict)
    first_error: dict[str, str] = field(default_factory=dict)
    """The details of the first error of each code."""
    ok_total: int = 0
    """Every OK answer, in the window or not (for the log check)."""
    sent: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    max_send_lag_ms: float = 0.0
    """Open loop: the most a request was sent after its intended time."""


Call = Callable[[int, int], Awaitable[Any]]
"""call(tenant, seq) -> awaitable response."""


def _tokens() -> list[tuple[tuple[str, str], ...]]:
    from vim.api.auth import Authenticator

    auth = Authenticator(SECRET)
    return [
        (("authorization", "Bearer " + auth.mint(f"u{t}", f"t{t:02d}", ["member"])),)
        for t in range(TENANTS)
    ]


def _make_call(spec: GenSpec, channels: Sequence[Any], timeout: float = CALL_TIMEOUT_S) -> Call:
    """The measured RPC, with its requests and metadata prepared as far as possible."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vim._gen.vim.v1 import compute_pb2, compute_pb2_grpc, flavours_pb2, flavours_pb2_grpc
    from vim.api.auth import Authenticator

    n = len(channels)
    prefix = f"{spec.tag}-{spec.index}-"
    if spec.operation == "health":
        health_stubs = [health_pb2_grpc.HealthStub(ch) for ch in channels]
        check = health_pb2.HealthCheckRequest()

        def health_call(tenant: int, seq: int) -> Any:
            return health_stubs[tenant % n].Check(check, timeout=timeout)

        return health_call
    if spec.operation == "create_flavour":
        admin = (("authorization", "Bearer " + Authenticator(SECRET).mint("b", "ops", ["admin"])),)
        flavour_stubs = [flavours_pb2_grpc.FlavoursStub(ch) for ch in channels]

        def flavour_call(tenant: int, seq: int) -> Any:
            rid = prefix + str(seq)
            req = flavours_pb2.CreateFlavourRequest(
                request_id=rid, name="f" + rid, vcpus=1, ram_mb=512, disk_gb=1, is_public=True
            )
            return flavour_stubs[tenant % n].CreateFlavour(req, metadata=admin, timeout=timeout)

        return flavour_call
    tokens = _tokens()
    compute_stubs = [compute_pb2_grpc.ComputeStub(ch) for ch in channels]
    flavour_id, image_id = spec.catalogue.flavour_id, spec.catalogue.image_id

    def allocate_call(tenant: int, seq: int) -> Any:
        req = compute_pb2.AllocateComputeRequest(
            request_id=prefix + str(seq), name="vm", flavour_id=flavour_id, image_id=image_id
        )
        return compute_stubs[tenant % n].AllocateCompute(
            req, metadata=tokens[tenant], timeout=timeout
        )

    return allocate_call


def _code(exc: BaseException, out: GenResult) -> str:
    """The status code name of a failed call; remembers the first details of each code."""
    name = type(exc).__name__
    code = getattr(exc, "code", None)
    if callable(code):
        with contextlib.suppress(Exception):
            name = str(code().name)
    if name not in out.first_error:
        details = getattr(exc, "details", None)
        out.first_error[name] = str(details() if callable(details) else exc)[:300]
    return name


async def _closed(spec: GenSpec, call: Call, window: Window, out: GenResult) -> None:
    """Callers of this generator: each sends its next request when the last is answered."""
    mine = [w for w in range(spec.concurrency) if w % spec.generators == spec.index]
    errors: Counter[str] = Counter()

    async def caller(worker: int) -> None:
        tenant = worker % TENANTS
        seq = worker
        clock = time.perf_counter
        while clock() < window.end:
            seq += spec.concurrency
            started = clock()
            try:
                await call(tenant, seq)
            except Exception as exc:  # counted, never raised: the run goes on
                errors[_code(exc, out)] += 1
                if window.start <= clock() <= window.end:
                    out.failed_in_window += 1
                continue
            finished = clock()
            out.ok_total += 1
            if window.start <= finished <= window.end:
                out.finished_in_window += 1
                out.latencies.append(finished - started)

    await asyncio.gather(*(caller(w) for w in mine))
    out.sent = out.ok_total + sum(errors.values())
    out.errors = dict(errors)


async def _open(spec: GenSpec, call: Call, window: Window, warmup_s: float, out: GenResult) -> None:
    """Requests due every 1/rate s (this generator takes every G-th), each timed from
    when it was due; runs from the warm-up start to the window end, then drains."""
    interval = spec.generators / spec.rate
    first = window.start - warmup_s + spec.index / spec.rate
    errors: Counter[str] = Counter()
    in_flight: set[asyncio.Task[None]] = set()
    slot = asyncio.Semaphore(MAX_IN_FLIGHT)
    clock = time.perf_counter

    async def one(seq: int, intended: float) -> None:
        try:
            await call(seq % TENANTS, seq)
        except Exception as exc:  # counted, never raised
            errors[_code(exc, out)] += 1
            if window.start <= intended < window.end:
                out.failed_in_window += 1
                out.failed_latencies.append(clock() - intended)
            return
        finally:
            slot.release()
        finished = clock()
        out.ok_total += 1
        if window.start <= finished <= window.end:
            out.finished_in_window += 1
        if window.start <= intended < window.end:
            out.latencies.append(finished - intended)

    seq = 0
    while True:
        intended = first + seq * interval
        if intended >= window.end:
            break
        now = clock()
        if intended > now:
            await asyncio.sleep(intended - now)  # pacing to the schedule, not synchronisation
        await slot.acquire()  # bounded in flight; a wait here is charged to the request
        out.max_send_lag_ms = max(out.max_send_lag_ms, (clock() - intended) * 1000)
        task = asyncio.create_task(one(seq * spec.generators + spec.index, intended))
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        seq += 1
    out.sent = seq
    if in_flight:
        await asyncio.wait(in_flight, timeout=DRAIN_S)
    out.errors = dict(errors)


async def _generate(spec: GenSpec, conn: Connection) -> None:
    import grpc

    # Several connections per node (own subchannel pools, so really separate TCP
    # connections): a node's workers share its port and the kernel spreads
    # connections, not calls. Channel j goes to node j mod N, so tenant t still always
    # goes to node t mod N.
    options = [("grpc.enable_retries", 0), ("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(a, options=options)
        for _ in range(CONNECTIONS_PER_NODE)
        for a in spec.addresses
    ]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), START_TIMEOUT_S)
        call = _make_call(spec, channels)
        conn.send("ready")
        start, end, warmup = conn.recv()
        window = Window(start, end)
        out = GenResult()
        now = time.perf_counter()
        if start - warmup > now:
            await asyncio.sleep(start - warmup - now)  # wait for the common start time
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if spec.mode == "closed":
            await _closed(spec, call, window, out)
        else:
            await _open(spec, call, window, warmup, out)
        out.cpu_s, out.wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
        conn.send(asdict(out))
    finally:
        for ch in channels:
            await ch.close(None)


def generator_main(spec: GenSpec, conn: Connection) -> None:
    """Entry point of a generator process (spawned)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    try:
        asyncio.run(_generate(spec, conn))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send({"fatal": repr(exc)})
        raise
    finally:
        conn.close()


# -- processes: PostgreSQL, nodes, generators ---------------------------------------------


def _cpu_ticks(pid: int) -> int:
    """utime + stime of one process, in clock ticks; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def _children(ppid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{name}/stat").read_text()
            if int(stat.rpartition(")")[2].split()[1]) == ppid:
                found.append(int(name))
    return found


@dataclass
class NodeProc:
    """One `vim-api` child process."""

    name: str
    workdir: Path
    url: str
    profile_to: Path | None = None
    workers: int = 1
    callgrind_to: Path | None = None
    """Run the node under `valgrind --tool=callgrind`, instrumentation off until asked."""
    event_loop: str = "uvloop"
    extra_args: tuple[str, ...] = ()
    """More `vim-api` flags (the gathering comparison's `--commit-gather-turns 0`)."""
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, secret_file: Path) -> None:
        port_file = self.workdir / f"{self.name}.port"
        argv = [sys.executable]
        timeout = START_TIMEOUT_S
        if self.callgrind_to is not None:
            argv = [
                *("valgrind", "--tool=callgrind", "--instr-atstart=no"),
                f"--callgrind-out-file={self.callgrind_to}",
                *argv,
            ]
            timeout = START_TIMEOUT_S * 10  # the interpreter runs ~10x slower under valgrind
        if self.profile_to is not None:
            argv += ["-m", "cProfile", "-o", str(self.profile_to)]
        argv += [
            *("-m", "vim.api.server", "--insecure", "--listen", "127.0.0.1:0"),
            *("--metrics-listen", "off", "--grace", "1", "--port-file", str(port_file)),
            *("--eventlog-url", self.url, "--auth-secret-file", str(secret_file)),
            *("--workers", str(self.workers), "--event-loop", self.event_loop),
            *self.extra_args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIM_")}
        with (self.workdir / f"{self.name}.log").open("ab") as sink:
            self.proc = subprocess.Popen(
                argv, cwd=self.workdir, stdout=sink, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / f"{self.name}.log").read_text(errors="replace")
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{log}")
            with contextlib.suppress(FileNotFoundError, ValueError):
                self.port = int(port_file.read_text().strip())
                if _serving(self.address):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not serve within {timeout} s")

    def cpu_ticks(self) -> int:
        """The node's CPU: its process and, with --workers, its worker processes."""
        if self.proc is None:
            return 0
        pid = self.proc.pid
        return _cpu_ticks(pid) + sum(_cpu_ticks(c) for c in _children(pid))

    def stop(self) -> None:
        """SIGTERM (a profiled node must write its profile), SIGKILL after a deadline."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)


def _serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


@dataclass
class Env:
    """The running system: PostgreSQL, nodes, and where their files live."""

    pg: PostgresServer
    workdir: Path
    url: str
    secret_file: Path
    workers: int = 1
    """Worker processes per node (`vim-api --workers`)."""
    event_loop: str = "uvloop"
    """The nodes' event loop (`vim-api --event-loop`)."""
    nodes: list[NodeProc] = field(default_factory=list)
    catalogue: Catalogue = Catalogue()
    acked_allocations: int = 0
    failures: int = 0
    """Failed calls in closed-loop runs (none expected)."""
    open_failures: int = 0
    """Failed calls in open-loop runs (expected only when the offered rate overloads)."""

    def add_node(
        self,
        profile_to: Path | None = None,
        callgrind_to: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> NodeProc:
        one = profile_to is not None or callgrind_to is not None
        workers = 1 if one else self.workers
        name = f"node{len(self.nodes) + 1}"
        node = NodeProc(
            name,
            self.workdir,
            self.url,
            profile_to,
            workers,
            callgrind_to,
            self.event_loop,
            extra_args,
        )
        self.nodes.append(node)
        node.start(self.secret_file)
        progress(f"{node.name} serving on {node.address}")
        return node

    def pg_ticks(self) -> int:
        pm = self.pg.postmaster_pid()
        if pm is None:
            return 0
        return _cpu_ticks(pm) + sum(_cpu_ticks(p) for p in _children(pm))


@dataclass(slots=True)
class Run:
    """One measured run: what was asked and what came back."""

    name: str
    operation: str
    mode: Mode
    nodes: int
    ops: int
    seconds: float
    per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    failed_in_window: int
    errors: dict[str, int]
    first_error: dict[str, str]
    generator_cpu_pct: float
    node_cpu_pct: float
    pg_cpu_pct: float
    offered_per_s: float = 0.0
    max_send_lag_ms: float = 0.0
    pg_waits: dict[str, int] = field(default_factory=dict)
    """Samples (every 50 ms) of active backends by wait event; 'CPU' means not waiting."""
    node_cpu_ms_per_op: float = 0.0
    """Node CPU (all its processes) per call answered in the window: the cost of one call."""
    pg_cpu_ms_per_op: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 3)
        return out


def _run_load(
    env: Env,
    nodes: Sequence[NodeProc],
    *,
    name: str,
    operation: str,
    mode: Mode,
    settings: Settings,
    measure_s: float,
    rate: float = 0.0,
) -> Run:
    """Spawn the generators, give them a common start, collect and summarise."""
    ctx = mp.get_context("spawn")
    gens = settings.generators
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    procs: list[tuple[Any, Connection]] = []
    try:
        for i in range(gens):
            parent, child = ctx.Pipe()
            spec = GenSpec(
                index=i,
                generators=gens,
                operation=operation,
                mode=mode,
                addresses=tuple(n.address for n in nodes),
                catalogue=env.catalogue,
                tag=tag,
                concurrency=settings.concurrency,
                rate=rate,
            )
            p = ctx.Process(target=generator_main, args=(spec, child), daemon=True)
            p.start()
            child.close()
            procs.append((p, parent))
        for p, conn in procs:
            if not conn.poll(START_TIMEOUT_S):
                raise RuntimeError(f"generator {p.pid} did not get ready")
            ready = conn.recv()
            if ready != "ready":
                raise RuntimeError(f"generator failed: {ready}")
        warmup = settings.warmup_s
        window = Window.after_warmup(warmup + 0.2, measure_s)
        for _, conn in procs:
            conn.send((window.start, window.end, warmup))
        _sleep_until(window.start)
        node_t0, pg_t0 = sum(n.cpu_ticks() for n in nodes), env.pg_ticks()
        waits = _sample_pg_waits(env.pg, window.end)
        node_t1, pg_t1 = sum(n.cpu_ticks() for n in nodes), env.pg_ticks()
        results = []
        for p, conn in procs:
            if not conn.poll(DRAIN_S + measure_s + 10):
                raise RuntimeError(f"generator {p.pid} did not report")
            got = conn.recv()
            if "fatal" in got:
                raise RuntimeError(f"generator failed: {got['fatal']}")
            results.append(GenResult(**got))
    finally:
        for p, conn in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
            conn.close()
    return _summarise(
        env,
        results,
        window,
        name=name,
        operation=operation,
        mode=mode,
        nodes=len(nodes),
        rate=rate,
        node_s=(node_t1 - node_t0) / CLK_TCK,
        pg_s=(pg_t1 - pg_t0) / CLK_TCK,
        pg_waits=waits,
    )


PG_WAITS_SQL = (
    "SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), count(*) "
    "FROM pg_stat_activity WHERE datname = %s AND state = 'active' AND pid <> pg_backend_pid() "
    "GROUP BY 1"
)


def _sample_pg_waits(pg: PostgresServer, until: float) -> dict[str, int]:
    """Sample what the active backends of the benchmark's database wait on, every 50 ms
    until `until` (perf_counter): how often each wait event (or 'CPU') was seen."""
    seen: Counter[str] = Counter()
    with psycopg.connect(pg.dsn(DB), autocommit=True, connect_timeout=10) as conn:
        for _ in range(100_000):
            if time.perf_counter() >= until:
                break
            for event, count in conn.execute(PG_WAITS_SQL, (DB,)).fetchall():
                seen[str(event)] += int(count)
            _sleep_until(min(until, time.perf_counter() + 0.05))
    return dict(seen.most_common(8))


def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)  # the parent only samples CPU counters at the window edges


def _summarise(
    env: Env,
    results: Sequence[GenResult],
    window: Window,
    *,
    name: str,
    operation: str,
    mode: Mode,
    nodes: int,
    rate: float,
    node_s: float,
    pg_s: float,
    pg_waits: dict[str, int],
) -> Run:
    latencies = [x for r in results for x in r.latencies]
    failed = sum(r.failed_in_window for r in results)
    errors: Counter[str] = Counter()
    first_error: dict[str, str] = {}
    for r in results:
        errors.update(r.errors)
        first_error = r.first_error | first_error
    if operation == "allocate":
        env.acked_allocations += sum(r.ok_total for r in results)
    if mode == "closed":
        env.failures += sum(errors.values())
    else:
        env.open_failures += sum(errors.values())
    # Open loop: a request due in the window that failed (it timed out, or was still
    # queued when the generator gave up) counts with the time until it failed, at least.
    failed_latencies = [x for r in results for x in r.failed_latencies]
    ranked = latencies + failed_latencies if mode == "open" else latencies
    secs = window.seconds
    run = Run(
        name=name,
        operation=operation,
        mode=mode,
        nodes=nodes,
        ops=len(latencies),
        seconds=secs,
        per_s=sum(r.finished_in_window for r in results) / secs,
        p50_ms=percentile(ranked, 50) * 1000,
        p99_ms=percentile(ranked, 99) * 1000,
        p999_ms=percentile(ranked, 99.9) * 1000,
        failed_in_window=failed,
        errors=dict(errors),
        first_error=first_error,
        generator_cpu_pct=median([100 * r.cpu_s / r.wall_s for r in results if r.wall_s > 0]),
        node_cpu_pct=100 * node_s / secs,
        pg_cpu_pct=100 * pg_s / secs,
        offered_per_s=rate,
        max_send_lag_ms=max((r.max_send_lag_ms for r in results), default=0.0),
        pg_waits=pg_waits,
    )
    done = sum(r.finished_in_window for r in results)
    run.node_cpu_ms_per_op = 1000 * node_s / done if done else 0.0
    run.pg_cpu_ms_per_op = 1000 * pg_s / done if done else 0.0
    progress(
        f"{name:<24} {run.per_s:8.1f}/s  p50 {run.p50_ms:7.2f} ms  p99 {run.p99_ms:7.2f} ms  "
        f"cpu/op: node {run.node_cpu_ms_per_op:.2f} ms pg {run.pg_cpu_ms_per_op:.2f} ms  "
        f"cpu: node {run.node_cpu_pct:5.1f}% pg {run.pg_cpu_pct:5.1f}% "
        f"gen {run.generator_cpu_pct:5.1f}%  errors {dict(errors) or 0}  pg waits {pg_waits}"
    )
    return run


# -- set-up ---------------------------------------------------------------------------------


def _server_facts(pg: PostgresServer) -> dict[str, str]:
    names = ("server_version", "fsync", "synchronous_commit", "full_page_writes")
    with psycopg.connect(pg.dsn(DB), autocommit=True, connect_timeout=10) as conn:
        facts = {n: str(conn.execute(f"SHOW {n}").fetchone()[0]) for n in names}  # type: ignore[index]
    if facts["fsync"] != "on" or facts["synchronous_commit"] != "on":
        raise RuntimeError(f"PostgreSQL is not durable, refusing to measure: {facts}")
    return facts


async def _create_catalogue(address: str) -> Catalogue:
    import grpc

    from vim._gen.vim.v1 import flavours_pb2, flavours_pb2_grpc, images_pb2, images_pb2_grpc
    from vim.api.auth import Authenticator

    admin = (("authorization", "Bearer " + Authenticator(SECRET).mint("b", "ops", ["admin"])),)
    async with grpc.aio.insecure_channel(address) as ch:
        flavour = await flavours_pb2_grpc.FlavoursStub(ch).CreateFlavour(
            flavours_pb2.CreateFlavourRequest(
                request_id="bench-f",
                name="bench.small",
                vcpus=1,
                ram_mb=512,
                disk_gb=1,
                is_public=True,
            ),
            metadata=admin,
            timeout=CALL_TIMEOUT_S,
        )
        image = await images_pb2_grpc.ImagesStub(ch).AddImage(
            images_pb2.AddImageRequest(
                request_id="bench-i",
                name="bench-image",
                disk_format=images_pb2.DISK_FORMAT_QCOW2,
                container_format=images_pb2.CONTAINER_FORMAT_BARE,
                size_bytes=1024,
                checksum="a" * 64,
                visibility=images_pb2.VISIBILITY_PUBLIC,
            ),
            metadata=admin,
            timeout=CALL_TIMEOUT_S,
        )
    return Catalogue(flavour.flavour_id, image.image_id)


async def _count_allocations(url: str) -> int:
    from vim.eventlog.sql import SqlEventLog

    log = await SqlEventLog.open(url, migrate=False)
    try:
        count, after = 0, 0
        for _ in range(10_000_000):
            batch = await log.read_all(after=after, limit=5000, types=["ServerAllocated"])
            if not batch:
                return count
            count += len(batch)
            after = batch[-1].position
    finally:
        await log.close()
    raise RuntimeError("the log did not end")


@contextlib.contextmanager
def _environment(workers: int, event_loop: str) -> Iterator[Env]:
    """PostgreSQL (durable) with a migrated database; everything is torn down on exit."""
    from vim.eventlog import migrating

    workdir = Path(tempfile.mkdtemp(prefix="vim-bench-api-"))
    pg = PostgresServer.start(fsync=True)
    env: Env | None = None
    try:
        pg.create_database(DB)
        url = pg.sqlalchemy_url(DB)
        migrating.upgrade(url)
        secret_file = workdir / "token.secret"
        secret_file.write_bytes(SECRET)
        secret_file.chmod(0o600)
        env = Env(pg, workdir, url, secret_file, workers, event_loop)
        yield env
    finally:
        if env is not None:
            for node in env.nodes:
                with contextlib.suppress(Exception):
                    node.kill()
        progress("stopping PostgreSQL")
        pg.cleanup()
        for child in sorted(workdir.iterdir(), reverse=True) if workdir.exists() else ():
            with contextlib.suppress(OSError):
                child.unlink()
        with contextlib.suppress(OSError):
            workdir.rmdir()


# -- the benchmark ------------------------------------------------------------------------


def _measure(
    env: Env, settings: Settings, operation: str, closed_only: bool = False
) -> dict[str, Any]:
    facts = _server_facts(env.pg)
    progress(f"PostgreSQL {facts['server_version']} on 127.0.0.1:{env.pg.port}: {facts}")
    n1 = env.add_node()
    env.catalogue = asyncio.run(_create_catalogue(n1.address))
    runs: dict[str, list[Run]] = {}

    def closed(nodes: Sequence[NodeProc], name: str, op: str) -> None:
        run = _run_load(
            env,
            nodes,
            name=name,
            operation=op,
            mode="closed",
            settings=settings,
            measure_s=settings.measure_s,
        )
        runs.setdefault(name, []).append(run)

    def paced(name: str, op: str, rate: float = OPEN_RATE) -> None:
        run = _run_load(
            env,
            [n1],
            name=name,
            operation=op,
            mode="open",
            settings=settings,
            measure_s=settings.open_s,
            rate=rate,
        )
        runs.setdefault(name, []).append(run)

    for r in range(settings.rounds):
        progress(f"round {r + 1}/{settings.rounds}: one node, closed loop")
        closed([n1], "health_1node", "health")
        closed([n1], "op_1node", operation)
    if closed_only:
        return _result(env, settings, operation, runs, facts)
    progress(f"one node, open loop at {OPEN_RATE:.0f}/s")
    paced("op_open", operation)
    paced("health_open", "health")
    # Latency when not overloaded: half the closed-loop capacity just measured.
    half = max(10.0, round(median([r.per_s for r in runs["op_1node"]]) / 2 / 10) * 10)
    progress(f"one node, open loop at {half:.0f}/s (half the closed-loop rate)")
    paced("op_open_half", operation, half)
    env.add_node()
    env.add_node()
    for r in range(settings.rounds):
        progress(f"round {r + 1}/{settings.rounds}: three nodes, closed loop")
        closed(env.nodes, "op_3nodes", operation)
    return _result(env, settings, operation, runs, facts)


def _compare_gathering(env: Env, settings: Settings, rounds: int) -> dict[str, Any]:
    """Closed-loop allocations on two nodes of the same log, one gathering before each
    write (the default) and one not (`--commit-gather-turns 0`), in alternating runs
    (the order flips every round, so neither always runs second): the ratio of each
    round's two rates, and PostgreSQL transactions per allocation."""
    on = env.add_node()
    off = env.add_node(extra_args=("--commit-gather-turns", "0"))
    env.catalogue = asyncio.run(_create_catalogue(on.address))
    runs: dict[str, list[Run]] = {"gather_on": [], "gather_off": []}
    commits: dict[str, list[float]] = {"gather_on": [], "gather_off": []}
    for r in range(rounds):
        progress(f"round {r + 1}/{rounds}: gathering on and off, closed loop")
        order = [("gather_on", on), ("gather_off", off)]
        for name, node in order if r % 2 == 0 else order[::-1]:
            before = _commits(env.pg)
            acked = env.acked_allocations
            run = _run_load(
                env,
                [node],
                name=name,
                operation="allocate",
                mode="closed",
                settings=settings,
                measure_s=settings.measure_s,
            )
            runs[name].append(run)
            done = env.acked_allocations - acked
            commits[name].append(round((_commits(env.pg) - before) / max(1, done), 3))
    ratios = [
        round(ratio(a.per_s, b.per_s), 3)
        for a, b in zip(runs["gather_on"], runs["gather_off"], strict=True)
    ]
    return {
        "gather_ratio_rps": median(ratios),
        "gather_ratios_per_round": ratios,
        "rps_gather_on": round(median([r.per_s for r in runs["gather_on"]]), 1),
        "rps_gather_off": round(median([r.per_s for r in runs["gather_off"]]), 1),
        "pg_transactions_per_allocation": {k: median(v) for k, v in commits.items()},
        "checks": {"no_failed_calls_closed_loop": env.failures == 0},
        "runs": {name: [r.to_json() for r in rs] for name, rs in runs.items()},
        "settings": asdict(settings),
        "cpus": os.cpu_count(),
    }


def _commits(pg: PostgresServer) -> int:
    """Transactions committed in the whole cluster so far: both nodes' writes, and
    their reads too (each statement outside a transaction commits one), such as the
    idle node's reads of the other's events; counted alike on both sides."""
    with psycopg.connect(pg.dsn(DB), autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SELECT sum(xact_commit) FROM pg_stat_database").fetchone()
    return int(row[0]) if row else 0


def _profile(env: Env, settings: Settings, operation: str, out: Path) -> dict[str, Any]:
    """One closed-loop run against a node under cProfile; the hottest functions."""
    n1 = env.add_node(profile_to=out)
    env.catalogue = asyncio.run(_create_catalogue(n1.address))
    run = _run_load(
        env,
        [n1],
        name="op_1node_profiled",
        operation=operation,
        mode="closed",
        settings=settings,
        measure_s=settings.measure_s,
    )
    n1.stop()
    stats = pstats.Stats(str(out), stream=sys.stderr)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    progress(f"profile written to {out}")
    return {"profiled_run": run.to_json(), "profile_file": str(out)}


CALLGRIND_CONCURRENCY = 16
CALLGRIND_WARMUP = 100
CALLGRIND_TIMEOUT_S = 300.0


async def _calls(address: str, catalogue: Catalogue, operation: str, n: int, tag: str) -> None:
    """`n` calls, `CALLGRIND_CONCURRENCY` in flight, over one connection; all must succeed."""
    import grpc

    spec = GenSpec(0, 1, operation, "closed", (address,), catalogue, tag)
    async with grpc.aio.insecure_channel(address) as ch:
        call = _make_call(spec, [ch], timeout=CALLGRIND_TIMEOUT_S)
        todo = iter(range(n))

        async def caller() -> None:
            for seq in todo:
                await call(seq % TENANTS, seq)

        await asyncio.gather(*(caller() for _ in range(CALLGRIND_CONCURRENCY)))


def _callgrind_total(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def _instructions(env: Env, n: int) -> dict[str, Any]:
    """Instructions the node executes per call (all its threads), counted by callgrind:
    independent of the machine's load, unlike CPU time. The node runs under valgrind
    with instrumentation off; after a warm-up, `callgrind_control` switches it on for
    `n` Health/Check calls, dumps, then for `n` AllocateCompute calls, and dumps."""
    out = env.workdir / "callgrind.out"
    node = env.add_node(callgrind_to=out)
    assert node.proc is not None
    env.catalogue = asyncio.run(_create_catalogue(node.address))
    pid = str(node.proc.pid)
    figures: dict[str, Any] = {"calls": n, "concurrency": CALLGRIND_CONCURRENCY}
    for operation in ("health", "allocate"):
        asyncio.run(_calls(node.address, env.catalogue, operation, CALLGRIND_WARMUP, "warm"))
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        started = time.perf_counter()
        asyncio.run(_calls(node.address, env.catalogue, operation, n, "measured"))
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        dumps = sorted(env.workdir.glob("callgrind.out.*"), key=lambda p: p.stat().st_mtime)
        per_call = _callgrind_total(dumps[-1]) / n
        figures[f"{operation}_instructions_per_call"] = round(per_call)
        progress(
            f"{operation}: {per_call / 1e6:.3f} M instructions per call "
            f"({n} calls, {time.perf_counter() - started:.0f} s under valgrind)"
        )
    figures["ratio_allocate_vs_health"] = round(
        figures["allocate_instructions_per_call"] / figures["health_instructions_per_call"], 2
    )
    node.kill()
    return figures


def _result(
    env: Env,
    settings: Settings,
    operation: str,
    runs: dict[str, list[Run]],
    facts: dict[str, str],
) -> dict[str, Any]:
    def med(name: str, attr: str) -> float:
        return median([getattr(r, attr) for r in runs.get(name, [])])

    rps_1, rps_3 = med("op_1node", "per_s"), med("op_3nodes", "per_s")
    health_rps = med("health_1node", "per_s")
    p99_500, health_p99_500 = med("op_open", "p99_ms"), med("health_open", "p99_ms")
    log_count = asyncio.run(_count_allocations(env.url)) if operation == "allocate" else None
    failed = env.failures + env.open_failures
    checks = {
        "no_failed_calls_closed_loop": env.failures == 0,
        # A failed call (client gave up) may or may not have been committed.
        "one_allocation_per_ack": (
            env.acked_allocations <= log_count <= env.acked_allocations + failed
            if log_count is not None
            else None
        ),
    }
    return {
        "operation": operation,
        "rps_1node": round(rps_1, 1),
        "rps_3nodes": round(rps_3, 1),
        "p50_ms_1node": round(med("op_1node", "p50_ms"), 3),
        "p99_ms_1node": round(med("op_1node", "p99_ms"), 3),
        "p50_ms_3nodes": round(med("op_3nodes", "p50_ms"), 3),
        "p99_ms_3nodes": round(med("op_3nodes", "p99_ms"), 3),
        "p99_ms_at_500rps": round(p99_500, 3),
        "p50_ms_at_500rps": round(med("op_open", "p50_ms"), 3),
        "achieved_rps_at_500": round(med("op_open", "per_s"), 1),
        "failed_at_500rps": sum(r.failed_in_window for r in runs.get("op_open", [])),
        "rps_half_capacity": med("op_open_half", "offered_per_s"),
        "p99_ms_at_half_capacity": round(med("op_open_half", "p99_ms"), 3),
        "p50_ms_at_half_capacity": round(med("op_open_half", "p50_ms"), 3),
        "baseline_health_rps": round(health_rps, 1),
        "baseline_health_p99_ms_at_500rps": round(health_p99_500, 3),
        "ratio_rps_vs_health": round(ratio(rps_1, health_rps), 4),
        "ratio_p99_at_500_vs_health": round(ratio(p99_500, health_p99_500), 2),
        "ratio_3nodes_vs_1node": round(ratio(rps_3, rps_1), 3),
        "targets": {
            "p99_ms_at_500rps<=25": bool(p99_500 <= TARGET_P99_MS_AT_500),
            "rps_1node>=1500": bool(rps_1 >= TARGET_RPS_1NODE),
        },
        "checks": checks,
        "acknowledged_allocations": env.acked_allocations,
        "failed_calls_open_loop": env.open_failures,
        "allocations_in_log": log_count,
        "runs": {name: [r.to_json() for r in rs] for name, rs in runs.items()},
        "settings": {**asdict(settings), "tenants": TENANTS, "open_rate": OPEN_RATE},
        "postgres": facts,
        "cpus": os.cpu_count(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.api", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="short run, under 2 minutes")
    parser.add_argument("--operation", choices=OPERATIONS[:2], default="allocate")
    parser.add_argument("--rounds", type=int, help="override the closed-loop rounds")
    parser.add_argument("--seconds", type=float, help="override the measured seconds per run")
    parser.add_argument("--concurrency", type=int, help="closed-loop callers in flight")
    parser.add_argument("--generators", type=int, help="load generator processes")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) - 1),
        help="worker processes per node, `vim-api --workers` (default as vim-api's on "
        "PostgreSQL: the cores but one, %(default)s)",
    )
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="the nodes' event loop, `vim-api --event-loop` (default %(default)s)",
    )
    parser.add_argument(
        "--callgrind",
        type=int,
        metavar="N",
        help="instead of timing: count the node's instructions per call with callgrind "
        "(N Health/Check, then N AllocateCompute calls; needs valgrind)",
    )
    parser.add_argument(
        "--compare-gather",
        action="store_true",
        help="only compare closed-loop allocations with and without gathering before "
        "each log write, in alternating runs (rounds: --rounds, default 4)",
    )
    parser.add_argument(
        "--closed-only",
        action="store_true",
        help="only the one-node closed-loop runs (allocation and health), for iterating",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        nargs="?",
        const=Path("bench-api.prof"),
        help="profile node 1 (cProfile) for one closed-loop run, write the stats here",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = replace(settings, rounds=max(1, min(args.rounds, 20)))
    if args.seconds is not None:
        settings = replace(settings, measure_s=max(1.0, min(args.seconds, 120.0)))
    if args.concurrency is not None:
        settings = replace(settings, concurrency=max(1, min(args.concurrency, 2048)))
    if args.generators is not None:
        settings = replace(settings, generators=max(1, min(args.generators, 16)))
    started = time.perf_counter()
    progress(f"API benchmark ({'quick' if args.quick else 'full'}): {settings}")
    try:
        with _environment(args.workers, args.event_loop) as env:
            if args.callgrind is not None:
                result = _instructions(env, max(10, min(args.callgrind, 100_000)))
                result["operation"] = "allocate"
            elif args.compare_gather:
                result = _compare_gathering(env, settings, args.rounds or 4)
                result["operation"] = "allocate"
            elif args.profile is not None:
                result = _profile(env, settings, args.operation, args.profile.resolve())
                result["operation"] = args.operation
            else:
                result = _measure(env, settings, args.operation, args.closed_only)
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    result["quick"] = bool(args.quick)
    result["workers"] = args.workers
    result["event_loop"] = args.event_loop
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    progress(f"done in {result['elapsed_s']} s")
    emit_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
