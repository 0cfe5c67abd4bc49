"""A `vim-api` node as a child process, for tests, benchmarks and the local cluster.

    node = ApiNodeProcess("api-1", workdir, eventlog_url, secret_file)
    node.start()            # returns once health says SERVING
    node.address            # "127.0.0.1:PORT"
    node.kill()             # SIGKILL, reaped
    node.start()            # again, on a new free port

The node runs `python -m vim.api.server --insecure` on a free loopback port
(written to a port file, so there is no race for the port), with its output in
`workdir/NAME.log`. Waiting is always on a condition with a deadline, and a node
that exits while being waited for raises `ApiNodeFailed` with its log.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

T = TypeVar("T")


class ApiNodeFailed(RuntimeError):
    """The node exited or did not become SERVING in time."""


@dataclass
class ApiNodeProcess:
    name: str
    workdir: Path
    eventlog_url: str
    secret_file: Path
    extra_args: Sequence[str] = ()
    deadline_s: float = 30.0
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def logs(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Spawn the node; return once its port file exists and health is SERVING."""
        if self.proc is not None and self.proc.poll() is None:
            raise ApiNodeFailed(f"{self.name} is already running")
        self.starts += 1
        port_file = self.workdir / f"{self.name}.{self.starts}.port"
        port_file.unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIM_")} | self.env
        with self.log_path.open("ab") as sink:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "vim.api.server", "--insecure"),
                    *("--listen", "127.0.0.1:0", "--metrics-listen", "off", "--grace", "1"),
                    *("--port-file", str(port_file), "--eventlog-url", self.eventlog_url),
                    *("--auth-secret-file", str(self.secret_file)),
                    *self.extra_args,
                ],
                cwd=self.workdir,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.port = self._until("its port file", lambda: _read_int(port_file))
        with grpc.insecure_channel(self.address) as channel:
            self._until("health SERVING", lambda: _serving(channel))

    def _until(self, what: str, probe: Callable[[], T | None]) -> T:
        deadline = time.monotonic() + self.deadline_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ApiNodeFailed(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.logs()[-4000:]}"
                )
            value = probe()
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise ApiNodeFailed(f"{self.name}: no {what} within {self.deadline_s} s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL and reap the child (waiting on it, never on `kill -0`)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=self.deadline_s)

    def stop(self) -> None:
        """SIGTERM (graceful drain), then SIGKILL if it does not exit in time."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def _read_int(path: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return int(path.read_text(encoding="utf-8").strip())
    return None


def _serving(channel: grpc.Channel) -> bool | None:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
    except grpc.RpcError:
        return None
    return reply.status == health_pb2.HealthCheckResponse.SERVING or None
