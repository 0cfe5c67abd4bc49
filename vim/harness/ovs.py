"""Start a real, private Open vSwitch (ovsdb-server + ovs-vswitchd) in a temp dir.

Role: one :class:`OvsSwitch` is one host's switch for tests, benchmarks and
the local multi-host cluster, optionally inside a network namespace (a test
host of :mod:`vim.harness.netns`). It is not pytest-specific::

    with OvsSwitch.start(netns=host.netns) as ovs:
        driver = OvsDriver(ovs.db_socket, run_dir=ovs.run_dir, netns=host.netns)
        ovs.kill_vswitchd()      # SIGKILL; bridges and ports stay in the database
        ovs.start_vswitchd()     # flows are gone: reconciling must reinstall them

Invariants:

* Everything lives in one directory that this module creates with ``mkdtemp``
  (under ``base_dir`` if given): the database ``conf.db`` (created with
  ``ovsdb-tool`` from the packaged ``vswitch.ovsschema``), the database socket
  ``db.sock``, both daemons' unixctl sockets, pidfiles and logs, and the
  bridges' OpenFlow management sockets ``<bridge>.mgmt`` (``OVS_RUNDIR``,
  ``OVS_DBDIR``, ``OVS_LOGDIR`` all point there). Nothing touches
  ``/var/run/openvswitch``. :meth:`OvsSwitch.stop` removes exactly that
  directory.
* Both daemons are children of this process, started in the foreground
  (no ``--detach``) through ``ip netns exec`` when ``netns`` is given, so a
  kill is SIGKILL followed by ``wait()`` on the child.
* ovs-vswitchd uses the userspace (``netdev``) datapath only: bridges must be
  created with ``datapath_type=netdev`` (there is no kernel datapath here).
  Its internal ports are (persistent) tap devices in its namespace.
* Readiness: ovsdb-server accepts on its socket; ovs-vswitchd answers
  ``ovs-appctl version`` on its unixctl socket. Failures raise
  :class:`~vim.harness.ports.HarnessError` with the log tail.
* :meth:`OvsSwitch.stop` SIGKILLs both daemons, reaps them and removes the
  directory; it is idempotent. Switches not stopped are stopped at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from vim.harness.netns import netns_exec
from vim.harness.ports import HarnessError, log_tail, wait_until

__all__ = ["OvsSwitch", "find_schema"]

_SCHEMAS = ("/usr/share/openvswitch/vswitch.ovsschema",)
_READY_TIMEOUT = 15.0
_KILL_TIMEOUT = 10.0
_CTL_TIMEOUT = 10.0

_live: set[OvsSwitch] = set()


def _accepts(path: Path) -> bool:
    """True if something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def find_schema() -> Path:
    """The Open_vSwitch database schema: ``$OVS_SCHEMA`` or the Debian package's."""
    env = os.environ.get("OVS_SCHEMA")
    for cand in ([env] if env else []) + list(_SCHEMAS):
        if Path(cand).is_file():
            return Path(cand)
    raise HarnessError("vswitch.ovsschema not found (install openvswitch-switch)")


