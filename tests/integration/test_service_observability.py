"""Every control-plane service, as the real process systemd would run: sd_notify and metrics.

Each of `vim-api`, `vim-scheduler`, `vim-sdn` and `vim-faultd` runs as a child
process on a SQLite event log (elected services with the in-process elector,
so each leads at once) with `NOTIFY_SOCKET` pointing at a datagram socket of
this test, which receives with `SO_PASSCRED`: every notification must come from
the unit's main process (`NotifyAccess=main`), READY=1 first and then
WATCHDOG=1 pings at the period `WATCHDOG_USEC` asks for. The metrics endpoint
given by `--metrics-listen 127.0.0.1:0` (port in `--metrics-port-file`) is
scraped and parsed with prometheus_client's parser. SIGTERM stops each one
gracefully (exit 0, STOPPING=1). A node with `--workers 2` speaks to systemd
through its supervisor only.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from vim.eventlog import migrating

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SECRET = "s" * 40
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Note:
    pid: int
    text: str


class NotifySocket:
    """systemd's side of sd_notify: a datagram socket that knows who sent what."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.notes: list[Note] = []

    def receive(self, timeout_s: float) -> None:
        self.sock.settimeout(timeout_s)
        try:
            data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:12])[0]
        self.notes.append(Note(pid, data.decode()))

    def wait_for(self, what: str, done: object, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():  # type: ignore[operator]
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what}: {self.notes!r}")
            self.receive(min(left, 0.5))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def _argv(service: str, tmp: Path) -> list[str]:
    log = ["--eventlog-url", f"sqlite:///{tmp}/log.db"]
    metrics = ["--metrics-listen", "127.0.0.1:0", "--metrics-port-file", str(tmp / "m.port")]
    if service.startswith("api"):
        workers = "2" if service == "api-workers" else "1"
        return [
            *("-m", "vim.api.server", "--listen", "127.0.0.1:0", "--insecure"),
            *("--port-file", str(tmp / "api.port"), "--workers", workers, "--grace", "0.5"),
            *log,
            *metrics,
        ]
    module = {"scheduler": "vim.scheduler.service", "sdn": "vim.sdn.service"}.get(
        service, "vim.faultd.cli"
    )
    return ["-m", module, *log, *metrics]


def _scrape(port: int) -> dict[str, float]:
    with _http.open(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        out.setdefault(f"family:{family.name}", 1.0)
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def _wait(what: str, check: object, timeout_s: float = 20.0) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()  # type: ignore[operator]
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {value!r})")
        time.sleep(0.05)


STATS = {
    "scheduler": {"vim_scheduler_placed_total", "vim_scheduler_rounds_total"},
    "sdn": {"vim_sdn_written_total", "vim_sdn_terms_total", "vim_sdn_segment_clashes"},
    "faultd": {"vim_faultd_detected_total", "vim_faultd_evacuated_total"},
}


@pytest.mark.parametrize("service", ["api", "api-workers", "scheduler", "sdn", "faultd"])
def test_service_notifies_systemd_and_serves_metrics(
    service: str, tmp_path: Path, notify: NotifySocket
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIM_")}
    env |= {
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "600000",  # pings every 0.3 s
        "VIM_AUTH_SECRET": SECRET,
    }
    if service == "api-workers":
        # Workers racing to create a fresh SQLite log's tables is not this test's subject.
        migrating.upgrade(f"sqlite:///{tmp_path}/log.db")
    log = (tmp_path / "service.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, *_argv(service, tmp_path)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        notify.wait_for(
            "READY=1, then two WATCHDOG=1",
            lambda: (
                any(n.text.startswith("READY=1") for n in notify.notes)
                and sum(n.text == "WATCHDOG=1" for n in notify.notes) >= 2
            ),
        )
        texts = [n.text for n in notify.notes]
        assert texts[0].startswith("READY=1"), texts
        assert sum(t.startswith("READY=1") for t in texts) == 1, texts
        # NotifyAccess=main: nothing from a worker or any other process.
        assert {n.pid for n in notify.notes} == {proc.pid}, (proc.pid, notify.notes)

        port = int(str(_wait("the metrics port file", lambda: _read(tmp_path / "m.port"))))
        if service.startswith("api"):
            api_port = int(str(_read(tmp_path / "api.port")))
            with grpc.insecure_channel(f"127.0.0.1:{api_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            samples = _wait(  # type: ignore[assignment]
                "the health check counted",
                lambda: (s := _scrape(port)).get("vim_api_requests_total", 0) >= 1 and s,
            )
            assert "family:vim_api_request_seconds" in samples
        else:
            samples = _wait(  # type: ignore[assignment]
                "the leader gauge",
                lambda: (s := _scrape(port)).get(f"vim_{service}_is_leader") == 1.0 and s,
            )
            assert samples["vim_service_leader"] == 1.0
            assert samples["vim_service_up"] == 1.0
            assert samples[f"vim_{service}_build_info"] == 1.0
            assert samples[f"vim_{service}_term"] >= 1
            assert STATS[service] <= set(samples), sorted(samples)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
            raise
        finally:
            log.close()
    # SIGTERM (systemd's stop) is a graceful stop: exit 0, and STOPPING=1 said first.
    assert code == 0, (tmp_path / "service.log").read_text()[-3000:]
    notify.receive(0.5)
    assert any(n.text == "STOPPING=1" for n in notify.notes), notify.notes


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
