"""Start a real, throw-away PostgreSQL server on a random port in a temp dir.

Role: one :class:`PostgresServer` is one private postmaster (initdb + pg_ctl)
for tests, benchmarks and the local dev cluster. It is not pytest-specific::

    with PostgresServer.start() as pg:
        dsn = pg.create_database("app")

Invariants:

* Everything lives in one instance directory that this module creates with
  ``mkdtemp`` (under ``base_dir`` if given, else the system temp dir):
  ``data/`` (PGDATA), ``postgres.log`` (server log) and the Unix socket.
  :meth:`PostgresServer.cleanup` removes exactly that directory, nothing else.
* ``initdb`` refuses to run as root, so as root the instance directory is
  chowned to the ``postgres`` user and every server command runs through
  ``runuser -u postgres --``. As any other user the commands run directly.
* The server listens on 127.0.0.1 only, with ``trust`` auth for user
  ``postgres``. The binaries come from ``$PG_BINDIR``, else ``pg_config
  --bindir``, else the newest ``/usr/lib/postgresql/*/bin`` (never a wrapper
  in ``/usr/local/bin``).
* ``fsync=False`` turns fsync, synchronous_commit and full_page_writes off
  (fast, for unit/integration tests); ``fsync=True`` keeps them on (use it for
  any benchmark that claims durability). Beware: with synchronous_commit off,
  commits of the last few hundred ms are lost when the server is *killed*
  (measured: a table created just before :meth:`PostgresServer.kill` was gone
  after restart). Crash tests that expect committed data to survive a process
  crash should pass ``extra_conf={"synchronous_commit": "on"}`` (still fast
  with fsync off). A clean :meth:`~PostgresServer.restart` loses nothing.
* After :meth:`PostgresServer.kill`, :meth:`~PostgresServer.stop` or
  :meth:`~PostgresServer.cleanup` returns, no process of this server is left:
  ``kill`` freezes the postmaster (SIGSTOP, so it cannot fork), SIGKILLs it
  and every process that is its child or whose cwd is the data dir (every
  backend chdirs there), then waits until none is alive and the port is free.
* :meth:`PostgresServer.start_standby` makes a streaming standby of a running
  primary (``pg_basebackup -R``) in its own instance directory, with the same
  invariants; :meth:`~PostgresServer.promote` turns it into a primary.
* Servers not cleaned up are killed and removed at interpreter exit.
* Failures raise :class:`~vim.harness.ports.HarnessError` with the log tail.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

from vim.harness.ports import HarnessError, free_port, is_listening, log_tail, wait_until

if TYPE_CHECKING:
    from psycopg import sql as _sql

__all__ = ["HarnessError", "PostgresServer", "find_bindir"]

HOST = "127.0.0.1"
SUPERUSER = "postgres"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0
_KILL_TIMEOUT = 10.0
_PORT_ATTEMPTS = 3
# sun_path is 108 bytes including the NUL; PostgreSQL appends "/.s.PGSQL.NNNNN.lock".
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535.lock")
_CONF_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")

StopMode = Literal["smart", "fast", "immediate"]

_live: set[PostgresServer] = set()


def find_bindir() -> Path:
    """Directory holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    env = os.environ.get("PG_BINDIR")
    if env:
        path = Path(env)
        if not (path / "initdb").is_file():
            raise HarnessError(f"PG_BINDIR={env} has no initdb")
        return path
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            path = Path(out)
            if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
                return path

    def version(p: str) -> tuple[int, ...]:
        part = Path(p).parent.name
        return tuple(int(x) for x in part.split(".") if x.isdigit())

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for cand in candidates:
        if (Path(cand) / "initdb").is_file():
            return Path(cand)
    raise HarnessError("PostgreSQL binaries not found (set PG_BINDIR or install postgresql)")


def _is_root() -> bool:
    return os.geteuid() == 0


