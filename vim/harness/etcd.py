"""Start a real, throw-away etcd cluster (1..N members) on random ports.

Role: one :class:`EtcdCluster` is a private etcd cluster for tests, benchmarks
and the local dev cluster. It is not pytest-specific::

    with EtcdCluster.start(size=3, tuned=True) as etcd:
        client = SomeClient(etcd.endpoints)
        etcd.kill_member(etcd.leader_index() or 0)

Invariants:

* Everything lives in one directory that this module creates with
  ``mkdtemp`` (under ``base_dir`` if given, else the system temp dir), one
  sub-directory per member holding its ``data/`` dir and its ``etcd.log``.
  Member output goes to that file, never to a pipe (a full pipe would stall
  etcd). :meth:`EtcdCluster.stop` removes exactly that directory.
* Every member listens on 127.0.0.1 with its own random client and peer port;
  ports stay fixed for the life of the cluster, so :meth:`restart_member`
  brings a member back at the same address with the same data dir.
* Each cluster has a unique ``--initial-cluster-token``, so members of two
  clusters can never join each other.
* Members are children of this process (``subprocess.Popen``): kills are
  SIGKILL followed by ``wait()`` on the child (``kill -0`` would still answer
  for a while). :meth:`EtcdCluster.stop` SIGKILLs every member at once
  (SIGTERM to all members at once can hang for seconds), waits, and removes
  the directory; it is idempotent. Clusters not stopped are stopped at
  interpreter exit.
* Readiness means: every running member answers ``GET /health`` with
  ``health: true`` and one member reports itself leader.
* Failures raise :class:`~vim.harness.ports.HarnessError` with log tails.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from vim.harness.ports import HarnessError, free_ports, log_tail, wait_until

__all__ = ["EtcdCluster", "EtcdMember", "HarnessError", "find_etcd"]

HOST = "127.0.0.1"
_READY_TIMEOUT = 15.0
_KILL_TIMEOUT = 10.0
_HTTP_TIMEOUT = 1.0
_PORT_ATTEMPTS = 3
_TUNED_ARGS = ["--heartbeat-interval=100", "--election-timeout=500"]

# No proxy for loopback, whatever http_proxy/no_proxy say.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_live: set[EtcdCluster] = set()


def find_etcd() -> str:
    """Path of the etcd server binary: ``$ETCD_BIN`` or ``etcd`` on PATH."""
    env = os.environ.get("ETCD_BIN")
    if env:
        if not os.access(env, os.X_OK):
            raise HarnessError(f"ETCD_BIN={env} is not an executable")
        return env
    found = shutil.which("etcd")
    if not found:
        raise HarnessError("etcd binary not found (set ETCD_BIN or install etcd-server)")
    return found


def _child_env() -> dict[str, str]:
    """Our environment minus ETCD_* (etcd reads those as flags), keeping the arch override."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ETCD_", "ETCDCTL_")) or k == "ETCD_UNSUPPORTED_ARCH"
    }


def _http_json(url: str, body: bytes | None = None) -> dict[str, Any] | None:
    """GET (or POST ``body``) ``url`` and decode a JSON object; None on any failure."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(url, data=body, headers=headers)
    try:
        with _http.open(req, timeout=_HTTP_TIMEOUT) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class EtcdMember:
    """One etcd member: fixed name, ports and directories; a replaceable process."""

    name: str
    client_port: int
    peer_port: int
    member_dir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    member_id: str | None = None

    @property
    def data_dir(self) -> Path:
        """The member's ``--data-dir``."""
        return self.member_dir / "data"

    @property
    def log_path(self) -> Path:
        """File receiving the member's stdout and stderr."""
        return self.member_dir / "etcd.log"

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:CLIENT_PORT``."""
        return f"{HOST}:{self.client_port}"

    @property
    def client_url(self) -> str:
        """``http://127.0.0.1:CLIENT_PORT``."""
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        """``http://127.0.0.1:PEER_PORT``."""
        return f"http://{HOST}:{self.peer_port}"

    def is_running(self) -> bool:
        """True if the member's process is alive (not yet exited)."""
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        """True if the member answers ``/health`` with health true (implies a leader)."""
        data = _http_json(f"{self.client_url}/health")
        return data is not None and str(data.get("health")).lower() == "true"

    def status(self) -> dict[str, Any] | None:
        """The v3 gateway's ``/v3/maintenance/status`` answer, or None if unreachable."""
        return _http_json(f"{self.client_url}/v3/maintenance/status", b"{}")


