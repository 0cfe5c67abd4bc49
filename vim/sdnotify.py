"""systemd's notify protocol (sd_notify(3)), by hand: one datagram per state change.

`Notifier.from_env()` reads `$NOTIFY_SOCKET` (a path, or `@name` for the
abstract namespace) and `$WATCHDOG_USEC`; without them every call is a no-op,
so every service runs the same under systemd, in tests and by hand. Each
service sends `READY=1` once it does its job (the API node once its port is
bound and it serves; the scheduler, fault manager and SDN controller once their
read model has caught up and they campaign; the agent after its first reconcile
pass) and `WATCHDOG=1` from its event loop every `watchdog_interval_s` (half the
watchdog period), so a stuck loop stops pinging and systemd restarts it
(`deploy/systemd/*.service`, `WatchdogSec=`). Sending never raises and never
blocks (a full receiver queue drops the datagram): a lost notification must not
take a service down or stall its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify datagrams to one socket (or nowhere)."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sent = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET") or None
        try:
            usec = int(env.get("WATCHDOG_USEC", "0"))
        except ValueError:
            usec = 0
        pid = env.get("WATCHDOG_PID")
        if pid and pid != str(os.getpid()):
            usec = 0  # the watchdog is meant for another process
        return cls(address, max(usec, 0))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1 (half the period), or None without a watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; False if not sent."""
        if self.address is None:
            return False
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block: a receiver that stopped reading fills its queue, and a
                # blocking send would then stall the event loop that sends the pings.
                sock.setblocking(False)
                sock.sendto("\n".join(fields).encode(), target)
        except BlockingIOError:
            log.debug("sd_notify to %s dropped: its queue is full", self.address)
            return False
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")


async def keep_pinging(
    notifier: Notifier, interval_s: float | None = None, tick: Callable[[], None] | None = None
) -> None:
    """Send WATCHDOG=1 every `interval_s` (default: every second, or the notifier's
    interval when systemd asks for more often) until cancelled, calling `tick()`
    first each time (from this event loop: a metrics refresh that must not run on
    another thread). Run it as a task of the loop it vouches for: a loop that is
    stuck stops the pings."""
    every = interval_s or min(notifier.watchdog_interval_s or 1.0, 1.0)
    while True:
        if tick is not None:
            try:
                tick()
            except Exception:  # a broken refresh must not stop the pings
                log.exception("watchdog tick failed")
        notifier.watchdog()
        await asyncio.sleep(every)


def stop_on_signals(stop: Callable[[], Awaitable[None]]) -> None:
    """SIGTERM (systemd's stop) and SIGINT call `stop()` on the running loop, so a
    service ends its work and resigns its term instead of dying mid-append (a
    successor then need not wait for the lease to expire). Outside the main thread,
    where signals cannot be handled, this does nothing."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(stop()))
