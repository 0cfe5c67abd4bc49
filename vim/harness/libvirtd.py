"""Start a private, real libvirtd (+ virtlogd) for tests: QEMU domains under software emulation.

Role: one :class:`LibvirtDaemon` is a system-mode libvirtd that shares nothing
with any other libvirtd on the machine (another test's, or a system one)::

    with LibvirtDaemon.start() as daemon:
        driver = LibvirtDriver(daemon.uri, tmp_path)
        daemon.kill()      # SIGKILL libvirtd (virtlogd and QEMU guests survive)
        daemon.freeze()    # or SIGSTOP it (and thaw() to SIGCONT)
        daemon.restart()   # a new libvirtd on the same state: it finds the guests again

Invariants:

* Privacy without special builds: the daemons run as root in system mode, each in
  its own mount namespace (``unshare -m``) where ``/etc/libvirt``, ``/run/libvirt``,
  ``/var/lib/libvirt`` and ``/var/log/libvirt`` are bind mounts of directories under
  the daemon's own temp dir. Every start (and restart) mounts the same directories,
  so a restarted libvirtd sees the state and the QEMU processes of the killed one.
  Only ``/var/cache/libvirt`` (QEMU capabilities, ~5 s to probe) is a persistent
  directory shared between runs (:func:`cache_root`); libvirt rewrites it atomically.
* Clients reach the daemon at :attr:`LibvirtDaemon.uri`
  (``qemu+unix:///system?socket=DIR/run/libvirt-sock``).
* The private ``qemu.conf`` runs QEMU as root with no security driver and no cgroups
  (none usable here), so guests can read kernels and write console logs anywhere.
* libvirtd and virtlogd are children of this process (``unshare`` and the mount
  script exec into them, so the child's pid is the daemon's). Kills are SIGKILL
  then ``wait()``. :meth:`LibvirtDaemon.stop` SIGKILLs every QEMU the daemon started
  (found by its pid files, checked against ``/proc/PID/cmdline``), then both daemons,
  and removes the temp dir; it is idempotent and also runs at interpreter exit.
* Readiness: the socket accepts a libvirt connection that answers ``getVersion``.
  Failures raise :class:`~vim.harness.ports.HarnessError` with the log's tail.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import libvirt

from vim.harness.ports import HarnessError, log_tail, wait_until

__all__ = ["LibvirtDaemon", "cache_root"]

_READY_TIMEOUT = 60.0
_KILL_TIMEOUT = 10.0
_MOUNTS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "log": "/var/log/libvirt",
}

_LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:stderr"
"""
_QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
security_driver = "none"
cgroup_controllers = [ ]
"""

_live: set[LibvirtDaemon] = set()


def cache_root() -> Path:
    """Persistent cache for test artefacts: ``$VIM_TEST_CACHE`` or ``/var/cache/vim-test``."""
    return Path(os.environ.get("VIM_TEST_CACHE", "/var/cache/vim-test"))


def _require(binary: str) -> str:
    found = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if not found:
        raise HarnessError(f"{binary} not found (install libvirt-daemon-system)")
    return found


class LibvirtDaemon:
    """A private libvirtd + virtlogd pair. Build it with :meth:`start`."""

    def __init__(self, root: Path, cache_dir: Path) -> None:
        """Low-level constructor; it does not start anything. Use :meth:`start`."""
        self.root = root
        self.cache_dir = cache_dir
        self._libvirtd: subprocess.Popen[bytes] | None = None
        self._virtlogd: subprocess.Popen[bytes] | None = None
        self._stopped = False

    # -- paths

    @property
    def socket_path(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """The URI of this daemon's QEMU driver."""
        return f"qemu+unix:///system?socket={self.socket_path}"

    @property
    def log_path(self) -> Path:
        """libvirtd's stderr (every start appends)."""
        return self.root / "libvirtd.log"

    @property
    def pid(self) -> int | None:
        """libvirtd's pid while it runs (ours, or one a supervisor started from the pidfile)."""
        p = self._libvirtd
        if p is not None and p.poll() is None:
            return p.pid
        pid = _read_pid(self.pidfile)
        return pid if pid is not None and _is(pid, "libvirtd") else None

    @property
    def pidfile(self) -> Path:
        """libvirtd's pid file (written by libvirtd itself)."""
        return self.root / "libvirtd.pid"

    def start_argv(self, *, daemonize: bool = True) -> list[str]:
        """The command that starts this libvirtd (in its namespace); with ``daemonize``
        it forks into the background and writes :attr:`pidfile` (``libvirtd -d``), as a
        supervisor (``vim.agent.supervisor``) wants to restart it."""
        return [
            "unshare",
            "-m",
            "--propagation",
            "private",
            str(self.root / "ns.sh"),
            _require("libvirtd"),
            *(["-d"] if daemonize else []),
            "-f",
            "/etc/libvirt/libvirtd.conf",
            "-p",
            str(self.pidfile),
        ]

    def qemu_log(self, domain: str) -> Path:
        """QEMU's own log (command line, errors) for a domain of this daemon."""
        return self.root / "log" / "qemu" / f"{domain}.log"

    # -- lifecycle

    @classmethod
    def start(cls, base_dir: Path | None = None, cache_dir: Path | None = None) -> LibvirtDaemon:
        """Create the private tree, start virtlogd then libvirtd; return once it answers."""
        for binary in ("unshare", "mount"):
            _require(binary)
        if base_dir is not None:
            base_dir.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="vim-libvirtd-", dir=base_dir)).resolve()
        cache = (cache_dir or cache_root() / "libvirt").resolve()
        daemon = cls(root, cache)
        _live.add(daemon)
        try:
            daemon._prepare()
            daemon._start_virtlogd()
            daemon._start_libvirtd()
        except BaseException:
            daemon.stop()
            raise
        return daemon

    def _prepare(self) -> None:
        for sub in ("etc/qemu", "run", "lib/qemu", "log/qemu"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(_LIBVIRTD_CONF)
        (self.root / "etc" / "qemu.conf").write_text(_QEMU_CONF)
        (self.root / "etc" / "virtlogd.conf").write_text("")
        for target in (*_MOUNTS.values(), "/var/cache/libvirt"):
            Path(target).mkdir(parents=True, exist_ok=True)  # mount points
        lines = ["#!/bin/sh", "set -e"]
        for sub, target in _MOUNTS.items():
            lines.append(f"mount --bind '{self.root / sub}' '{target}'")
        lines.append(f"mount --bind '{self.cache_dir}' /var/cache/libvirt")
        lines.append('exec "$@"')
        script = self.root / "ns.sh"
        script.write_text("\n".join(lines) + "\n")
        script.chmod(0o755)

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        if argv[0] != "unshare":
            argv = ["unshare", "-m", "--propagation", "private", str(self.root / "ns.sh"), *argv]
        with log.open("ab") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _start_virtlogd(self) -> None:
        log = self.root / "virtlogd.log"
        self._virtlogd = self._spawn(
            [
                _require("virtlogd"),
                "-f",
                "/etc/libvirt/virtlogd.conf",
                "-p",
                str(self.root / "virtlogd.pid"),
            ],
            log,
        )
        proc = self._virtlogd
        sock = self.root / "run" / "virtlogd-sock"
        wait_until(
            lambda: sock.exists() or proc.poll() is not None,
            _READY_TIMEOUT,
            what="virtlogd socket",
            log=log,
        )
        if proc.poll() is not None:
            raise HarnessError("virtlogd exited at start\n" + log_tail(log))

    def _start_libvirtd(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self._libvirtd = self._spawn(self.start_argv(daemonize=False), self.log_path)
        proc = self._libvirtd
        wait_until(
            lambda: proc.poll() is not None or self.answers(),
            _READY_TIMEOUT,
            interval=0.1,
            what="libvirtd to answer",
            log=self.log_path,
        )
        if proc.poll() is not None:
            raise HarnessError("libvirtd exited at start\n" + log_tail(self.log_path))

    def answers(self) -> bool:
        """True if libvirtd accepts a connection and answers a call."""
        if not self.socket_path.exists():
            return False
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return False
        try:
            conn.getLibVersion()
            return True
        except libvirt.libvirtError:
            return False
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def kill(self) -> None:
        """SIGKILL libvirtd and wait until it is gone; virtlogd and the guests keep running.

        Also kills a libvirtd that a supervisor started (found through the pidfile).
        """
        proc, self._libvirtd = self._libvirtd, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            try:
                proc.wait(timeout=_KILL_TIMEOUT)
            except subprocess.TimeoutExpired as e:
                raise HarnessError(f"libvirtd {proc.pid} did not die after SIGKILL") from e
        pid = self.pid
        if pid is not None:  # not our child: SIGKILL and poll /proc until it is reaped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not _alive(pid), _KILL_TIMEOUT, what=f"libvirtd {pid} to die")

    def freeze(self) -> None:
        """SIGSTOP libvirtd: it holds its sockets but answers nothing (keepalive must notice)."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT libvirtd after :meth:`freeze`."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        pid = self.pid
        if pid is None:
            raise HarnessError("libvirtd is not running")
        os.kill(pid, sig)

    def restart(self) -> None:
        """Kill libvirtd if it runs, then start a new one on the same state."""
        if self._stopped:
            raise HarnessError("daemon was stopped")
        self.kill()
        self._start_libvirtd()

    def qemu_pids(self) -> list[int]:
        """Pids of the QEMU processes this daemon started that are still alive."""
        pids = []
        for pidfile in (self.root / "run" / "qemu").glob("*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().strip())
                argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
                if Path(argv0.decode()).name.startswith("qemu-system") and _alive(pid):
                    pids.append(pid)
        return pids

    def stop(self) -> None:
        """SIGKILL the guests and both daemons, reap them, remove the temp dir; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        _live.discard(self)
        strays = self.qemu_pids()  # not our children, like a libvirtd a supervisor started:
        adopted = self.pid
        if adopted is not None and (self._libvirtd is None or adopted != self._libvirtd.pid):
            strays.append(adopted)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in (self._libvirtd, self._virtlogd):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)  # also ends a SIGSTOPped one
        for proc in (self._libvirtd, self._virtlogd):
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_KILL_TIMEOUT)
        deadline = time.monotonic() + _KILL_TIMEOUT
        while any(_alive(p) for p in strays) and time.monotonic() < deadline:
            time.sleep(0.05)  # not a child of ours: poll its /proc entry until it is reaped
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LibvirtDaemon:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is(pid: int, program: str) -> bool:
    """True if ``pid`` is alive and runs ``program`` (by argv[0]'s base name)."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    return Path(argv0.decode(errors="replace")).name == program and _alive(pid)


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@atexit.register
def _stop_all() -> None:
    for daemon in list(_live):
        daemon.stop()
