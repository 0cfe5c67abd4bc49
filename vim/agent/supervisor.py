"""Supervision of the host's daemons (libvirtd, ovsdb-server, ovs-vswitchd).

Each `SupervisedService` names a pidfile, the command that (re)starts the
daemon (it detaches and writes the pidfile, as `ovs-vswitchd --detach` and
`libvirtd -d` do) and optionally a health probe (a command that exits 0 when
the daemon answers, e.g. `ovs-appctl -t CTL version` or `virsh -c URI version`).

Invariants:

* A service is healthy when the pidfile names a live process (present in
  /proc and not a zombie: a SIGKILLed daemon may wait for its reaper, and
  `kill -0` still succeeds on a zombie) and the probe, if any, passes within
  its timeout. Checks run every `interval_s` (0.2 s by default), so a death is
  seen within that plus one probe.
* On failure: `HostServiceFailed` is queued for the API at once, the daemon is
  restarted, and once healthy `HostServiceRecovered` (with the number of
  restarts it took) is queued: failed-then-recovered, in that order, per
  service. Reports go out from a queue so a slow or unreachable API never
  delays a restart; with the test daemons both are recorded well within 2 s.
* A restart that does not bring the service back is retried with exponential
  backoff (up to `max_backoff_s`); the failure is reported once per outage.
* `on_recovered(name)` runs after every recovery (the agent reconciles then:
  ovs-vswitchd loses its flows when it restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class ServiceReporter(Protocol):
    async def report_service(
        self, service: str, recovered: bool, detail: str, restarts: int
    ) -> None:
        """Record HostServiceFailed (recovered False) or HostServiceRecovered."""


@dataclass(frozen=True, slots=True)
class SupervisedService:
    name: str
    """A `vim.domain.faults.HostService` value: libvirtd, ovs-vswitchd, ovsdb-server."""
    pidfile: Path
    start: Sequence[str]
    probe: Sequence[str] = ()
    probe_timeout_s: float = 1.0
    ready_timeout_s: float = 10.0


@dataclass(slots=True)
class ServiceState:
    healthy: bool = True
    failures: int = 0
    restarts: int = 0
    """Restarts in the current outage."""
    total_restarts: int = 0
    last_detail: str = ""
    history: list[str] = field(default_factory=list)


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def process_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    # The state follows the command name in parentheses, which may contain spaces.
    state = stat.rpartition(")")[2].split()
    return bool(state) and state[0] not in ("Z", "X")


class Supervisor:
    """Watches services, restarts them, reports failures and recoveries; `run()` to `stop()`."""

    def __init__(
        self,
        services: Sequence[SupervisedService],
        reporter: ServiceReporter,
        *,
        interval_s: float = 0.2,
        max_backoff_s: float = 5.0,
        on_recovered: Callable[[str], None] | None = None,
    ) -> None:
        self.services = list(services)
        self.states = {s.name: ServiceState() for s in self.services}
        self._reporter = reporter
        self._interval_s = interval_s
        self._max_backoff_s = max_backoff_s
        self._on_recovered = on_recovered
        self._reports: asyncio.Queue[tuple[str, bool, str, int]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def run(self) -> None:
        """Supervise every service until cancelled or `stop()`."""
        self._tasks = [asyncio.create_task(self._send_reports(), name="supervisor reports")]
        self._tasks += [
            asyncio.create_task(self._watch(s), name=f"supervise {s.name}") for s in self.services
        ]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.stop()

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def healthy(self, service: SupervisedService) -> tuple[bool, str]:
        """(healthy, why not) for one service."""
        pid = read_pid(service.pidfile)
        if pid is None:
            return False, f"no pid in {service.pidfile}"
        if not process_alive(pid):
            return False, f"process {pid} is gone"
        if service.probe and not await _run(service.probe, service.probe_timeout_s):
            return False, f"health probe {' '.join(service.probe[:2])} failed"
        return True, ""

    async def _watch(self, service: SupervisedService) -> None:
        state = self.states[service.name]
        while True:
            ok, detail = await self.healthy(service)
            if not ok and _alive(service):
                # A live process failing its probe once may only be slow: ask again.
                await asyncio.sleep(self._interval_s)
                ok, detail = await self.healthy(service)
            if not ok:
                await self._recover(service, state, detail)
            await asyncio.sleep(self._interval_s)

    async def _recover(self, service: SupervisedService, state: ServiceState, detail: str) -> None:
        state.healthy = False
        state.failures += 1
        state.restarts = 0
        state.last_detail = detail
        state.history.append(f"failed: {detail}")
        log.error("%s failed: %s; restarting", service.name, detail)
        self._reports.put_nowait((service.name, False, detail, 0))
        backoff = self._interval_s
        while True:
            state.restarts += 1
            state.total_restarts += 1
            # A hung daemon still holds its pidfile: a new one would refuse to start.
            await _kill_hung(service)
            started = await _run(service.start, service.ready_timeout_s)
            if started and await self._wait_healthy(service):
                break
            if (await self.healthy(service))[0]:
                break  # it came back by itself (or the start raced with it)
            log.warning("%s did not come back (restart %d)", service.name, state.restarts)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
        state.healthy = True
        state.history.append(f"recovered after {state.restarts} restart(s)")
        log.info("%s recovered after %d restart(s)", service.name, state.restarts)
        self._reports.put_nowait((service.name, True, "", state.restarts))
        if self._on_recovered is not None:
            self._on_recovered(service.name)

    async def _wait_healthy(self, service: SupervisedService) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + service.ready_timeout_s
        while loop.time() < deadline:
            ok, _ = await self.healthy(service)
            if ok:
                return True
            await asyncio.sleep(0.05)
        return False

    async def _send_reports(self) -> None:
        while True:
            name, recovered, detail, restarts = await self._reports.get()
            for attempt in range(1, 6):
                try:
                    await self._reporter.report_service(name, recovered, detail, restarts)
                    break
                except Exception as exc:
                    log.warning("report of %s (attempt %d) failed: %r", name, attempt, exc)
                    await asyncio.sleep(min(0.2 * 2**attempt, 5.0))


def _alive(service: SupervisedService) -> bool:
    pid = read_pid(service.pidfile)
    return pid is not None and process_alive(pid)


async def _kill_hung(service: SupervisedService, within_s: float = 5.0) -> None:
    """SIGKILL the pidfile's process if it is still alive, and wait until it is gone."""
    pid = read_pid(service.pidfile)
    if pid is None or not process_alive(pid):
        return
    log.warning(
        "%s (pid %d) is alive but unhealthy: killing it before the restart", service.name, pid
    )
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while process_alive(pid) and loop.time() < deadline:  # noqa: ASYNC110 (no event for a death)
        await asyncio.sleep(0.02)  # poll interval of a wait with a deadline


async def _run(argv: Sequence[str], timeout_s: float) -> bool:
    """Run a command to completion; True if it exited 0 within the timeout."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ},
        )
    except OSError as exc:
        log.warning("cannot run %s: %s", argv[0], exc)
        return False
    try:
        async with asyncio.timeout(timeout_s):
            return await proc.wait() == 0
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False
