"""`vim-api` as a real process on a SQLite event log, driven over real gRPC and HTTP.

Each test starts its own node (`--listen 127.0.0.1:0`, ports read from port files)
on its own log file, waits with a deadline until health says SERVING, and talks
to it with the synchronous gRPC client. Events are appended by this process
through `SqlEventLog` on the same file, as another writer of the log would.

Every RPC needs a bearer token: `Node.channel()` adds an admin token to each
call (`channel(token=None)` sends none). The nodes here serve plaintext
(`--insecure`); `test_tls.py` covers TLS. `start_node` is shared with the other
subprocess tests (`test_tls.py`, `test_grpcurl.py`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from vim._gen.vim.v1 import events_pb2, events_pb2_grpc
from vim.api.auth import Authenticator
from vim.eventlog.model import (
    ANY_VERSION,
    NO_STREAM,
    AppendRequest,
    AppendResult,
    Metadata,
    NewEvent,
    StreamAppend,
)
from vim.eventlog.sql import SqlEventLog

DEADLINE_S = 20.0
SECRET = "e2e-secret-of-at-least-32-bytes!!"
AUTH = Authenticator(SECRET.encode())
ADMIN_TOKEN = AUTH.mint("root", "ops", ["admin"])
T = TypeVar("T")


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds `authorization: Bearer <token>` to every call of a synchronous channel."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), self._md))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)


def _until(what: str, probe: Callable[[], T | None], deadline_s: float = DEADLINE_S) -> T:
    """Poll `probe` until it returns a value; fail with `what` once the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.05)


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    metrics_port: int
    output: Path
    credentials: grpc.ChannelCredentials | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, token: str | None = ADMIN_TOKEN) -> grpc.Channel:
        """A channel to the node (TLS if it has credentials) whose calls carry `token`."""
        if self.credentials is None:
            channel = grpc.insecure_channel(self.address)
        else:
            channel = grpc.secure_channel(self.address, self.credentials)
        return channel if token is None else grpc.intercept_channel(channel, _Bearer(token))

    def logs(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")


def _read_port(path: Path, proc: subprocess.Popen[bytes], output: Path) -> int | None:
    if proc.poll() is not None:
        pytest.fail(f"vim-api exited with {proc.returncode}:\n{output.read_text()}")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return int(text) if text else None


def _health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def _serving(channel: grpc.Channel) -> bool | None:
    try:
        return _health(channel) == health_pb2.HealthCheckResponse.SERVING or None
    except grpc.RpcError:
        return None


def node_env(**extra: str) -> dict[str, str]:
    """This environment without any VIM_* setting, plus the token secret and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIM_")}
    return {**env, "VIM_AUTH_SECRET": SECRET, **extra}


def start_node(
    workdir: Path,
    *args: str,
    credentials: grpc.ChannelCredentials | None = None,
) -> Node:
    """Start `python -m vim.api.server` and wait until it reports SERVING.

    `args` default to `--insecure`; pass TLS flags (and the `credentials` to
    probe health with) for a TLS node.
    """
    url = f"sqlite:///{workdir / 'eventlog.db'}"
    port_file, metrics_file = workdir / "api.port", workdir / "metrics.port"
    output = workdir / "vim-api.log"
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "vim.api.server", "--listen", "127.0.0.1:0"),
                *("--metrics-listen", "127.0.0.1:0", "--grace", "2"),
                *("--port-file", str(port_file), "--metrics-port-file", str(metrics_file)),
                *("--eventlog-url", url),
                *(args or ("--insecure",)),
            ],
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=node_env(),
        )
    port = _until("the port file", lambda: _read_port(port_file, proc, output))
    metrics_port = _until("the metrics port file", lambda: _read_port(metrics_file, proc, output))
    node = Node(proc, url, port, metrics_port, output, credentials)
    with node.channel() as channel:
        _until("health SERVING", lambda: _serving(channel))
    return node


def stop_node(n: Node) -> None:
    """SIGTERM, then SIGKILL if it has not exited within the deadline."""
    if n.proc.poll() is None:
        n.proc.send_signal(signal.SIGTERM)
        try:
            n.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            n.proc.kill()
            n.proc.wait()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = start_node(tmp_path)
    try:
        yield n
    finally:
        stop_node(n)


def append(url: str, *requests: AppendRequest) -> list[AppendResult]:
    """Append through the event log itself, as any other writer of the same file."""

    async def run() -> list[AppendResult]:
        log = await SqlEventLog.open(url)
        try:
            return [await log.append(r) for r in requests]
        finally:
            await log.close()

    return asyncio.run(run())


def probe_registered(*names: str, correlation_id: str = "corr-1") -> AppendRequest:
    return AppendRequest(
        streams=[
            StreamAppend(f"probe-{n}", NO_STREAM, [NewEvent("ProbeRegistered", {"hostname": n})])
            for n in names
        ],
        metadata=Metadata(actor="e2e", correlation_id=correlation_id),
    )


def one(
    stream_id: str, type_: str, data: dict[str, object], tenant: str | None = None
) -> AppendRequest:
    return AppendRequest(
        streams=[StreamAppend(stream_id, ANY_VERSION, [NewEvent(type_, data)])],
        metadata=Metadata(tenant=tenant),
    )


def bad_request_fields(err: grpc.RpcError) -> list[str]:
    """Fields named by the google.rpc.BadRequest detail of a failed call."""
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


# -- tests ---------------------------------------------------------------------------


def test_health_reports_serving_for_node_and_each_service(node: Node) -> None:
    with node.channel() as channel:
        assert _health(channel, "") == health_pb2.HealthCheckResponse.SERVING
        assert _health(channel, "vim.v1.EventLog") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            _health(channel, "vim.v1.NoSuchService")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_calls_without_a_token_are_unauthenticated(node: Node) -> None:
    with node.channel(token=None) as channel:
        stub = events_pb2_grpc.EventLogStub(channel)
        for call in (
            lambda: stub.GetHead(events_pb2.GetHeadRequest(), timeout=DEADLINE_S),
            lambda: stub.ListEvents(events_pb2.ListEventsRequest(), timeout=DEADLINE_S),
            lambda: next(stub.Watch(events_pb2.WatchEventsRequest(), timeout=DEADLINE_S)),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        forged = Authenticator(b"x" * 32).mint("root", "ops", ["admin"])
        with node.channel(token=forged) as bad, pytest.raises(grpc.RpcError) as err:
            events_pb2_grpc.EventLogStub(bad).GetHead(events_pb2.GetHeadRequest())
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_reader_can_watch_and_list(node: Node) -> None:
    append(node.url, one("probe-cmp-01", "ProbeRegistered", {}, tenant="t1"))
    reader = AUTH.mint("rita", "t1", ["reader"])
    with node.channel(token=reader) as channel:
        stub = events_pb2_grpc.EventLogStub(channel)
        listed = stub.ListEvents(events_pb2.ListEventsRequest(), timeout=DEADLINE_S)
        assert [e.position for e in listed.events] == [1]
        watch = stub.Watch(events_pb2.WatchEventsRequest(), timeout=DEADLINE_S)
        assert next(watch).position == 1
        watch.cancel()


def test_a_non_admin_sees_only_its_own_tenants_events(node: Node) -> None:
    append(
        node.url,
        one("gadget-1", "GadgetRequested", {"n": 1}, tenant="t1"),
        one("gadget-2", "GadgetRequested", {"n": 2}, tenant="t2"),
        one("gadget-3", "GadgetRequested", {"n": 3}, tenant="t1"),
        one("probe-cmp-01", "ProbeRegistered", {}),  # no tenant: the operator's
    )
    member = AUTH.mint("tom", "t1", ["member"])
    with node.channel(token=member) as channel:
        stub = events_pb2_grpc.EventLogStub(channel)
        mine = stub.ListEvents(events_pb2.ListEventsRequest(), timeout=DEADLINE_S)
        assert [e.position for e in mine.events] == [1, 3]
        assert {e.metadata.tenant for e in mine.events} == {"t1"}
        assert mine.next.position == 4  # the scan still covered everything
        watch = stub.Watch(events_pb2.WatchEventsRequest(), timeout=DEADLINE_S)
        assert [next(watch).position for _ in range(2)] == [1, 3]
        watch.cancel()
    with node.channel() as channel:  # the admin sees every tenant's
        everything = events_pb2_grpc.EventLogStub(channel).ListEvents(
            events_pb2.ListEventsRequest(), timeout=DEADLINE_S
        )
        assert [e.position for e in everything.events] == [1, 2, 3, 4]


def test_watch_from_zero_receives_appended_events_in_order_then_follows(node: Node) -> None:
    first = append(
        node.url,
        probe_registered("cmp-01", "cmp-02", "cmp-03", correlation_id="corr-hosts"),
        one("gadget-7", "GadgetRequested", {"name": "vm-7", "vcpus": 2}),
    )
    assert [r.last_position for r in first] == [3, 4]
    with node.channel() as channel:
        stub = events_pb2_grpc.EventLogStub(channel)
        call = stub.Watch(events_pb2.WatchEventsRequest(from_position=0), timeout=DEADLINE_S)
        got = [next(call) for _ in range(4)]
        assert [e.position for e in got] == [1, 2, 3, 4]
        assert [e.stream_id for e in got] == [
            "probe-cmp-01",
            "probe-cmp-02",
            "probe-cmp-03",
            "gadget-7",
        ]
        assert [e.version for e in got] == [1, 1, 1, 1]
        assert got[0].type == "ProbeRegistered"
        assert dict(got[0].data) == {"hostname": "cmp-01"}
        assert got[0].metadata.correlation_id == "corr-hosts"
        assert got[0].metadata.actor == "e2e"
        assert got[0].schema_version == 1
        assert got[0].recorded_at.seconds > 0
        assert got[3].data["vcpus"] == 2

        # Live: an append made while the stream is open arrives next, in order.
        append(node.url, one("gadget-7", "GadgetScheduled", {"host": "cmp-02"}))
        live = next(call)
        assert (live.position, live.type, live.version) == (5, "GadgetScheduled", 2)
        call.cancel()


def test_watch_filters_by_type_and_stream_kind(node: Node) -> None:
    append(
        node.url,
        probe_registered("cmp-01"),
        one("gadget-1", "GadgetRequested", {}),
        one("gadget-1", "GadgetScheduled", {"host": "cmp-01"}),
        one("probe-cmp-01", "ProbeMaintenanceStarted", {}),
    )
    with node.channel() as channel:
        stub = events_pb2_grpc.EventLogStub(channel)
        gadgets = stub.Watch(
            events_pb2.WatchEventsRequest(stream_kinds=["gadget"]), timeout=DEADLINE_S
        )
        assert [next(gadgets).position for _ in range(2)] == [2, 3]
        gadgets.cancel()
        typed = stub.Watch(
            events_pb2.WatchEventsRequest(from_position=1, types=["ProbeMaintenanceStarted"]),
            timeout=DEADLINE_S,
        )
        assert next(typed).position == 4
        typed.cancel()


def test_list_events_pages_by_position_and_get_head(node: Node) -> None:
    append(node.url, *(one(f"gadget-{i}", "GadgetRequested", {"i": i}) for i in range(7)))
    with node.channel() as channel:
        stub = events_pb2_grpc.EventLogStub(channel)
        assert stub.GetHead(events_pb2.GetHeadRequest()).head.position == 7
        seen: list[int] = []
        after = 0
        while True:
            page = stub.ListEvents(events_pb2.ListEventsRequest(after=after, limit=3))
            seen += [e.position for e in page.events]
            after = page.next.position
            if after >= page.head.position:
                break
        assert seen == list(range(1, 8))
        none = stub.ListEvents(events_pb2.ListEventsRequest(types=["HostFenced"]))
        assert list(none.events) == []
        assert none.next.position == 7  # nothing matched, but the scan reached the head


def test_bad_input_is_invalid_argument_with_bad_request_details(node: Node) -> None:
    with node.channel() as channel:
        stub = events_pb2_grpc.EventLogStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListEvents(events_pb2.ListEventsRequest(limit=5000))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(err.value) == ["limit"]
        assert "limit" in (err.value.details() or "")

        with pytest.raises(grpc.RpcError) as err:
            stub.ListEvents(events_pb2.ListEventsRequest(types=["ok", "ProbeRegistered"]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(err.value) == ["types[0]"]

        watch = stub.Watch(
            events_pb2.WatchEventsRequest(
                stream_kinds=["probe", "Gadget-X"], from_position=2**64 - 1
            ),
            timeout=DEADLINE_S,
        )
        with pytest.raises(grpc.RpcError) as err:
            next(watch)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(err.value) == ["from_position", "stream_kinds[1]"]


def test_reflection_lists_event_log_health_and_reflection(node: Node) -> None:
    with node.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = list(stub.ServerReflectionInfo(iter([request]), timeout=DEADLINE_S))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"vim.v1.EventLog", "grpc.health.v1.Health"} <= names
        by_symbol = reflection_pb2.ServerReflectionRequest(file_containing_symbol="vim.v1.EventLog")
        reply = next(iter(stub.ServerReflectionInfo(iter([by_symbol]), timeout=DEADLINE_S)))
        assert reply.file_descriptor_response.file_descriptor_proto


def test_metrics_count_requests_by_method_and_code(node: Node) -> None:
    with node.channel() as channel:
        stub = events_pb2_grpc.EventLogStub(channel)
        stub.GetHead(events_pb2.GetHeadRequest())
        with pytest.raises(grpc.RpcError):
            stub.ListEvents(events_pb2.ListEventsRequest(limit=5000))
    url = f"http://127.0.0.1:{node.metrics_port}/metrics"
    method = "/vim.v1.EventLog"
    expected = [
        f'vim_api_requests_total{{code="OK",method="{method}/GetHead"}} 1.0',
        f'vim_api_requests_total{{code="INVALID_ARGUMENT",method="{method}/ListEvents"}} 1.0',
        f'vim_api_request_seconds_count{{method="{method}/GetHead"}} 1.0',
    ]
    # A call's status reaches the client just before the node counts it: poll briefly.
    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(url, timeout=5) as reply:
            body = reply.read().decode()
        missing = [line for line in expected if line not in body]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # poll interval of a wait with a deadline
    assert not missing, body


@pytest.fixture(params=["uvloop", "asyncio"])
def node_on_each_loop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Node]:
    n = start_node(tmp_path, "--insecure", "--event-loop", request.param)
    try:
        yield n
    finally:
        stop_node(n)


def test_sigterm_ends_watch_with_unavailable_and_exits_zero(node_on_each_loop: Node) -> None:
    """On either event loop (`--event-loop`): the signal handler, the drain, the exit."""
    node = node_on_each_loop
    append(node.url, probe_registered("cmp-01"))
    with node.channel() as channel:
        stub = events_pb2_grpc.EventLogStub(channel)
        call = stub.Watch(events_pb2.WatchEventsRequest(), timeout=DEADLINE_S)
        assert next(call).position == 1  # the stream is open on the server

        node.proc.send_signal(signal.SIGTERM)

        with pytest.raises(grpc.RpcError) as err:
            next(call)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "from position 1" in (err.value.details() or "")
    assert node.proc.wait(timeout=DEADLINE_S) == 0, node.logs()
    assert '"api node stopped"' in node.logs()


def test_an_unknown_event_loop_from_the_environment_is_refused(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vim.api.server", "--insecure", "--metrics-listen", "off"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=node_env(VIM_API_EVENT_LOOP="tokio"),
    )
    assert proc.returncode == 2
    assert "--event-loop must be one of uvloop, asyncio, got 'tokio'" in proc.stderr


def test_second_node_on_a_taken_port_fails_to_start(node: Node, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "vim.api.server", "--listen", node.address),
            *("--metrics-listen", "off", "--eventlog-url", node.url, "--insecure"),
        ],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=node_env(),
    )
    assert proc.returncode == 1
    assert "failed to start" in proc.stderr


def test_server_responses_are_built_as_json_format_would() -> None:
    """`compute._server` builds the Server message field by field (the allocation path
    is hot); it must give exactly what `json_format.ParseDict` gives for the view, and
    fall back to it for a view of another shape."""
    from google.protobuf import json_format

    from vim._gen.vim.v1 import compute_pb2
    from vim.api import compute
    from vim.domain import server

    def parsed(view: dict[str, Any]) -> compute_pb2.Server:
        return json_format.ParseDict(view, compute_pb2.Server(), ignore_unknown_fields=True)

    flavour = server.FlavorCopy("fl-1", "m1.big", 8, 1 << 33, 40)
    nics = [
        server.Nic("port-1", "net-1", "fa:16:3e:00:00:01", ("10.0.0.5", "fd00::5")),
        server.Nic("port-2", "net-2", "fa:16:3e:00:00:02", (), owned=False),
    ]
    full = server.evolve(
        None,
        server.allocate(
            "srv-1",
            "t1",
            "vm-ü",
            flavour,
            "img-1",
            nics,
            now="2026-11-22T08:00:00Z",
            affinity_group_id="grp-1",
            zone="az-1",
            metadata={"role": "upf", "": "empty key"},
            priority=900,
            watchdog=server.Watchdog.RESET,
            live_migration_allowed=False,
            max_interruption_ms=250,
        ),
    ).view()
    bare = server.evolve(
        None, server.allocate("srv-2", "t1", "vm", flavour, "img-1", [], now="x")
    ).view()
    for view in (full, bare):
        built = compute._server(view)
        assert built == parsed(view)
        assert built.SerializeToString(deterministic=True) == parsed(view).SerializeToString(
            deterministic=True
        )
    newer = {**full, "someFieldOfANewerNode": 1}
    assert compute._server(newer) == parsed(full)


def test_a_command_cancelled_while_it_waits_for_a_contended_stream_is_just_cancelled(
    tmp_path: Path,
) -> None:
    """A call whose deadline passes while it queues for a contended stream's lock (the
    CommandRunner serialises commands on a stream after a conflict) ends CANCELLED: it
    must not release a lock it never got, which raised RuntimeError, answered INTERNAL
    (seen under overload in the API benchmark) and freed another command's lock."""
    from vim.app.commands import Change, CommandContext, CommandRunner, Decision, Principal
    from vim.domain import flavor
    from vim.projections.readmodel import Projector, ReadModel, register_kind

    register_kind(flavor.KIND, flavor.evolve)
    stream = flavor.stream("f1")

    def stale(model: ReadModel) -> Decision:  # always decided at version 0: conflicts
        event = flavor.create([], "f1", "m1", 1, 512, 1, True, {}, "t")
        return Decision([Change(stream, 0, [event])], {})

    async def run() -> None:
        log = await SqlEventLog.open(f"sqlite:///{tmp_path}/log.db")
        projector = Projector(log)
        try:
            projector.start()
            runner = CommandRunner(log, projector.model)
            who = Principal("u", "t1", frozenset({"admin"}))
            await runner.run(CommandContext(who, "r0", "fp0"), stale)  # the stream is at 1
            held = runner._locks[stream] = _ObservedLock()
            await held.acquire()  # another command on the stream holds it
            held.queued.clear()
            task = asyncio.create_task(runner.run(CommandContext(who, "r1", "fp"), stale))
            # It gets its conflict, then queues for the lock.
            await asyncio.wait_for(held.queued.wait(), DEADLINE_S)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert held.locked(), "the cancelled command released a lock it did not hold"
        finally:
            await projector.stop()
            await log.close()

    asyncio.run(run())


class _ObservedLock(asyncio.Lock):
    """A lock that tells when someone starts acquiring it."""

    def __init__(self) -> None:
        super().__init__()
        self.queued = asyncio.Event()

    async def acquire(self) -> bool:
        self.queued.set()
        return await super().acquire()
