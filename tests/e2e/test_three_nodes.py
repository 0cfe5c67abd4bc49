"""Three `vim-api` processes on one real PostgreSQL event log: the active/active shape.

A PostgreSQL server is started by the harness for this module (fsync off for speed,
``synchronous_commit`` on so that an acknowledged commit survives a crashed client
process). Each test gets its own migrated database and three node processes
(``python -m vim.api.server --insecure``, each with its own port file, the same
event log URL and token secret file), and waits with a deadline until every node's
health says SERVING.

What is checked:

* a write through node 1 is readable through node 2 at once when the reader passes
  node 1's ``x-vim-position`` as ``x-vim-min-position`` (read-your-writes), and a
  Watch on node 3 from position 0 delivers the events of those writes;
* a `VimClient` over all three endpoints runs a bounded load of AllocateCompute
  while the node it is using is SIGKILLed: no call fails, and the log holds exactly
  one ``ServerAllocated`` per request id (no duplicate effects of retries);
* the killed node, started again, replays the log and serves the same servers.

Teardown SIGKILLs every node process (and waits for it) and stops PostgreSQL, also
when a test fails.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vim._gen.vim.v1 import (
    common_pb2,
    compute_pb2,
    compute_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    flavours_pb2,
    flavours_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
)
from vim.api.auth import Authenticator
from vim.client import VimClient
from vim.eventlog import migrating
from vim.eventlog.sql import SqlEventLog
from vim.harness.postgres import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DEADLINE_S = 30.0
SECRET = b"three-nodes-secret-of-at-least-32-bytes"
AUTH = Authenticator(SECRET)
ADMIN_TOKEN = AUTH.mint("root", "ops", ["admin"])
POSITION_KEY = "x-vim-position"
MIN_POSITION_KEY = "x-vim-min-position"

LOAD_REQUESTS = 300
LOAD_TASKS = 8
LOAD_DEADLINE_S = 60.0
LOAD_TENANT = "load"

T = TypeVar("T")


def _bearer(token: str) -> tuple[str, str]:
    return ("authorization", f"Bearer {token}")


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


# -- processes ----------------------------------------------------------------------------


@dataclass
class NodeProcess:
    """One `vim-api` child process and how to reach it."""

    name: str
    workdir: Path
    url: str
    secret_file: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def start(self) -> None:
        """Spawn the node and return once its port file exists and health is SERVING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        port_file = self.workdir / f"{self.name}.{self.starts}.port"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIM_")}
        with self.log_path.open("ab") as sink:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "vim.api.server", "--insecure"),
                    *("--listen", "127.0.0.1:0", "--metrics-listen", "off", "--grace", "1"),
                    *("--port-file", str(port_file), "--eventlog-url", self.url),
                    *("--auth-secret-file", str(self.secret_file)),
                ],
                cwd=self.workdir,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.port = _until(f"{self.name}'s port file", lambda: self._read_port(port_file))
        with grpc.insecure_channel(self.address) as channel:
            _until(f"{self.name} health SERVING", lambda: self._serving(channel))

    def _read_port(self, path: Path) -> int | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}")
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text(encoding="utf-8").strip())
        return None

    def _serving(self, channel: grpc.Channel) -> bool | None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.logs()}")
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return None
        return reply.status == health_pb2.HealthCheckResponse.SERVING or None

    def kill(self) -> None:
        """SIGKILL and reap the child (waiting on it, never on `kill -0`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=DEADLINE_S)


@dataclass
class Cluster:
    """Three nodes on one event log database."""

    url: str
    nodes: list[NodeProcess] = field(default_factory=list)

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    server = PostgresServer.start(fsync=False, extra_conf={"synchronous_commit": "on"})
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def cluster(pg: PostgresServer, tmp_path: Path) -> Iterator[Cluster]:
    db = "three_" + uuid.uuid4().hex[:10]
    pg.create_database(db)
    url = pg.sqlalchemy_url(db)
    migrating.upgrade(url)  # once, before three nodes race to do it
    secret_file = tmp_path / "token.secret"
    secret_file.write_bytes(SECRET)
    secret_file.chmod(0o600)
    c = Cluster(url)
    try:
        for i in (1, 2, 3):
            node = NodeProcess(f"node{i}", tmp_path, url, secret_file)
            c.nodes.append(node)
            node.start()
        yield c
    finally:
        for node in c.nodes:
            with contextlib.suppress(Exception):
                node.kill()


# -- helpers ------------------------------------------------------------------------------


def _position(metadata: Any) -> int:
    for key, value in metadata or ():
        if key == POSITION_KEY:
            return int(value.decode() if isinstance(value, bytes) else value)
    raise AssertionError(f"no {POSITION_KEY} in {metadata!r}")


async def _call_with_position(call: Any) -> tuple[Any, int]:
    """Await a unary call; return the response and its trailing `x-vim-position`."""
    response = await call
    return response, _position(await call.trailing_metadata())


def _flavour_request(rid: str) -> flavours_pb2.CreateFlavourRequest:
    return flavours_pb2.CreateFlavourRequest(
        request_id=rid, name=f"m1.{rid}", vcpus=1, ram_mb=512, disk_gb=1, is_public=True
    )


def _image_request(rid: str) -> images_pb2.AddImageRequest:
    return images_pb2.AddImageRequest(
        request_id=rid,
        name=f"cirros-{rid}",
        disk_format=images_pb2.DISK_FORMAT_QCOW2,
        container_format=images_pb2.CONTAINER_FORMAT_BARE,
        size_bytes=1024,
        checksum="a" * 64,
        visibility=images_pb2.VISIBILITY_PUBLIC,
    )


async def _catalogue(address: str, rid: str) -> tuple[str, str, int]:
    """A public flavour and image (admin, through one node): their ids and the position."""
    admin = (_bearer(ADMIN_TOKEN),)
    async with grpc.aio.insecure_channel(address) as ch:
        flavour, _ = await _call_with_position(
            flavours_pb2_grpc.FlavoursStub(ch).CreateFlavour(
                _flavour_request(f"{rid}-f"), metadata=admin, timeout=DEADLINE_S
            )
        )
        image, position = await _call_with_position(
            images_pb2_grpc.ImagesStub(ch).AddImage(
                _image_request(f"{rid}-i"), metadata=admin, timeout=DEADLINE_S
            )
        )
    return flavour.flavour_id, image.image_id, position


async def _list_servers(
    stub: compute_pb2_grpc.ComputeAsyncStub, metadata: Sequence[tuple[str, str]]
) -> list[compute_pb2.Server]:
    """Every live server the caller sees, page by page (bounded)."""
    found: list[compute_pb2.Server] = []
    token = ""
    for _ in range(1000):
        page = await stub.ListServers(
            compute_pb2.ListServersRequest(
                page=common_pb2.PageRequest(page_size=1000, page_token=token)
            ),
            metadata=tuple(metadata),
            timeout=DEADLINE_S,
        )
        found.extend(page.servers)
        token = page.page.next_page_token
        if not token:
            return found
    raise AssertionError("ListServers did not end within 1000 pages")


async def _allocations_by_request(url: str) -> collections.Counter[str]:
    """`ServerAllocated` events in the log, counted by request id ("<tenant>:<id>")."""
    log = await SqlEventLog.open(url, migrate=False)
    counts: collections.Counter[str] = collections.Counter()
    try:
        after = 0
        for _ in range(100_000):
            batch = await log.read_all(after=after, limit=500, types=["ServerAllocated"])
            if not batch:
                return counts
            for event in batch:
                counts[event.metadata.request_id or ""] += 1
            after = batch[-1].position
    finally:
        await log.close()
    raise AssertionError("the log did not end")


# -- tests --------------------------------------------------------------------------------


async def test_write_on_one_node_read_on_another_watch_on_a_third(cluster: Cluster) -> None:
    n1, n2, n3 = cluster.nodes
    member = (_bearer(AUTH.mint("alice", "t1", ["member"])),)
    admin = (_bearer(ADMIN_TOKEN),)
    wanted: dict[str, str] = {}  # request id in the log -> event type its write makes

    async with (
        grpc.aio.insecure_channel(n1.address) as ch1,
        grpc.aio.insecure_channel(n2.address) as ch2,
        grpc.aio.insecure_channel(n3.address) as ch3,
    ):
        # Writes through node 1, each read back through node 2 at node 1's position.
        flavour, pos = await _call_with_position(
            flavours_pb2_grpc.FlavoursStub(ch1).CreateFlavour(
                _flavour_request("rw-f"), metadata=admin, timeout=DEADLINE_S
            )
        )
        wanted["ops:rw-f"] = "FlavorCreated"
        got = await flavours_pb2_grpc.FlavoursStub(ch2).GetFlavour(
            flavours_pb2.GetFlavourRequest(flavour_id=flavour.flavour_id),
            metadata=(*admin, (MIN_POSITION_KEY, str(pos))),
            timeout=DEADLINE_S,
        )
        assert got == flavour

        image, pos = await _call_with_position(
            images_pb2_grpc.ImagesStub(ch1).AddImage(
                _image_request("rw-i"), metadata=admin, timeout=DEADLINE_S
            )
        )
        wanted["ops:rw-i"] = "ImageAdded"
        got_image = await images_pb2_grpc.ImagesStub(ch2).GetImage(
            images_pb2.GetImageRequest(image_id=image.image_id),
            metadata=(*admin, (MIN_POSITION_KEY, str(pos))),
            timeout=DEADLINE_S,
        )
        assert got_image == image

        compute1, compute2 = compute_pb2_grpc.ComputeStub(ch1), compute_pb2_grpc.ComputeStub(ch2)
        made: list[compute_pb2.Server] = []
        for i in range(3):
            rid = f"rw-s{i}"
            server, pos = await _call_with_position(
                compute1.AllocateCompute(
                    compute_pb2.AllocateComputeRequest(
                        request_id=rid,
                        name=f"vm-{i}",
                        flavour_id=flavour.flavour_id,
                        image_id=image.image_id,
                    ),
                    metadata=member,
                    timeout=DEADLINE_S,
                )
            )
            assert server.state == compute_pb2.SERVER_STATE_BUILDING
            wanted[f"t1:{rid}"] = "ServerAllocated"
            made.append(server)
            seen = await compute2.GetServer(
                compute_pb2.GetServerRequest(server_id=server.server_id),
                metadata=(*member, (MIN_POSITION_KEY, str(pos))),
                timeout=DEADLINE_S,
            )
            assert seen == server
        listed = await _list_servers(compute2, (*member, (MIN_POSITION_KEY, str(pos))))
        assert sorted(s.server_id for s in listed) == sorted(s.server_id for s in made)

        # Node 3 streams the whole log from the start; it must include every write above.
        seen_types: dict[str, set[str]] = collections.defaultdict(set)
        last = 0
        watch = events_pb2_grpc.EventLogStub(ch3).Watch(
            events_pb2.WatchEventsRequest(from_position=0), metadata=admin, timeout=DEADLINE_S
        )
        try:
            async for event in watch:
                assert event.position > last, "Watch must deliver positions in order"
                last = event.position
                seen_types[event.metadata.request_id].add(event.type)
                if event.position >= pos:
                    break
        finally:
            watch.cancel()
    assert last == pos
    for rid, event_type in wanted.items():
        assert event_type in seen_types[rid], (rid, dict(seen_types))


@dataclass
class LoadRun:
    """What a bounded load with one node killed midway produced."""

    done: dict[str, str] = field(default_factory=dict)
    """Request id -> server id of every call that succeeded."""
    errors: list[BaseException] = field(default_factory=list)
    victim: NodeProcess | None = None
    done_at_kill: int = 0


async def _load_with_kill(
    cluster: Cluster, vim: VimClient, request_ids: Sequence[str], flavour_id: str, image_id: str
) -> LoadRun:
    """`LOAD_TASKS` workers allocate one server per request id through `vim`; once half
    are done, the node the client is currently sending to is SIGKILLed (and reaped)."""
    run = LoadRun()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for rid in request_ids:
        queue.put_nowait(rid)
    half = asyncio.Event()
    compute = vim.stub(compute_pb2_grpc.ComputeStub)

    async def worker() -> None:
        while not queue.empty():
            rid = queue.get_nowait()
            try:
                server = await compute.AllocateCompute(
                    compute_pb2.AllocateComputeRequest(
                        request_id=rid, name=rid, flavour_id=flavour_id, image_id=image_id
                    )
                )
            except Exception as exc:  # every failure fails the test (reported by the caller)
                run.errors.append(exc)
                continue
            run.done[rid] = server.server_id
            if len(run.done) >= len(request_ids) // 2:
                half.set()

    async def killer() -> None:
        await half.wait()
        # The node calls are going to right now: calls in flight there must fail over.
        run.victim = cluster.nodes[vim.channel.endpoints.current]
        run.done_at_kill = len(run.done)
        await asyncio.to_thread(run.victim.kill)

    kill_task = asyncio.create_task(killer())
    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(LOAD_TASKS))), LOAD_DEADLINE_S
        )
        await asyncio.wait_for(kill_task, DEADLINE_S)
    finally:
        kill_task.cancel()
    return run


async def test_failover_under_load_without_duplicates_then_restart(cluster: Cluster) -> None:
    flavour_id, image_id, pos = await _catalogue(cluster.nodes[0].address, "cat")
    token = AUTH.mint("loader", LOAD_TENANT, ["member"])
    request_ids = [f"load-{i:04d}" for i in range(LOAD_REQUESTS)]

    async with VimClient(
        cluster.addresses, token=token, timeout_s=10.0, retries=8, max_backoff_s=1.0
    ) as vim:
        vim.observe(pos)
        run = await _load_with_kill(cluster, vim, request_ids, flavour_id, image_id)
        assert not run.errors, f"{len(run.errors)} calls failed, first: {run.errors[0]!r}"
        victim = run.victim
        assert victim is not None and victim.proc is not None
        assert victim.proc.returncode is not None and victim.proc.returncode < 0
        assert run.done_at_kill < LOAD_REQUESTS, "the node was killed after the load"
        assert sorted(run.done) == request_ids
        assert len(set(run.done.values())) == LOAD_REQUESTS

        # Exactly one creation per request id in the log, and nothing else of this tenant.
        counts = await _allocations_by_request(cluster.url)
        ours = {rid: n for rid, n in counts.items() if rid.startswith(f"{LOAD_TENANT}:")}
        assert ours == {f"{LOAD_TENANT}:{rid}": 1 for rid in request_ids}
        listed = await _list_servers(vim.stub(compute_pb2_grpc.ComputeStub), ())
        assert len(listed) == LOAD_REQUESTS
        assert {s.server_id for s in listed} == set(run.done.values())
        position = vim.position

    # The killed node starts again, replays the log and serves the same data.
    await asyncio.to_thread(victim.start)
    member = (_bearer(token), (MIN_POSITION_KEY, str(position)))
    async with grpc.aio.insecure_channel(victim.address) as ch:
        stub = compute_pb2_grpc.ComputeStub(ch)
        again = await _list_servers(stub, member)
        by_id = {s.server_id: s for s in listed}
        assert sorted(s.server_id for s in again) == sorted(by_id)
        assert all(s == by_id[s.server_id] for s in again)
        # A repeat of a request through the restarted node returns the first answer.
        rid = request_ids[0]
        repeat = await stub.AllocateCompute(
            compute_pb2.AllocateComputeRequest(
                request_id=rid, name=rid, flavour_id=flavour_id, image_id=image_id
            ),
            metadata=member,
            timeout=DEADLINE_S,
        )
        assert repeat.server_id == run.done[rid]
    counts = await _allocations_by_request(cluster.url)
    assert counts[f"{LOAD_TENANT}:{rid}"] == 1
