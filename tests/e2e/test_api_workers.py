"""`vim-api --workers 2` as real processes on a real PostgreSQL event log.

A node with two workers is one supervisor process and two `ApiNode` processes
sharing one port (SO_REUSEPORT). Each test starts its own node on its own
database (`pg_url`), waits with a deadline for the port file and health SERVING,
and talks to it over several separate TCP connections (a channel with its own
subchannel pool is its own connection; the kernel spreads connections, not
calls, over the workers).

What is checked:

* both workers serve: each has a listening socket on the node's port (the kernel
  spreads connections over them), a write through one connection is read through
  16 others when the reader passes `x-vim-min-position` (read-your-writes across
  workers), and the node's one metrics endpoint counts the calls of both;
* the port is the node's alone: a second node on it fails to start;
* SIGTERM drains every worker (each logs "api node stopped") and exits 0;
* a SIGKILLed worker is replaced and the node keeps serving;
* a SIGKILLed supervisor takes its workers with it (no orphan keeps the port).

Teardown SIGKILLs the supervisor and every worker still alive, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql

from tests.e2e.test_api_node import ADMIN_TOKEN, _until, node_env
from vim._gen.vim.v1 import flavours_pb2, flavours_pb2_grpc
from vim.harness.postgres import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DEADLINE_S = 30.0
WORKERS = 2
CONNECTIONS = 16
AUTH_MD = ("authorization", f"Bearer {ADMIN_TOKEN}")


@dataclass
class WorkerNode:
    proc: subprocess.Popen[bytes]
    url: str
    port: int
    metrics_port: int
    output: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")

    def workers(self) -> list[int]:
        """Pids of the supervisor's live (not zombie) children."""
        return [pid for pid in _children(self.proc.pid) if _alive(pid)]

    def connection(self) -> grpc.Channel:
        """A channel on a TCP connection of its own."""
        return grpc.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _children(ppid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields is not None and int(fields[1]) == ppid:
                found.append(int(name))
    return found


def _listening_sockets(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (state 0A in /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rpartition(":")[2], 16) == port and f[3] == "0A":
                    found.add(f[9])
    return found


def _sockets_of(pid: int) -> set[str]:
    """Inodes of the sockets process `pid` has open."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                found.add(target[8:-1])
    return found


def _ports(path: Path) -> list[int] | None:
    try:
        lines = path.read_text(encoding="utf-8").split()
    except FileNotFoundError:
        return None
    return [int(x) for x in lines] or None


def _serving(channel: grpc.Channel) -> bool | None:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    except grpc.RpcError:
        return None
    return reply.status == health_pb2.HealthCheckResponse.SERVING or None


def start(workdir: Path, url: str, *extra: str) -> WorkerNode:
    port_file, metrics_file = workdir / "api.port", workdir / "metrics.port"
    output = workdir / "vim-api.log"
    with output.open("wb") as sink:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "vim.api.server", "--insecure"),
                *("--listen", "127.0.0.1:0", "--workers", str(WORKERS), "--grace", "2"),
                *("--metrics-listen", "127.0.0.1:0", "--metrics-port-file", str(metrics_file)),
                *("--port-file", str(port_file), "--eventlog-url", url, *extra),
            ],
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=node_env(),
        )
    try:

        def ports(path: Path) -> list[int] | None:
            if proc.poll() is not None:
                pytest.fail(f"vim-api exited with {proc.returncode}:\n{output.read_text()}")
            return _ports(path)

        port = _until("the port file", lambda: ports(port_file), DEADLINE_S)[0]
        metrics = _until("the metrics port file", lambda: ports(metrics_file), DEADLINE_S)[0]
        node = WorkerNode(proc, url, port, metrics, output)
        with node.connection() as ch:
            _until("health SERVING", lambda: _serving(ch), DEADLINE_S)
    except BaseException:
        _kill(proc)
        raise
    return node


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the supervisor removes its files), SIGKILL if it lingers; then any
    worker left."""
    children = _children(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def node(tmp_path: Path, pg_url: str) -> Iterator[WorkerNode]:
    """A node of its own, for the tests that stop or kill it."""
    n = start(tmp_path, pg_url)
    try:
        yield n
    finally:
        _kill(n.proc)


@pytest.fixture(scope="module")
def shared(
    tmp_path_factory: pytest.TempPathFactory, pg_server: PostgresServer, pg_template: str
) -> Iterator[WorkerNode]:
    """One node for the tests that leave it as they found it (starting one costs seconds)."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(pg_template)
            )
        )
    n = start(tmp_path_factory.mktemp("workers"), pg_server.sqlalchemy_url(name))
    try:
        yield n
    finally:
        _kill(n.proc)
        pg_server.drop_database(name)


def _requests_counted(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        body = reply.read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith("vim_api_requests_total{"):
            total += float(line.rpartition(" ")[2])
    return total


def _create_flavour(channel: grpc.Channel, name: str) -> tuple[str, str]:
    """(flavour id, the x-vim-position of the answer)."""
    reply, call = flavours_pb2_grpc.FlavoursStub(channel).CreateFlavour.with_call(
        flavours_pb2.CreateFlavourRequest(
            request_id=f"rq-{name}", name=name, vcpus=1, ram_mb=512, disk_gb=1, is_public=True
        ),
        metadata=[AUTH_MD],
        timeout=DEADLINE_S,
    )
    position = dict(call.trailing_metadata())["x-vim-position"]
    return reply.flavour_id, str(position)


# -- tests ---------------------------------------------------------------------------


def test_both_workers_serve_one_port_with_read_your_writes(shared: WorkerNode) -> None:
    node = shared
    workers = node.workers()
    assert len(workers) == WORKERS, node.logs()
    listening = _listening_sockets(node.port)
    for pid in workers:
        assert _sockets_of(pid) & listening, f"worker {pid} does not listen on the port"
    assert not _sockets_of(node.proc.pid) & listening, "the supervisor must only hold the port"
    before = _requests_counted(node.metrics_port)
    with node.connection() as writer:
        flavour_id, position = _create_flavour(writer, "w.small")
    channels = [node.connection() for _ in range(CONNECTIONS)]
    try:
        for ch in channels:
            got = flavours_pb2_grpc.FlavoursStub(ch).GetFlavour(
                flavours_pb2.GetFlavourRequest(flavour_id=flavour_id),
                metadata=[AUTH_MD, ("x-vim-min-position", position)],
                timeout=DEADLINE_S,
            )
            assert got.name == "w.small"
    finally:
        for ch in channels:
            ch.close()
    # Summed over the workers, whichever of them answered.
    assert _requests_counted(node.metrics_port) - before == CONNECTIONS + 1


def test_second_node_on_the_port_of_a_worker_node_fails(shared: WorkerNode, tmp_path: Path) -> None:
    node = shared
    for workers in ("1", "2"):
        proc = subprocess.run(
            [
                *(sys.executable, "-m", "vim.api.server", "--listen", node.address),
                *("--metrics-listen", "off", "--eventlog-url", node.url, "--insecure"),
                *("--workers", workers),
            ],
            check=False,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
            env=node_env(),
        )
        assert proc.returncode == 1, proc.stderr
        assert "failed to start" in proc.stderr


def test_sigterm_drains_every_worker_and_exits_zero(node: WorkerNode) -> None:
    workers = node.workers()
    with node.connection() as ch:
        _create_flavour(ch, "before.stop")
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=DEADLINE_S) == 0, node.logs()
    logs = node.logs()
    assert logs.count('"api node stopped"') == WORKERS, logs
    assert '"api supervisor stopped"' in logs
    _until("the workers gone", lambda: not any(_alive(p) for p in workers) or None, DEADLINE_S)


def test_a_killed_worker_is_replaced_and_the_node_keeps_serving(node: WorkerNode) -> None:
    before = node.workers()
    os.kill(before[0], signal.SIGKILL)
    replaced = _until(
        "a new worker",
        lambda: w if len(w := node.workers()) == WORKERS and before[0] not in w else None,
        DEADLINE_S,
    )
    assert before[1] in replaced
    # Every connection is answered once the new worker serves (the dead one's socket
    # left the port's group with it, so no new connection is sent to it).
    _until(
        "the restart logged", lambda: node.logs().count('"api worker started"') > WORKERS or None
    )
    for i in range(CONNECTIONS):
        with node.connection() as ch:
            assert _until("SERVING", lambda ch=ch: _serving(ch), DEADLINE_S)
            _create_flavour(ch, f"after.kill.{i}")
    assert node.proc.poll() is None


def test_a_killed_supervisor_takes_its_workers(node: WorkerNode, tmp_path: Path) -> None:
    workers = node.workers()
    stale = list(Path(tempfile.gettempdir()).glob(f"vim-api-workers-{node.proc.pid}-*"))
    assert stale, "the supervisor keeps its files in a directory named by its pid"
    node.proc.kill()
    node.proc.wait()
    _until("the workers gone", lambda: not any(_alive(p) for p in workers) or None, DEADLINE_S)
    # Nothing holds the port any more: a new node can have it, and the new node's
    # supervisor removes the files the killed one left.
    again = tmp_path / "again"
    again.mkdir()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "vim.api.server", "--insecure", "--workers", str(WORKERS)),
            *("--listen", node.address, "--metrics-listen", "off"),
            *("--port-file", str(again / "port"), "--eventlog-url", node.url),
        ],
        cwd=again,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=node_env(),
    )
    try:
        _until("the port taken again", lambda: _ports(again / "port"), DEADLINE_S)
        assert proc.poll() is None
        assert not any(d.exists() for d in stale), "a dead supervisor's files were left"
    finally:
        _kill(proc)