def _clean_env() -> dict[str, str]:
    """Our environment minus libpq/server variables that could redirect commands."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _proc_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (reaping can lag behind death)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the parenthesised command name, which may contain spaces.
    state = stat.rpartition(")")[2].split()[0]
    return state not in ("Z", "X")


def _proc_ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _proc_cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class PostgresServer:
    """A private PostgreSQL server. Build it with :meth:`start`."""

    def __init__(
        self,
        *,
        base_dir: Path,
        bindir: Path,
        port: int,
        fsync: bool,
        extra_conf: dict[str, str],
        socket_dir: Path,
        owns_socket_dir: bool,
    ) -> None:
        """Low-level constructor; it does not start anything. Use :meth:`start`."""
        self._base_dir = base_dir
        self._bindir = bindir
        self._port = port
        self._fsync = fsync
        self._extra_conf = dict(extra_conf)
        self._socket_dir = socket_dir
        self._owns_socket_dir = owns_socket_dir
        self._cleaned = False

    # ------------------------------------------------------------------ start
    @classmethod
    def start(
        cls,
        base_dir: Path | None = None,
        *,
        fsync: bool = False,
        port: int | None = None,
        extra_conf: dict[str, str] | None = None,
    ) -> PostgresServer:
        """initdb a fresh cluster in a new temp dir and start it; return when ready.

        ``base_dir`` is the *parent* of the instance directory (created if
        missing; the ``postgres`` user must be able to traverse it when running
        as root). ``port=None`` picks a random free port (and retries with
        another one if it was taken meanwhile). ``extra_conf`` adds or
        overrides server settings (``-c key=value``).
        """
        conf = dict(extra_conf or {})
        for key in conf:
            if not _CONF_KEY.match(key):
                raise ValueError(f"invalid PostgreSQL setting name: {key!r}")
        bindir = find_bindir()
        if base_dir is not None:
            base_dir.mkdir(parents=True, exist_ok=True)
        instance = Path(tempfile.mkdtemp(prefix="vim-pg-", dir=base_dir)).resolve()
        instance.chmod(0o755)
        socket_dir, owns_socket_dir = instance, False
        if len(str(instance)) > _MAX_SOCKET_DIR_LEN:
            socket_dir, owns_socket_dir = Path(tempfile.mkdtemp(prefix="vim-pgs-")), True
            socket_dir.chmod(0o755)
        server = cls(
            base_dir=instance,
            bindir=bindir,
            port=port if port is not None else free_port(HOST),
            fsync=fsync,
            extra_conf=conf,
            socket_dir=socket_dir,
            owns_socket_dir=owns_socket_dir,
        )
        _live.add(server)
        try:
            server._prepare_dirs()
            server._initdb()
            for attempt in range(_PORT_ATTEMPTS):
                log_offset = server._log_size()
                try:
                    server._pg_ctl_start()
                    break
                except HarnessError:
                    retry = (
                        port is None
                        and attempt + 1 < _PORT_ATTEMPTS
                        and server._log_mentions_bind_failure(log_offset)
                    )
                    if not retry:
                        raise
                    server._port = free_port(HOST)
        except BaseException:
            server._remove_dirs_after_failure()
            raise
        return server

    @classmethod
    def start_standby(
        cls,
        primary: PostgresServer,
        base_dir: Path | None = None,
        *,
        port: int | None = None,
    ) -> PostgresServer:
        """A streaming-replication standby of ``primary``; return once it accepts reads.

        The data dir is a ``pg_basebackup -R -X stream`` of the running primary
        (``-R`` writes ``standby.signal`` and ``primary_conninfo``), so the
        standby is read-only (hot standby) until :meth:`promote`. It keeps the
        primary's durability settings. This is the runbook's "PostgreSQL
        failover" in miniature: promote the standby, repoint the API nodes.
        """
        bindir = find_bindir()
        if base_dir is not None:
            base_dir.mkdir(parents=True, exist_ok=True)
        instance = Path(tempfile.mkdtemp(prefix="vim-pg-", dir=base_dir)).resolve()
        instance.chmod(0o755)
        socket_dir, owns_socket_dir = instance, False
        if len(str(instance)) > _MAX_SOCKET_DIR_LEN:
            socket_dir, owns_socket_dir = Path(tempfile.mkdtemp(prefix="vim-pgs-")), True
            socket_dir.chmod(0o755)
        server = cls(
            base_dir=instance,
            bindir=bindir,
            port=port if port is not None else free_port(HOST),
            fsync=primary.fsync,
            extra_conf=primary._extra_conf,
            socket_dir=socket_dir,
            owns_socket_dir=owns_socket_dir,
        )
        _live.add(server)
        try:
            server._prepare_dirs()
            argv = [
                str(bindir / "pg_basebackup"),
                *("-D", str(server.data_dir), "-h", HOST, "-p", str(primary.port)),
                *("-U", SUPERUSER, "-X", "stream", "-c", "fast", "-R", "--no-sync"),
            ]
            server._run(argv, f"pg_basebackup from {HOST}:{primary.port}", timeout=120)
            server._pg_ctl_start()
        except BaseException:
            server._remove_dirs_after_failure()
            raise
        return server

    def is_standby(self) -> bool:
        """True while the server is in recovery (a standby not yet promoted)."""
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return bool(row and row[0])

    def promote(self) -> None:
        """Promote a standby to a primary (``pg_ctl promote -w``); return once it accepts
        writes. Raises :class:`HarnessError` if it is not a standby."""
        argv = [str(self._bindir / "pg_ctl"), "-D", str(self.data_dir), "-w", "promote"]
        self._run(argv, "pg_ctl promote", timeout=_START_TIMEOUT + 10)
        wait_until(
            lambda: not self.is_standby(),
            _START_TIMEOUT,
            what=f"{self.data_dir} to leave recovery",
            log=self.log_path,
        )

    def _prepare_dirs(self) -> None:
        if not _is_root():
            return
        for d in {self._base_dir, self._socket_dir}:
            shutil.chown(d, user=SUPERUSER, group=SUPERUSER)
        probe = self._as_postgres(
            ["test", "-w", str(self._base_dir), "-a", "-x", str(self._base_dir)]
        )
        res = subprocess.run(probe, capture_output=True, env=_clean_env(), timeout=10, check=False)
        if res.returncode != 0:
            raise HarnessError(
                f"user {SUPERUSER!r} cannot reach {self._base_dir}: a parent directory is not "
                "traversable by others (leave base_dir=None to use the system temp dir)"
            )

    def _as_postgres(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", SUPERUSER, "--", *argv] if _is_root() else argv

    def _run(self, argv: list[str], what: str, timeout: float) -> None:
        try:
            res = subprocess.run(
                self._as_postgres(argv),
                capture_output=True,
                text=True,
                env=_clean_env(),
                cwd=self._base_dir,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(
                f"{what} timed out after {timeout}s\n{log_tail(self.log_path)}"
            ) from exc
        if res.returncode != 0:
            raise HarnessError(
                f"{what} failed (exit {res.returncode}): {' '.join(argv)}\n"
                f"stdout: {res.stdout.strip()}\nstderr: {res.stderr.strip()}\n"
                f"{log_tail(self.log_path)}"
            )

    def _initdb(self) -> None:
        argv = [
            str(self._bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
        ]
        self._run(argv, "initdb", timeout=120)

    def _settings(self) -> dict[str, str]:
        durable = "on" if self._fsync else "off"
        settings = {
            "listen_addresses": HOST,
            "port": str(self._port),
            "unix_socket_directories": str(self._socket_dir),
            "fsync": durable,
            "synchronous_commit": durable,
            "full_page_writes": durable,
            "max_connections": "200",
        }
        settings.update(self._extra_conf)
        return settings

    def _pg_ctl_start(self) -> None:
        opts: list[str] = []
        for key, value in self._settings().items():
            opts += ["-c", f"{key}={value}"]
        argv = [
            str(self._bindir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_path),
            "-w",
            "-t",
            str(int(_START_TIMEOUT)),
            # pg_ctl hands -o to /bin/sh, so quote every word.
            "-o",
            " ".join(shlex.quote(o) for o in opts),
            "start",
        ]
        self._run(argv, f"pg_ctl start (port {self._port})", timeout=_START_TIMEOUT + 10)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _log_mentions_bind_failure(self, offset: int) -> bool:
        """True if the log, from byte ``offset`` on, says the port was taken."""
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
            return "could not bind" in text or "Address already in use" in text
        return False

    # ------------------------------------------------------------ properties
    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return HOST

    @property
    def port(self) -> int:
        """TCP port; constant across :meth:`restart`."""
        return self._port

    @property
    def user(self) -> str:
        """The superuser name (``postgres``), trusted without password."""
        return SUPERUSER

    @property
    def base_dir(self) -> Path:
        """The instance directory this server owns (removed by :meth:`cleanup`)."""
        return self._base_dir

    @property
    def data_dir(self) -> Path:
        """PGDATA."""
        return self._base_dir / "data"

    @property
    def log_path(self) -> Path:
        """The server log (pg_ctl ``-l``)."""
        return self._base_dir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        """Directory of the Unix-domain socket (``psql -h SOCKET_DIR``)."""
        return self._socket_dir

    @property
    def fsync(self) -> bool:
        """Whether durable settings (fsync, synchronous_commit, full_page_writes) are on."""
        return self._fsync

    def dsn(self, dbname: str = "postgres") -> str:
        """libpq URL, e.g. ``postgresql://postgres@127.0.0.1:PORT/postgres``."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self._port}/{quote(dbname, safe='')}"

    def sqlalchemy_url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL using the psycopg 3 driver."""
        return f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self._port}/{quote(dbname, safe='')}"

    # ------------------------------------------------------------- databases
    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; return its DSN."""
        from psycopg import sql

        self._admin_execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str, *, force: bool = True) -> None:
        """``DROP DATABASE IF EXISTS name`` (``WITH (FORCE)`` disconnects its sessions)."""
        from psycopg import sql

        stmt = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
        if force:
            stmt = sql.SQL("{} WITH (FORCE)").format(stmt)
        self._admin_execute(stmt)

    def _admin_execute(self, stmt: _sql.Composed) -> None:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(stmt)

    # ------------------------------------------------------------- lifecycle
    def postmaster_pid(self) -> int | None:
        """PID recorded in ``postmaster.pid``, or None when no server holds the data dir."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first.strip())
        except (OSError, ValueError):
            return None

    def _is_ours(self, pid: int) -> bool:
        return _proc_alive(pid) and _proc_cwd(pid) == str(self.data_dir)

    def is_running(self) -> bool:
        """True if this server's postmaster is alive."""
        pid = self.postmaster_pid()
        return pid is not None and self._is_ours(pid)

    def _server_pids(self) -> set[int]:
        """Every live process of this server: its postmaster's children and
        anything whose cwd is the data dir (backends orphaned by a dead postmaster)."""
        pm = self.postmaster_pid()
        pm_ours = pm is not None and self._is_ours(pm)
        data = str(self.data_dir)
        pids: set[int] = set()
        for pid in _all_pids():
            if not _proc_alive(pid):
                continue
            if _proc_cwd(pid) == data or (pm_ours and _proc_ppid(pid) == pm):
                pids.add(pid)
        return pids

    def stop(self, mode: StopMode = "fast") -> None:
        """Shut down with ``pg_ctl stop -m MODE`` and wait; no-op if not running."""
        if not self.is_running():
            return
        argv = [
            str(self._bindir / "pg_ctl"),
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(_STOP_TIMEOUT)),
            "stop",
        ]
        self._run(argv, f"pg_ctl stop -m {mode}", timeout=_STOP_TIMEOUT + 10)
        wait_until(
            lambda: not self._server_pids(),
            _KILL_TIMEOUT,
            what=f"postgres processes of {self.data_dir} to exit",
            log=self.log_path,
        )

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and all its processes, then
        wait until none is alive and nothing listens on the port.

        The data dir is left as after a real crash (the next :meth:`restart`
        performs crash recovery); the stale ``postmaster.pid``, socket lock
        files and shared-memory segment are removed.
        """
        pm = self.postmaster_pid()
        if pm is not None and self._is_ours(pm):
            # A stopped postmaster cannot fork new backends while we collect them.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pm, signal.SIGSTOP)

        def sweep() -> bool:
            pids = self._server_pids()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            return not pids

        wait_until(
            sweep,
            _KILL_TIMEOUT,
            what=f"postgres processes of {self.data_dir} to die",
            log=self.log_path,
        )
        wait_until(
            lambda: not is_listening(self._port, HOST, timeout=0.2),
            _KILL_TIMEOUT,
            what=f"port {self._port} to be free",
            log=self.log_path,
        )
        self._remove_stale_locks()

    def _remove_stale_locks(self) -> None:
        """Drop what a killed postmaster leaves: its SysV segment and its lock files.

        A SIGKILLed process can linger as a zombie for a while and PostgreSQL
        treats a lock file whose PID still answers ``kill(pid, 0)`` as a live
        server, so without this a restart would fail until the zombie is reaped.
        """
        self._release_shared_memory()
        for lock in (
            self.data_dir / "postmaster.pid",
            self._socket_dir / f".s.PGSQL.{self._port}.lock",
            self._socket_dir / f".s.PGSQL.{self._port}",
        ):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop (if running) and start again on the same port and data dir; return
        when it accepts connections. Also recovers a server that was killed."""
        if self._cleaned:
            raise HarnessError("server was cleaned up; start a new one")
        if self.is_running():
            self.stop(mode)
        elif self.postmaster_pid() is not None or self._server_pids():
            self.kill()  # died behind our back: sweep orphans and stale lock files
        self._pg_ctl_start()

    def _release_shared_memory(self) -> None:
        """Remove the SysV segment a killed postmaster leaves (line 7 of postmaster.pid)."""
        with contextlib.suppress(OSError, ValueError, IndexError, subprocess.SubprocessError):
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            shmid = int(lines[6].split()[1])
            subprocess.run(
                ["ipcrm", "-m", str(shmid)], capture_output=True, timeout=10, check=False
            )

    def cleanup(self) -> None:
        """Stop (fast; kill if that fails) and remove the instance directory. Idempotent."""
        if self._cleaned:
            return
        try:
            try:
                self.stop("fast")
            except HarnessError:
                self.kill()
            if self._server_pids():
                self.kill()
        finally:
            self._remove_dirs()

    def _remove_dirs_after_failure(self) -> None:
        with contextlib.suppress(HarnessError):
            self.kill()
        self._remove_dirs()

    def _remove_dirs(self) -> None:
        shutil.rmtree(self._base_dir, ignore_errors=True)
        if self._owns_socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
        self._cleaned = True
        _live.discard(self)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    def __repr__(self) -> str:
        state = "cleaned" if self._cleaned else ("running" if self.is_running() else "stopped")
        return f"<PostgresServer {HOST}:{self._port} {self._base_dir} {state}>"


def _kill_leftovers() -> None:
    """atexit: never leave a server of ours running when the interpreter exits."""
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.kill()
        with contextlib.suppress(Exception):
            server._remove_dirs()


atexit.register(_kill_leftovers)
