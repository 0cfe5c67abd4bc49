"""Namespace "power" for test hosts: a host is a network namespace; off = cut and killed.

The contract with whoever builds test hosts (the harness, `deploy/` for the
local cluster): a host's OOB endpoint is `netns://<namespace>`, and everything
the host runs (its agent, its hypervisor and domains, its switch) runs inside
that namespace. Then:

* `answers`: the namespace exists (the machine it lives on is the host's "BMC");
  a deleted namespace is a host that is gone, a hardware failure;
* `power_off`: every link in the namespace is set down (the host drops off the
  network at once), then every process in it is SIGKILLed, repeated until none
  is left or the deadline passes; confirmed only when none is left;
* `status`: OFF when no process runs in the namespace, ON otherwise, UNKNOWN
  when the namespace does not exist.

Processes are found as `ip netns pids` does: those whose `/proc/<pid>/ns/net`
is the namespace's inode. Killing needs root, like creating namespaces does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from pathlib import Path
from urllib.parse import urlsplit

from ha.fencing.base import FenceResult, FenceTarget, FencingUnsupported, PowerState

SCHEME = "netns"
NETNS_DIR = Path("/var/run/netns")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def namespace_of(endpoint: str) -> str:
    """The namespace named by a `netns://<name>` endpoint."""
    url = urlsplit(endpoint)
    name = url.netloc
    if url.scheme != SCHEME or not _NAME_RE.match(name):
        raise FencingUnsupported(f"not a netns endpoint: {endpoint!r}")
    return name


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def pids_in(namespace: str) -> list[int]:
    """Live processes whose network namespace is `namespace` (empty if it does not exist)."""
    want = _inode(NETNS_DIR / namespace)
    if want is None:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        if _inode(Path(entry.path) / "ns" / "net") == want:
            found.append(int(entry.name))
    return found


async def _ip(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


class NetnsPowerDriver:
    """Powers namespace hosts off. See the module docstring."""

    method = "netns-power"

    def __init__(self, *, deadline_s: float = 5.0, poll_interval_s: float = 0.05) -> None:
        self._deadline_s = deadline_s
        self._poll_s = poll_interval_s

    async def answers(self, target: FenceTarget) -> bool:
        return (NETNS_DIR / namespace_of(target.endpoint)).exists()

    async def status(self, target: FenceTarget) -> PowerState:
        ns = namespace_of(target.endpoint)
        if not (NETNS_DIR / ns).exists():
            return PowerState.UNKNOWN
        return PowerState.ON if pids_in(ns) else PowerState.OFF

    async def power_off(self, target: FenceTarget) -> FenceResult:
        ns = namespace_of(target.endpoint)
        if not (NETNS_DIR / ns).exists():
            return FenceResult(False, self.method, reason=f"namespace {ns} does not exist")
        cut = await self._links_down(ns)
        deadline = time.monotonic() + self._deadline_s
        killed: set[int] = set()
        while True:
            left = pids_in(ns)
            if not left:
                return FenceResult(
                    True, self.method, f"netns {ns}: {cut} links down, {len(killed)} killed"
                )
            if time.monotonic() > deadline:
                return FenceResult(
                    False, self.method, reason=f"netns {ns}: processes {left[:10]} survive SIGKILL"
                )
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            await asyncio.sleep(self._poll_s)

    async def _links_down(self, ns: str) -> int:
        code, out = await _ip("-n", ns, "-o", "link", "show")
        if code != 0:
            return 0
        names = [
            line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line
        ]
        for name in names:
            await _ip("-n", ns, "link", "set", "dev", name, "down")
        return len(names)