class EtcdCluster:
    """A private etcd cluster. Build it with :meth:`start`."""

    def __init__(
        self,
        *,
        base_dir: Path,
        binary: str,
        members: list[EtcdMember],
        token: str,
        extra_args: list[str],
    ) -> None:
        """Low-level constructor; it does not start anything. Use :meth:`start`."""
        self._base_dir = base_dir
        self._binary = binary
        self._members = members
        self._token = token
        self._extra_args = list(extra_args)
        self._stopped = False

    @classmethod
    def start(
        cls,
        size: int = 1,
        base_dir: Path | None = None,
        *,
        tuned: bool = False,
        extra_args: list[str] | None = None,
    ) -> EtcdCluster:
        """Start ``size`` members concurrently; return once all are healthy with a leader.

        ``base_dir`` is the *parent* of the cluster directory (created if
        missing). ``tuned=True`` adds ``--heartbeat-interval=100
        --election-timeout=500`` (leader failover in ~1 s instead of ~2 s).
        ``extra_args`` are appended to every member's command line.
        """
        if size < 1:
            raise ValueError("size must be >= 1")
        binary = find_etcd()
        args = [*(_TUNED_ARGS if tuned else []), *(extra_args or [])]
        if base_dir is not None:
            base_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_PORT_ATTEMPTS):
            cluster_dir = Path(tempfile.mkdtemp(prefix="vim-etcd-", dir=base_dir)).resolve()
            ports = free_ports(2 * size, HOST)
            members: list[EtcdMember] = []
            for i in range(size):
                member_dir = cluster_dir / f"m{i}"
                member_dir.mkdir()
                members.append(EtcdMember(f"m{i}", ports[2 * i], ports[2 * i + 1], member_dir))
            cluster = cls(
                base_dir=cluster_dir,
                binary=binary,
                members=members,
                token=f"vim-harness-{uuid.uuid4().hex}",
                extra_args=args,
            )
            _live.add(cluster)
            try:
                for i in range(size):
                    cluster._spawn(i, "new")
                cluster.wait_ready(indices=list(range(size)))
                return cluster
            except HarnessError:
                bind_failure = cluster._any_log_mentions("address already in use")
                cluster.stop()
                if not bind_failure or attempt + 1 == _PORT_ATTEMPTS:
                    raise
            except BaseException:
                cluster.stop()
                raise
        raise AssertionError("unreachable")

    # ---------------------------------------------------------------- access
    @property
    def base_dir(self) -> Path:
        """The cluster directory this object owns (removed by :meth:`stop`)."""
        return self._base_dir

    @property
    def members(self) -> list[EtcdMember]:
        """The members, index-stable for the cluster's life."""
        return list(self._members)

    @property
    def endpoints(self) -> list[str]:
        """``["127.0.0.1:PORT", ...]``, one per member (running or not)."""
        return [m.endpoint for m in self._members]

    @property
    def client_urls(self) -> list[str]:
        """``["http://127.0.0.1:PORT", ...]``, one per member (running or not)."""
        return [m.client_url for m in self._members]

    @property
    def initial_cluster(self) -> str:
        """The ``--initial-cluster`` value shared by all members."""
        return ",".join(f"{m.name}={m.peer_url}" for m in self._members)

    # ------------------------------------------------------------- processes
    def _command(self, i: int, state: str) -> list[str]:
        m = self._members[i]
        return [
            self._binary,
            f"--name={m.name}",
            f"--data-dir={m.data_dir}",
            f"--listen-client-urls={m.client_url}",
            f"--advertise-client-urls={m.client_url}",
            f"--listen-peer-urls={m.peer_url}",
            f"--initial-advertise-peer-urls={m.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-state={state}",
            f"--initial-cluster-token={self._token}",
            "--logger=zap",
            "--log-outputs=stderr",
            *self._extra_args,
        ]

    def _spawn(self, i: int, state: str) -> None:
        m = self._members[i]
        with m.log_path.open("ab") as log:
            log.write(
                f"### harness: starting {m.name} (--initial-cluster-state={state})\n".encode()
            )
            log.flush()
            m.process = subprocess.Popen(
                self._command(i, state),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=m.member_dir,
                env=_child_env(),
                start_new_session=True,  # terminal signals go to us, not to etcd
            )

    def _check_alive(self, indices: list[int]) -> None:
        for i in indices:
            m = self._members[i]
            if m.process is not None and m.process.poll() is not None:
                raise HarnessError(
                    f"etcd member {m.name} exited with {m.process.returncode}\n"
                    f"{log_tail(m.log_path)}"
                )

    def wait_ready(self, timeout: float = _READY_TIMEOUT, indices: list[int] | None = None) -> None:
        """Wait until the given (default: all running) members are healthy and
        a leader exists. Raises :class:`HarnessError` with log tails on timeout
        or if a member exits meanwhile."""
        wanted = (
            indices
            if indices is not None
            else [i for i, m in enumerate(self._members) if m.is_running()]
        )

        def ready() -> bool:
            self._check_alive(wanted)
            if not all(self._members[i].healthy() for i in wanted):
                return False
            return self.leader_index() is not None

        try:
            wait_until(ready, timeout, what="etcd members to be healthy")
        except HarnessError as exc:
            tails = "\n".join(log_tail(self._members[i].log_path, 15) for i in wanted)
            raise HarnessError(f"{exc}\n{tails}") from exc

    def kill_member(self, i: int) -> None:
        """SIGKILL member ``i`` and wait for the child to be reaped (no-op if not running)."""
        m = self._members[i]
        if m.process is None:
            return
        if m.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                m.process.kill()
        try:
            m.process.wait(timeout=_KILL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"etcd member {m.name} did not die after SIGKILL") from exc

    def restart_member(self, i: int, *, wait: bool = True) -> None:
        """(Re)start member ``i`` with ``--initial-cluster-state existing`` on the same
        ports and data dir, killing it first if it is still running. With ``wait``,
        return once it is healthy and the cluster has a leader."""
        if self._stopped:
            raise HarnessError("cluster was stopped; start a new one")
        self.kill_member(i)
        self._spawn(i, "existing")
        if wait:
            self.wait_ready(indices=[i])

    def leader_index(self) -> int | None:
        """Index of the member that currently reports itself leader, or None.

        Asks every running member ``/v3/maintenance/status``; a member is leader
        when its ``leader`` equals its own ``header.member_id``. If several claim
        it (a stale leader cut off from the rest), the highest raft term wins.
        """
        best: tuple[int, int] | None = None  # (raft term, index)
        for i, m in enumerate(self._members):
            if not m.is_running():
                continue
            st = m.status()
            if st is None:
                continue
            header = st.get("header") or {}
            member_id = str(header.get("member_id") or header.get("memberId") or "")
            if member_id:
                m.member_id = member_id
            leader = str(st.get("leader") or "")
            if member_id and leader == member_id:
                term = int(
                    st.get("raftTerm") or st.get("raft_term") or header.get("raft_term") or 0
                )
                if best is None or term > best[0]:
                    best = (term, i)
        return None if best is None else best[1]

    def _any_log_mentions(self, needle: str) -> bool:
        for m in self._members:
            with contextlib.suppress(OSError):
                if needle in m.log_path.read_text(errors="replace"):
                    return True
        return False

    def stop(self, *, remove_dirs: bool = True) -> None:
        """SIGKILL every member, reap them all, and remove the cluster directory
        (unless ``remove_dirs=False``, e.g. to read the logs). Idempotent."""
        for m in self._members:
            if m.process is not None and m.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    m.process.kill()
        deadline = time.monotonic() + _KILL_TIMEOUT
        stuck = []
        for m in self._members:
            if m.process is None:
                continue
            try:
                m.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck.append(m.name)
        self._stopped = True
        _live.discard(self)
        if remove_dirs:
            shutil.rmtree(self._base_dir, ignore_errors=True)
        if stuck:
            raise HarnessError(f"etcd members {stuck} did not die after SIGKILL")

    def __enter__(self) -> EtcdCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        running = sum(m.is_running() for m in self._members)
        return f"<EtcdCluster {len(self._members)} members, {running} running, {self._base_dir}>"


def _stop_leftovers() -> None:
    """atexit: never leave a member of ours running when the interpreter exits."""
    for cluster in list(_live):
        with contextlib.suppress(Exception):
            cluster.stop()


atexit.register(_stop_leftovers)
