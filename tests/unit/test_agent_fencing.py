"""The self-fencing watchdog thread and the sd_notify sender, with real threads and sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vim.agent.fencing import FenceWatchdog, destroy_on
from vim.agent.sdnotify import Notifier


class Fence:
    """Destroys `running` domains (3 at first); a test may 'start' more meanwhile."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls = 0
        self.fail_first = fail_first
        self.fired = threading.Event()
        self.thread: str | None = None
        self.running = 3

    def __call__(self) -> int:
        self.calls += 1
        self.thread = threading.current_thread().name
        if self.calls <= self.fail_first:
            raise RuntimeError("libvirtd is away")
        destroyed, self.running = self.running, 0
        self.fired.set()
        return destroyed


@pytest.fixture
def fence() -> Fence:
    return Fence()


@pytest.fixture
def watchdog(fence: Fence) -> Iterator[FenceWatchdog]:
    w = FenceWatchdog(0.3, fence, retry_s=0.05, recheck_s=0.05)
    w.start()
    yield w
    w.stop()


def test_not_armed_before_the_first_renewal(watchdog: FenceWatchdog, fence: Fence) -> None:
    assert not fence.fired.wait(0.5)
    assert watchdog.deadline is None and not watchdog.fenced


def test_renewals_keep_it_quiet(watchdog: FenceWatchdog, fence: Fence) -> None:
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        watchdog.renewed(time.monotonic())
        fence.fired.wait(0.05)  # the renewal cadence (a third of the TTL or less)
    assert fence.calls == 0


async def test_fences_while_the_event_loop_is_blocked(
    watchdog: FenceWatchdog, fence: Fence
) -> None:
    watchdog.renewed(time.monotonic())
    # A blocking call on the event loop: nothing async runs until it returns, yet
    # the watchdog thread must fence by itself once the TTL has passed.
    assert fence.fired.wait(10.0), "the watchdog did not fence while the loop was blocked"
    assert fence.thread == "vim-fence-watchdog"
    assert watchdog.fenced
    record = watchdog.pending()
    assert record is not None and record.domains_destroyed == 3
    assert record.lease_lost_at <= record.fenced_at
    # Still lapsed: it keeps looking, and a domain started meanwhile is destroyed too,
    # counted in the same record; it stays fenced until the fence was recorded.
    calls = fence.calls
    fence.fired.clear()
    fence.running = 1
    assert fence.fired.wait(10.0) and fence.calls > calls
    latest = watchdog.pending()
    assert latest is not None and latest.domains_destroyed == 4
    assert latest.lease_lost_at == record.lease_lost_at
    assert watchdog.fenced
    watchdog.acknowledge(latest)
    assert not watchdog.fenced and watchdog.pending() is None


def test_a_failed_fence_is_retried() -> None:
    fence = Fence(fail_first=2)
    w = FenceWatchdog(0.2, fence, retry_s=0.05, recheck_s=0.05)
    w.start()
    try:
        w.renewed(time.monotonic())
        assert fence.fired.wait(10.0)
        assert fence.calls == 3
    finally:
        w.stop()


def test_a_renewal_after_a_fence_rearms(watchdog: FenceWatchdog, fence: Fence) -> None:
    watchdog.renewed(time.monotonic())
    assert fence.fired.wait(10.0)
    first = watchdog.pending()
    assert first is not None
    watchdog.renewed(time.monotonic())  # the lease is proven again: quiet until the TTL
    calls = fence.calls
    fence.fired.clear()
    fence.running = 2
    assert fence.fired.wait(10.0)  # the next lapse fences again: a new record
    assert fence.calls > calls
    second = watchdog.pending()
    assert second is not None and second is not first
    assert second.lease_lost_at > first.lease_lost_at


def test_destroy_on_the_test_driver() -> None:
    libvirt = pytest.importorskip("libvirt")
    conn = libvirt.open("test:///default")
    try:
        xml = (
            "<domain type='test'><name>{}</name><memory>65536</memory>"
            "<os><type>hvm</type></os></domain>"
        )
        _ = [conn.createXML(xml.format(n), 0) for n in ("vim-fence-a", "vim-fence-b")]
        other = conn.createXML(xml.format("not-ours-fence"), 0)
        try:
            assert destroy_on(conn) == 2
            active = {
                d.name() for d in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            }
            assert "vim-fence-a" not in active and "vim-fence-b" not in active
            assert "not-ours-fence" in active
            assert destroy_on(conn) == 0  # nothing left: repeating is fine
        finally:
            other.destroy()
    finally:
        conn.close()


# --- sd_notify ------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5.0)
    yield sock, path
    sock.close()


def test_notify_ready_and_watchdog(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert n.watchdog_interval_s == 1.0
    assert n.ready("registered")
    assert sock.recv(4096) == b"READY=1\nSTATUS=registered"
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_abstract_socket() -> None:
    name = f"vim-test-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5.0)
    try:
        assert Notifier.from_env({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_notify_without_systemd_is_a_no_op(tmp_path: Path) -> None:
    n = Notifier.from_env({})
    assert not n.enabled and not n.ready() and n.watchdog_interval_s is None
    gone = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})
    assert not gone.ready()  # never raises
    other = Notifier.from_env({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval_s is None


def test_notify_never_blocks_on_a_full_queue(notify_socket: tuple[socket.socket, str]) -> None:
    """A receiver that stops reading must not stall the sender (the agent's event loop)."""
    _, path = notify_socket
    n = Notifier.from_env({"NOTIFY_SOCKET": path})
    started = time.monotonic()
    results = [n.watchdog() for _ in range(5000)]  # far beyond a datagram queue
    assert time.monotonic() - started < 30
    assert results[0] and not results[-1]  # the first went out, later ones were dropped
