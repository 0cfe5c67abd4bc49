"""Shared low-level helpers of the test harness: free ports, polling, errors.

Role: the primitives that :mod:`vim.harness.postgres` and :mod:`vim.harness.etcd`
(and any future service launcher) build on. Nothing here is pytest-specific.

Invariants:

* Ports come from the kernel (bind to port 0), never from a fixed list, so
  harnesses never collide with fixed ports held by other processes.
  :func:`free_ports` keeps every probe socket open until all ``n`` ports are
  chosen, so the ports returned are pairwise distinct. A port is only *likely*
  free afterwards (another process may grab it before the service binds);
  launchers retry with fresh ports when the service reports "address in use".
* Nothing waits with a bare ``sleep``: :func:`wait_until` polls a predicate
  with a short interval up to a hard deadline and raises :class:`HarnessError`
  on timeout.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "HarnessError",
    "free_port",
    "free_ports",
    "is_listening",
    "log_tail",
    "wait_until",
]


class HarnessError(RuntimeError):
    """A harnessed service failed to start, stop or answer in time.

    The message includes the tail of the service's log when one exists.
    """


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``n`` distinct TCP ports on ``host`` that are free right now.

    All probe sockets stay bound until every port is chosen, so the kernel
    cannot hand out the same port twice.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """Return one TCP port on ``host`` that is free right now."""
    return free_ports(1, host)[0]


def is_listening(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except TimeoutError:
        # A loopback handshake that never completes means a wedged listener.
        return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], bool],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str = "condition",
    log: Path | None = None,
) -> None:
    """Poll ``predicate`` every ``interval`` seconds until it is true.

    Raises :class:`HarnessError` (with the tail of ``log`` if given) when
    ``timeout`` seconds pass first. The predicate is always evaluated once
    more at the deadline, so a slow last poll is not lost.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            msg = f"timed out after {timeout:.1f}s waiting for {what}"
            if log is not None:
                msg += "\n" + log_tail(log)
            raise HarnessError(msg)
        time.sleep(min(interval, remaining))


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of ``path``, framed for an error message."""
    text = ""
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="utf-8", errors="replace")
    tail = "\n".join(text.splitlines()[-lines:]) if text else "(empty or missing)"
    return f"--- last {lines} lines of {path} ---\n{tail}\n--- end of log ---"
