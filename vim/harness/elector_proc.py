"""An `EtcdElector` in its own process, to be SIGKILLed, SIGSTOPped and SIGCONTed by tests.

Child (``python -m vim.harness.elector_proc --endpoints A,B --role R --prefix P
--name N [--ttl 2] [--no-death-signal]``): campaigns, and prints one JSON line
per state change on stdout, each stamped with ``time.monotonic()`` (the same
clock in every process of the machine, so a parent can compare it with its own):

* ``{"event": "leading", "token": T, "t": ..., "liveness": "host:port"}`` on a win;
* ``{"event": "lost", "token": T, "t": ...}`` when the term ends; it then campaigns again.

Parent (:class:`ElectorProcess`): starts the child in its own session, reads its
lines in the background, and sends it signals. Kills are SIGKILL followed by a
wait on the child (``kill -0`` answers for a while after a kill). ``close()``
kills and reaps it whatever state it is in (a stopped child is killed too);
it is idempotent.

:func:`established_connections` counts the established TCP connections accepted
on a local port (from ``/proc/net/tcp{,6}``): how a benchmark waits until the
waiting candidates are connected to a leader's liveness endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vim.harness.ports import HarnessError

__all__ = ["ElectorProcess", "established_connections"]

_ESTABLISHED = "01"
_REPO = Path(__file__).resolve().parents[2]


def established_connections(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (the accepting side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 3 and fields[3] == _ESTABLISHED:
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    count += local_port == port
    return count


class ElectorProcess:
    """A child process running one elector; see the module docstring."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self._proc = proc
        self.name = name
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.history: list[dict[str, Any]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def start(
        cls,
        endpoints: Sequence[str],
        role: str,
        prefix: str,
        name: str,
        *,
        ttl_s: int = 2,
        death_signal: bool = True,
        quiet: bool = False,
    ) -> ElectorProcess:
        """Start the child; it begins campaigning at once (``quiet``: drop its log)."""
        argv = [
            sys.executable,
            "-m",
            "vim.harness.elector_proc",
            "--endpoints",
            ",".join(endpoints),
            "--role",
            role,
            "--prefix",
            prefix,
            "--name",
            name,
            "--ttl",
            str(ttl_s),
        ]
        if not death_signal:
            argv.append("--no-death-signal")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL if quiet else None,
            cwd=_REPO,
            start_new_session=True,
        )
        return cls(proc, name)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    async def _read(self) -> None:
        assert self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                self.history.append(event)
                await self.events.put(event)

    async def until(self, kind: str, within: float) -> dict[str, Any]:
        """The next event of ``kind`` (earlier ones of other kinds are dropped)."""
        try:
            async with asyncio.timeout(within):
                while True:
                    event = await self.events.get()
                    if event.get("event") == kind:
                        return event
        except TimeoutError:
            raise HarnessError(
                f"elector {self.name} reported no {kind!r} within {within}s: {self.history}"
            ) from None

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the child (no-op once it has exited)."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    async def kill(self) -> None:
        """SIGKILL the child and reap it."""
        self.signal(signal.SIGKILL)
        try:
            async with asyncio.timeout(10):
                await self._proc.wait()
        except TimeoutError:
            raise HarnessError(f"elector {self.name} did not die after SIGKILL") from None

    async def close(self) -> None:
        """Kill (if still running), reap, and stop reading; idempotent."""
        await self.kill()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _emit(kind: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": kind, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


async def _run(args: argparse.Namespace) -> None:
    from ha.election import EtcdElector

    elector = EtcdElector(
        args.endpoints.split(","),
        args.role,
        args.name,
        ttl_s=args.ttl,
        prefix=args.prefix,
        death_signal=not args.no_death_signal,
    )
    try:
        while True:
            term = await elector.campaign()
            _emit("leading", token=term.token, liveness=elector.liveness_address)
            await elector.leader_lost.wait()
            _emit("lost", token=term.token)
    finally:
        await elector.close()


def main(argv: Sequence[str] | None = None) -> None:
    """The child's entry point."""
    p = argparse.ArgumentParser(prog="python -m vim.harness.elector_proc")
    p.add_argument("--endpoints", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--ttl", type=int, default=2)
    p.add_argument("--no-death-signal", action="store_true")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