class OvsSwitch:
    """A private ovsdb-server + ovs-vswitchd pair. Build it with :meth:`start`."""

    def __init__(self, base_dir: Path, netns: str | None) -> None:
        """Low-level constructor; it starts nothing. Use :meth:`start`."""
        self._dir = base_dir
        self.netns = netns
        self._ovsdb: subprocess.Popen[bytes] | None = None
        self._vswitchd: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @classmethod
    def start(cls, netns: str | None = None, base_dir: Path | None = None) -> OvsSwitch:
        """Create the database, start both daemons, return once both answer."""
        if base_dir is not None:
            base_dir.mkdir(parents=True, exist_ok=True)
        schema = find_schema()
        ovs = cls(Path(tempfile.mkdtemp(prefix="vim-ovs-", dir=base_dir)).resolve(), netns)
        _live.add(ovs)
        try:
            subprocess.run(
                ["ovsdb-tool", "create", str(ovs.db_path), str(schema)],
                check=True,
                capture_output=True,
                timeout=_CTL_TIMEOUT,
            )
            ovs._start_ovsdb()
            ovs.vsctl("--no-wait", "init")
            ovs.start_vswitchd()
        except subprocess.CalledProcessError as exc:
            ovs.stop()
            raise HarnessError(f"ovsdb-tool create failed: {exc.stderr!r}") from exc
        except BaseException:
            ovs.stop()
            raise
        return ovs

    # ---------------------------------------------------------------- paths
    @property
    def base_dir(self) -> Path:
        """The directory this object owns (removed by :meth:`stop`)."""
        return self._dir

    @property
    def run_dir(self) -> Path:
        """``OVS_RUNDIR``: sockets, pidfiles and the bridges' ``<bridge>.mgmt``."""
        return self._dir

    @property
    def db_path(self) -> Path:
        return self._dir / "conf.db"

    @property
    def db_socket(self) -> Path:
        """The database's unix socket (give it to the driver)."""
        return self._dir / "db.sock"

    @property
    def db_url(self) -> str:
        """``unix:<db_socket>``, as ``ovs-vsctl --db`` and ovsdbapp want it."""
        return f"unix:{self.db_socket}"

    @property
    def ovsdb_log(self) -> Path:
        return self._dir / "ovsdb-server.log"

    @property
    def vswitchd_log(self) -> Path:
        return self._dir / "ovs-vswitchd.log"

    @property
    def vswitchd_ctl(self) -> Path:
        return self._dir / "ovs-vswitchd.ctl"

    def mgmt_target(self, bridge: str) -> str:
        """The OpenFlow target of ``bridge`` for ``ovs-ofctl`` (``unix:.../<bridge>.mgmt``)."""
        return f"unix:{self._dir / bridge}.mgmt"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(OVS_RUNDIR=str(self._dir), OVS_DBDIR=str(self._dir), OVS_LOGDIR=str(self._dir))
        return env

    # ------------------------------------------------------------ processes
    def _spawn(self, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        full = ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv
        with log_path.open("ab") as log:
            log.write(f"### harness: starting {argv[0]}\n".encode())
            log.flush()
            return subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                env=self._env(),
                start_new_session=True,
            )

    def _start_ovsdb(self) -> None:
        d = self._dir
        self._ovsdb = self._spawn(
            [
                "ovsdb-server",
                str(self.db_path),
                f"--remote=punix:{self.db_socket}",
                f"--pidfile={d / 'ovsdb-server.pid'}",
                f"--unixctl={d / 'ovsdb-server.ctl'}",
                "-vconsole:off",
                f"--log-file={self.ovsdb_log}",
            ],
            self._dir / "ovsdb-server.out",
        )

        def ready() -> bool:
            self._check_alive(self._ovsdb, self.ovsdb_log)
            return self.db_socket.exists() and _accepts(self.db_socket)

        wait_until(ready, _READY_TIMEOUT, what="ovsdb-server", log=self.ovsdb_log)

    def start_vswitchd(self) -> None:
        """Start ovs-vswitchd (again, after :meth:`kill_vswitchd`); return once it answers."""
        if self._stopped:
            raise HarnessError("switch was stopped; start a new one")
        if self.vswitchd_running():
            return
        d = self._dir
        self._vswitchd = self._spawn(
            [
                "ovs-vswitchd",
                self.db_url,
                f"--pidfile={d / 'ovs-vswitchd.pid'}",
                f"--unixctl={self.vswitchd_ctl}",
                "-vconsole:off",
                f"--log-file={self.vswitchd_log}",
            ],
            self._dir / "ovs-vswitchd.out",
        )

        def ready() -> bool:
            self._check_alive(self._vswitchd, self.vswitchd_log)
            return self.vswitchd_ctl.exists() and self.appctl_rc("version") == 0

        wait_until(ready, _READY_TIMEOUT, what="ovs-vswitchd", log=self.vswitchd_log)

    def _ctl(self, argv: list[str]) -> int:
        try:
            return subprocess.run(
                argv, capture_output=True, timeout=_CTL_TIMEOUT, env=self._env(), check=False
            ).returncode
        except subprocess.TimeoutExpired:
            return -1

    def appctl_rc(self, *args: str) -> int:
        """Exit status of ``ovs-appctl -t <vswitchd ctl> ARGS``."""
        return self._ctl(["ovs-appctl", "-t", str(self.vswitchd_ctl), "--timeout=2", *args])

    @staticmethod
    def _check_alive(proc: subprocess.Popen[bytes] | None, log: Path) -> None:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"{proc.args!r} exited with {proc.returncode}\n{log_tail(log)}")

    def vswitchd_running(self) -> bool:
        return self._vswitchd is not None and self._vswitchd.poll() is None

    def ovsdb_running(self) -> bool:
        return self._ovsdb is not None and self._ovsdb.poll() is None

    @property
    def vswitchd_pid(self) -> int | None:
        return self._vswitchd.pid if self.vswitchd_running() and self._vswitchd else None

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes] | None, what: str) -> None:
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        try:
            proc.wait(timeout=_KILL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"{what} did not die after SIGKILL") from exc

    def kill_vswitchd(self) -> None:
        """SIGKILL ovs-vswitchd and reap it (no-op if not running)."""
        self._kill(self._vswitchd, "ovs-vswitchd")
        # Its unixctl socket file stays behind; readiness must not trust it.
        with contextlib.suppress(OSError):
            self.vswitchd_ctl.unlink()

    # -------------------------------------------------------------- tools
    def vsctl(self, *args: str) -> str:
        """Run ``ovs-vsctl --db=<ours> ARGS`` and return its stdout."""
        return self._tool(["ovs-vsctl", f"--db={self.db_url}", "--timeout=10", *args])

    def ofctl(self, *args: str) -> str:
        """Run ``ovs-ofctl ARGS`` with ``OVS_RUNDIR`` ours (bridge names resolve to our sockets)."""
        return self._tool(["ovs-ofctl", *args])

    def _tool(self, argv: list[str]) -> str:
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=_CTL_TIMEOUT,
                env=self._env(),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"{' '.join(argv)} timed out") from exc
        if proc.returncode != 0:
            raise HarnessError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def run_in_netns(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the switch's namespace (checked)."""
        return netns_exec(self.netns, argv)

    # ------------------------------------------------------------ teardown
    def __enter__(self) -> OvsSwitch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, *, remove_dirs: bool = True) -> None:
        """SIGKILL both daemons, reap them, remove the directory. Idempotent."""
        self._stopped = True
        _live.discard(self)
        errors = []
        for proc, what in ((self._vswitchd, "ovs-vswitchd"), (self._ovsdb, "ovsdb-server")):
            try:
                self._kill(proc, what)
            except HarnessError as exc:
                errors.append(str(exc))
        if remove_dirs:
            shutil.rmtree(self._dir, ignore_errors=True)
        if errors:
            raise HarnessError("; ".join(errors))


def _stop_leftovers() -> None:
    """atexit: never leave a daemon of ours running when the interpreter exits."""
    for ovs in list(_live):
        with contextlib.suppress(Exception):
            ovs.stop()


atexit.register(_stop_leftovers)
