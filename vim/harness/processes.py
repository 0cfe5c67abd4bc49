"""A service process (e.g. ``vim-scheduler``) under a test's or benchmark's control.

Role: start a real console script as a child in its own session, collect its
output lines (stdout and stderr merged) in the background, wait for a line
matching a pattern with a deadline, and send it real signals (SIGKILL,
SIGSTOP, SIGCONT). Nothing here is pytest-specific.

Invariants:

* Output is read continuously, so a chatty child never blocks on a full pipe.
* Every line is kept (``lines``) with the ``time.monotonic()`` at which it was
  read; :meth:`ServiceProcess.wait_for` searches from a given index, so a caller
  can wait for "the next" matching line without racing earlier ones.
* :meth:`ServiceProcess.kill` is SIGKILL then a wait on the child (a stopped
  child is killed too); :meth:`ServiceProcess.close` is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Mapping, Sequence

from vim.harness.ports import HarnessError

__all__ = ["ServiceProcess"]

_KILL_TIMEOUT_S = 10.0


class ServiceProcess:
    """One child process and its output lines; build it with :meth:`start`."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self._proc = proc
        self.name = name
        self.lines: list[tuple[float, str]] = []
        """(monotonic time read, line) for every output line so far."""
        self._changed = asyncio.Condition()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(
        cls, argv: Sequence[str], *, name: str, env: Mapping[str, str] | None = None
    ) -> ServiceProcess:
        """Start ``argv`` with ``env`` added to our environment."""
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        return cls(proc, name)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped, else None."""
        return self._proc.returncode

    async def _read(self) -> None:
        assert self._proc.stdout is not None
        while raw := await self._proc.stdout.readline():
            async with self._changed:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    def count(self, pattern: str) -> int:
        """How many lines so far match ``pattern`` (a regular expression)."""
        rx = re.compile(pattern)
        return sum(1 for _, line in self.lines if rx.search(line))

    async def wait_for(
        self, pattern: str, within: float, *, after: int = 0
    ) -> tuple[int, float, re.Match[str]]:
        """The first line at index >= ``after`` matching ``pattern``: (index, time, match)."""
        rx = re.compile(pattern)
        i = after
        try:
            async with asyncio.timeout(within), self._changed:
                while True:
                    while i < len(self.lines):
                        at, line = self.lines[i]
                        if m := rx.search(line):
                            return i, at, m
                        i += 1
                    if self._reader.done():
                        raise HarnessError(f"{self.name} exited before printing {pattern!r}")
                    await self._changed.wait()
        except TimeoutError:
            tail = "\n".join(line for _, line in self.lines[-20:])
            raise HarnessError(
                f"{self.name} printed no {pattern!r} within {within}s; last lines:\n{tail}"
            ) from None

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the child (no-op once it has been reaped)."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    async def kill(self) -> None:
        """SIGKILL the child and reap it."""
        self.signal(signal.SIGKILL)
        try:
            async with asyncio.timeout(_KILL_TIMEOUT_S):
                await self._proc.wait()
        except TimeoutError:
            raise HarnessError(f"{self.name} did not die after SIGKILL") from None

    async def close(self) -> None:
        """Kill (if running), reap, and stop reading; idempotent."""
        await self.kill()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await self._reader
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    def tail(self, n: int = 30) -> str:
        """The last ``n`` lines, for failure messages."""
        return "\n".join(line for _, line in self.lines[-n:])
