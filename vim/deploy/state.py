"""What a running local cluster leaves on disk, and how to stop one from another process.

``DIR/cluster.json`` lists every member (kind, name, pid, endpoint, metrics
endpoint, log file, namespace) plus the supervisor's pid, the lab's namespaces
and the PostgreSQL data directories. ``vim-cluster status`` and ``vim-cluster
down`` read only that file.

Invariants:

* The file is written atomically (temp file + rename), so a reader sees either
  the previous or the new complete state.
* :func:`teardown` first asks the supervisor (SIGTERM), which stops its members
  in order, then sweeps whatever is left: it SIGKILLs a recorded pid only while
  that pid still runs the recorded program (``/proc/PID/cmdline`` contains the
  member's ``match`` string), so a pid reused by an unrelated process is never
  touched; it stops PostgreSQL data dirs with ``pg_ctl stop -m immediate``,
  kills what runs inside the lab's namespaces and deletes them, and removes
  the harness's temporary directories (only names the harness makes:
  ``vim-pg-*``, ``vim-etcd-*``, ``vim-ovs-*``). It is idempotent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Member", "pid_alive", "read_state", "teardown", "write_state"]

STATE_FILE = "cluster.json"
STATE_VERSION = 1
NETNS_DIR = Path("/var/run/netns")
_SUPERVISOR_GRACE_S = 60.0
_KILL_WAIT_S = 10.0
# The harness directories a sweep may remove (never anything else).
_TEMP_PREFIXES = ("vim-pg-", "vim-pgs-", "vim-etcd-", "vim-ovs-")


@dataclass(frozen=True, slots=True)
class Member:
    """One process of the cluster, as recorded in ``cluster.json``."""

    kind: str
    """etcd, postgres, api, scheduler, faultd, sdn, agent, ovs."""
    name: str
    pid: int | None
    endpoint: str = ""
    """Where clients reach it (host:port, or a unix socket for ovs)."""
    metrics: str = ""
    """host:port of its Prometheus endpoint, or empty when it has none."""
    log: str = ""
    netns: str = ""
    """The namespace it runs in (agent hosts), empty for the root namespace."""
    match: str = ""
    """A string its /proc/PID/cmdline contains (guards against pid reuse)."""
    extra: dict[str, str] = field(default_factory=dict)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a reaped-late corpse is dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def write_state(directory: Path, data: dict[str, Any]) -> Path:
    """Write ``cluster.json`` atomically; return its path."""
    path = directory / STATE_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def members_json(members: list[Member]) -> list[dict[str, Any]]:
    return [asdict(m) for m in members]


def read_state(directory: Path) -> dict[str, Any]:
    """The parsed ``cluster.json``; FileNotFoundError / ValueError when absent or corrupt."""
    data = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(
            f"{directory / STATE_FILE}: not a cluster state of version {STATE_VERSION}"
        )
    return data


def recorded_members(data: dict[str, Any]) -> list[Member]:
    return [Member(**m) for m in data.get("members", [])]


def member_running(m: Member) -> bool:
    """The member's pid is alive and still runs the recorded program."""
    return m.pid is not None and pid_alive(m.pid) and (not m.match or m.match in _cmdline(m.pid))


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if pid_alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _ns_pids(ns: str) -> list[int]:
    try:
        inode = os.stat(NETNS_DIR / ns).st_ino
    except OSError:
        return []
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{name}/ns/net").st_ino == inode:
                    pids.append(int(name))
    return pids


def lab_namespaces(tag: str) -> list[str]:
    """Every namespace of the lab ``tag`` (``vim-<tag>-*``) that still exists."""
    if not tag or not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(f"vim-{tag}-"))


def teardown(directory: Path) -> list[str]:
    """Stop the cluster recorded in ``directory``; return what had to be swept by force."""
    data = read_state(directory)
    swept: list[str] = []
    supervisor = int(data.get("supervisor_pid") or 0)
    if supervisor and supervisor != os.getpid() and pid_alive(supervisor):
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGTERM)
        if _wait_gone([supervisor], _SUPERVISOR_GRACE_S):
            swept.append(f"supervisor {supervisor} (SIGKILL)")
            with contextlib.suppress(ProcessLookupError):
                os.kill(supervisor, signal.SIGKILL)
    left = [m for m in recorded_members(data) if m.kind != "postgres" and member_running(m)]
    for m in left:
        swept.append(f"{m.kind} {m.name} pid {m.pid}")
        _kill_tree(m.pid or 0)
    _wait_gone([m.pid for m in left if m.pid], _KILL_WAIT_S)
    for pg in data.get("postgres_dirs", []):
        data_dir = Path(pg) / "data"
        if (data_dir / "postmaster.pid").exists():
            swept.append(f"postgres {data_dir}")
            _pg_stop_immediate(data_dir, data.get("pg_bindir", ""))
    for ns in lab_namespaces(str(data.get("lab_tag") or "")):
        swept.append(f"netns {ns}")
        for pid in _ns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
    for d in data.get("temp_dirs", []):
        path = Path(d)
        if path.name.startswith(_TEMP_PREFIXES) and path.is_dir():
            swept.append(f"directory {path}")
            shutil.rmtree(path, ignore_errors=True)
    data["state"] = "stopped"
    data["supervisor_pid"] = 0
    write_state(directory, data)
    return swept


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and, when it leads its own process group (every service is started
    in a new session), the whole group: an API node's worker processes go with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


def _pg_stop_immediate(data_dir: Path, bindir: str) -> None:
    pg_ctl = str(Path(bindir) / "pg_ctl") if bindir else "pg_ctl"
    argv = [pg_ctl, "-D", str(data_dir), "-m", "immediate", "-w", "stop"]
    if os.geteuid() == 0:
        argv = ["runuser", "-u", "postgres", "--", *argv]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(argv, capture_output=True, timeout=30, check=False)
