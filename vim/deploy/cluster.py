"""The whole control plane and N agent hosts on one machine, as child processes.

    with LocalCluster(Path("var/cluster"), overrides(hosts=2)) as cluster:
        cluster.start()                # returns once every process is up
        cluster.wait_healthy(60)       # API, log, etcd, leaders, agents all healthy
        cluster.members()              # [Member(kind="api", name="api-1", pid=..., ...), ...]
    # stopped: nothing left running, namespaces gone

Topology (``config`` chooses the counts; defaults in :class:`~vim.deploy.config.ClusterConfig`):

* a :class:`~vim.harness.netns.NetnsLab` with a root-namespace gateway when
  there are agent hosts; every root-namespace service listens on the gateway
  address (``.1`` of the management subnet), which agents reach and the root
  namespace owns, so nothing listens beyond this machine's own links. Without
  hosts they listen on 127.0.0.1;
* etcd (3 members; clients on 127.0.0.1 and the gateway), a PostgreSQL primary
  and a streaming standby (``pg_basebackup -R``; the event log uses the
  primary), API nodes, schedulers, fault managers and SDN controllers, each a
  ``python -c "...main()"`` child with its own log file in ``DIR/logs``;
* per host: its namespace, its own Open vSwitch (ovsdb-server + ovs-vswitchd,
  userspace datapath), its own libvirt ``test:///`` node file and its agent,
  started inside the namespace and talking to the API and etcd through the
  gateway.

TLS (default on): a private CA in ``DIR/pki``; API nodes serve a certificate
for 127.0.0.1, localhost and the gateway address and require client
certificates (mutual TLS); every agent has a client certificate naming its
host (CN = hostname), the operator one named ``operator``.

Invariants:

* Ports: ``base_port = 0`` takes kernel-chosen free ports (services write the
  bound port to a port file, so there is no race); a base port lays ports out
  at fixed offsets (docs/DEPLOY.md). etcd always uses free ports.
* :meth:`LocalCluster.start` either returns with every process running and
  ``DIR/cluster.json``, ``DIR/vimctl.toml`` and ``DIR/prometheus-targets.json``
  written, or stops whatever it started and raises :class:`ClusterError`
  with the failing member's log tail.
* :meth:`LocalCluster.stop` stops agents, then the other services (SIGTERM,
  SIGKILL after a grace period; always waiting on the child, never on
  ``kill -0``), then switches, namespaces, etcd and PostgreSQL. It is
  idempotent and leaves no process, namespace or listening port behind.
* A service whose command line has no ``--metrics-listen`` (asked once per
  kind with ``--help``) runs without a metrics endpoint; :attr:`without_metrics`
  lists those kinds.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import importlib
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from vim.deploy.config import ClusterConfig
from vim.deploy.state import STATE_VERSION, Member, members_json, write_state
from vim.harness.etcd import EtcdCluster
from vim.harness.netns import LabHost, NetnsLab
from vim.harness.ovs import OvsSwitch
from vim.harness.ports import HarnessError, log_tail
from vim.harness.postgres import PostgresServer, find_bindir
from vim.harness.testnode import write_test_node

__all__ = ["SERVICE_MODULES", "ClusterError", "LocalCluster"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DATABASE = "vim"
TOKEN_TTL_S = 30 * 24 * 3600.0
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 8.0
SERVICE_MODULES = {
    "api": "vim.api.server",
    "scheduler": "vim.scheduler.service",
    "faultd": "vim.faultd.cli",
    "sdn": "vim.sdn.service",
    "agent": "vim.agent.service",
}
# Port offsets from cluster.base_port (docs/DEPLOY.md).
_OFFSETS = {"api": 0, "api-metrics": 10, "scheduler": 20, "faultd": 30, "sdn": 40, "agent": 50}
_PG_OFFSET = 100
_T = TypeVar("_T")


class ClusterError(RuntimeError):
    """The cluster could not start (the message names the member and has its log tail)."""


@dataclass
class _Child:
    """One service process we started (a console script's ``main`` run by this interpreter)."""

    kind: str
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    port_file: Path | None = None
    metrics_port_file: Path | None = None
    address: str = ""
    """The IP its listeners bind (the gateway, 127.0.0.1 or a host's management IP)."""
    netns: str = ""
    port: int = 0
    metrics_port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def running(self) -> bool:
        return self.proc.poll() is None

    def fail(self, why: str) -> ClusterError:
        code = self.proc.poll()
        state = f"exited with {code}" if code is not None else "still running"
        return ClusterError(f"{self.kind} {self.name} {why} ({state})\n{log_tail(self.log, 30)}")


def _read_port(path: Path | None) -> int:
    if path is None:
        return 0
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text(encoding="utf-8").strip())
    return 0


def launcher(kind: str) -> list[str]:
    """The command that runs service ``kind`` with this interpreter: its console script's
    ``main`` (some service modules have no ``__main__`` block), arguments following."""
    module = SERVICE_MODULES[kind]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def _etcd_class(also_listen: str | None) -> type[EtcdCluster]:
    """The harness's etcd, whose members also accept clients on ``also_listen`` (the lab
    gateway), so agents in host namespaces reach them."""

    class LabEtcd(EtcdCluster):
        def _command(self, i: int, state: str) -> list[str]:
            argv = super()._command(i, state)
            if also_listen is None:
                return argv
            m = self.members[i]
            urls = f"{m.client_url},http://{also_listen}:{m.client_port}"
            return [
                f"--listen-client-urls={urls}" if a.startswith("--listen-client-urls=") else a
                for a in argv
            ]

    return LabEtcd


def supports_metrics(kinds: Sequence[str]) -> dict[str, bool]:
    """For each service kind, whether its command line accepts ``--metrics-listen``.

    Asks each console script's ``main(["--help"])`` in this process (argparse prints
    the help and exits): one import per module instead of one interpreter per kind.
    """

    def probe(kind: str) -> bool:
        module = importlib.import_module(SERVICE_MODULES[kind])
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            module.main(["--help"])
        text = out.getvalue()
        return "--metrics-listen" in text and "--metrics-port-file" in text

    return {kind: probe(kind) for kind in kinds}


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment without VIM_* and PG* (they would redirect a child), plus ``extra``;
    PYTHONPATH holds the repository so ``python -m`` works inside namespaces too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIM_", "PG"))}
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    return env | extra


class LocalCluster:
    """A local multi-host VIM. Build it, then :meth:`start`; always :meth:`stop` (or use
    ``with``)."""

    def __init__(self, directory: Path, config: ClusterConfig) -> None:
        self.dir = directory.resolve()
        self.config = config.validate()
        self.logs = self.dir / "logs"
        self.pki = self.dir / "pki"
        self.lab: NetnsLab | None = None
        self.etcd: EtcdCluster | None = None
        self.pg: PostgresServer | None = None
        self.pg_standby: PostgresServer | None = None
        self.switches: dict[str, OvsSwitch | None] = {}
        self.children: list[_Child] = []
        self.without_metrics: list[str] = []
        self.address = "127.0.0.1"
        self.operator_token_file = self.dir / "operator.token"
        self._metrics_ok: dict[str, bool] = {}
        self.timings: dict[str, float] = {}
        """Seconds each start phase took (also in cluster.json)."""
        self._stopped = False
        self._started = False

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Start everything and write the state files; see the module docstring."""
        if self._started:
            raise ClusterError("already started")
        self._started = True
        for d in (self.dir, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self.stop()
            if isinstance(exc, HarnessError):
                raise ClusterError(str(exc)) from exc
            raise

    def _start(self) -> None:
        c = self.config
        kinds = ["api", "scheduler", "faultd", "sdn"] + (["agent"] if c.hosts else [])
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
            probe = pool.submit(supports_metrics, kinds) if c.metrics else None
            database = pool.submit(self._timed, "postgres", self._start_postgres)
            if c.hosts:
                self.lab = self._timed("netns", lambda: NetnsLab.start(c.hosts, gateway=True))
                assert self.lab.gateway_ip is not None
                self.address = self.lab.gateway_ip
            self._timed("secrets", self._write_secrets)
            etcd = _etcd_class(self.lab.gateway_ip if self.lab else None)
            self.etcd = self._timed("etcd", lambda: etcd.start(c.etcd_members, tuned=c.etcd_tuned))
            self._metrics_ok = probe.result() if probe is not None else dict.fromkeys(kinds, False)
            self.without_metrics = [k for k in kinds if c.metrics and not self._metrics_ok[k]]
            database.result()
        started = time.monotonic()
        self._start_api_nodes()
        for kind, count in (("scheduler", c.schedulers), ("faultd", c.faultds), ("sdn", c.sdns)):
            for i in range(count):
                self._spawn_service(kind, i)
        for host in self.lab.hosts if self.lab else []:
            self.switches[host.name] = OvsSwitch.start(netns=host.netns) if c.ovs else None
        # Agents are told the API nodes' ports: those must be known first.
        self._wait_listening([ch for ch in self.children if ch.kind == "api"])
        for host in self.lab.hosts if self.lab else []:
            self._spawn_agent(host)
        self._wait_listening(self.children)
        self.timings["services"] = round(time.monotonic() - started, 2)
        self.write_files(state="started")

    def _timed(self, what: str, step: Callable[[], _T]) -> _T:
        started = time.monotonic()
        try:
            return step()
        finally:
            self.timings[what] = round(time.monotonic() - started, 2)

    def _start_postgres(self) -> None:
        c = self.config
        base = c.base_port + _PG_OFFSET if c.base_port else None
        self.pg = PostgresServer.start(fsync=c.pg_fsync, port=base)
        self.pg.create_database(DATABASE)
        from vim.eventlog import migrating

        migrating.upgrade(self.pg.sqlalchemy_url(DATABASE))
        if c.pg_standby:
            port = c.base_port + _PG_OFFSET + 1 if c.base_port else None
            self.pg_standby = PostgresServer.start_standby(self.pg, port=port)

    def _write_secrets(self) -> None:
        """The token secret, the operator's and agents' tokens, and (TLS) the PKI."""
        from vim.api.auth import Authenticator

        secret = base64.b64encode(secrets.token_bytes(48))
        self._private(self.dir / "auth.secret", secret)
        auth = Authenticator(secret)
        token = auth.mint("operator", "admin", ["admin"], ttl_s=TOKEN_TTL_S)
        self._private(self.operator_token_file, token.encode())
        for i in range(self.config.hosts):
            host = self._hostname(i)
            self._private(
                self.dir / f"{host}.token", auth.mint_agent(host, ttl_s=TOKEN_TTL_S).encode()
            )
        if not self.config.tls:
            return
        from vim.security import certs

        certs.make_ca(self.pki)
        certs.issue(self.pki, "api", ["127.0.0.1", "localhost", self.address])
        certs.issue(self.pki, "operator", ["operator"], client=True)
        for i in range(self.config.hosts):
            certs.issue(self.pki, self._hostname(i), [self._hostname(i)], client=True)

    @staticmethod
    def _private(path: Path, data: bytes) -> None:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as sink:
            sink.write(data + b"\n")

    def _hostname(self, index: int) -> str:
        return self.lab.hosts[index].name if self.lab else f"host{index + 1}"

    def _port(self, kind: str, index: int) -> int:
        return self.config.base_port + _OFFSETS[kind] + index if self.config.base_port else 0

    def _metrics_args(
        self, kind: str, name: str, address: str, index: int
    ) -> tuple[list[str], Path | None]:
        if not self._metrics_ok.get(kind):
            return (["--metrics-listen", "off"] if kind == "api" else []), None
        port_file = self.logs / f"{name}.metrics-port"
        port_file.unlink(missing_ok=True)
        offset_kind = "api-metrics" if kind == "api" else kind
        listen = f"{address}:{self._port(offset_kind, index)}"
        return ["--metrics-listen", listen, "--metrics-port-file", str(port_file)], port_file

    def _etcd_endpoints(self, address: str | None = None) -> str:
        assert self.etcd is not None
        if address is None:
            return ",".join(self.etcd.endpoints)
        return ",".join(f"{address}:{m.client_port}" for m in self.etcd.members)

    def _common_env(self) -> dict[str, str]:
        return {
            "VIM_ETCD_ENDPOINTS": self._etcd_endpoints(),
            "VIM_LOG_LEVEL": self.config.log_level,
        }

    def _popen(
        self, argv: list[str], log: Path, env: dict[str, str], netns: str = ""
    ) -> subprocess.Popen[bytes]:
        full = ["ip", "netns", "exec", netns, *argv] if netns else argv
        with log.open("ab") as sink:
            sink.write(f"### vim-cluster: {' '.join(argv)}\n".encode())
            sink.flush()
            return subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=_child_env(env),
                start_new_session=True,
            )

    def _start_api_nodes(self) -> None:
        assert self.pg is not None
        for i in range(self.config.api_nodes):
            name = f"api-{i + 1}"
            port_file = self.logs / f"{name}.port"
            port_file.unlink(missing_ok=True)
            metrics, metrics_file = self._metrics_args("api", name, self.address, i)
            argv = [
                *launcher("api"),
                "--listen", f"{self.address}:{self._port('api', i)}",
                "--port-file", str(port_file),
                "--eventlog-url", self.pg.sqlalchemy_url(DATABASE),
                "--auth-secret-file", str(self.dir / "auth.secret"),
                "--workers", str(self.config.api_workers),
                "--grace", "1",
                *metrics,
                *self._tls_server_args(),
            ]  # fmt: skip
            log = self.logs / f"{name}.log"
            proc = self._popen(argv, log, self._common_env())
            self.children.append(
                _Child("api", name, proc, log, port_file, metrics_file, self.address)
            )

    def _tls_server_args(self) -> list[str]:
        if not self.config.tls:
            return ["--insecure"]
        return [
            "--tls-cert", str(self.pki / "api.pem"),
            "--tls-key", str(self.pki / "api.key"),
            "--tls-client-ca", str(self.pki / "ca.pem"),
        ]  # fmt: skip

    def _spawn_service(self, kind: str, index: int) -> None:
        assert self.pg is not None
        name = f"{kind}-{index + 1}"
        metrics, metrics_file = self._metrics_args(kind, name, self.address, index)
        argv = [
            *launcher(kind),
            "--eventlog-url", self.pg.sqlalchemy_url(DATABASE),
            "--etcd", self._etcd_endpoints(),
            "--log-level", self.config.log_level,
            *metrics,
        ]  # fmt: skip
        if kind == "scheduler":
            argv += ["--lease-ttl", str(self.config.scheduler_lease_ttl_s)]
        elif kind == "faultd":
            argv += ["--lease-ttl", str(self.config.agent_ttl_s), "--name", name]
        elif kind == "sdn":
            argv += ["--name", name]
        log = self.logs / f"{name}.log"
        proc = self._popen(argv, log, self._common_env())
        self.children.append(_Child(kind, name, proc, log, None, metrics_file, self.address))

    def _spawn_agent(self, host: LabHost) -> None:
        c = self.config
        assert self.lab is not None and self.lab.gateway_ip is not None
        gw = self.lab.gateway_ip
        hdir = self.dir / "hosts" / host.name
        hdir.mkdir(parents=True, exist_ok=True)
        uri = write_test_node(hdir / "node.xml", cpus=c.host_vcpus, memory_mib=c.host_ram_mb)
        api = ",".join(f"{gw}:{ch.port}" for ch in self.children if ch.kind == "api")
        metrics, metrics_file = self._metrics_args(
            "agent", f"agent-{host.name}", host.mgmt_ip, host.index
        )
        argv = [
            *launcher("agent"),
            "--hostname", host.name,
            "--zone", c.zone_of(host.index),
            "--api", api,
            "--token-file", str(self.dir / f"{host.name}.token"),
            "--etcd", self._etcd_endpoints(gw),
            "--libvirt-uri", uri,
            "--state-dir", str(hdir / "state"),
            "--management-address", host.mgmt_ip,
            "--ttl", str(c.agent_ttl_s),
            "--resync", str(c.agent_resync_s),
            "--vcpus", str(c.host_vcpus),
            "--ram-mb", str(c.host_ram_mb),
            "--status-file", str(hdir / "status.json"),
            "--log-level", c.log_level,
            *metrics,
        ]  # fmt: skip
        switch = self.switches.get(host.name)
        if switch is not None:
            argv += [
                "--ovs", str(switch.db_socket),
                "--ovs-run-dir", str(switch.run_dir),
                "--underlay-device", host.data_device,
                "--underlay-ip", host.data_ip,
            ]  # fmt: skip
        if c.tls:
            argv += [
                "--tls-ca", str(self.pki / "ca.pem"),
                "--tls-cert", str(self.pki / f"{host.name}.pem"),
                "--tls-key", str(self.pki / f"{host.name}.key"),
            ]  # fmt: skip
        log = self.logs / f"agent-{host.name}.log"
        env = {"VIM_ETCD_ENDPOINTS": self._etcd_endpoints(gw), "VIM_LOG_LEVEL": c.log_level}
        proc = self._popen(argv, log, env, netns=host.netns)
        child = _Child("agent", host.name, proc, log, None, metrics_file, host.mgmt_ip, host.netns)
        child.extra = {
            "zone": c.zone_of(host.index),
            "mgmt_ip": host.mgmt_ip,
            "data_ip": host.data_ip,
        }
        self.children.append(child)

    def _wait_listening(self, children: list[_Child], timeout: float = START_TIMEOUT_S) -> None:
        """Until every child has written its port files (API nodes serve once theirs
        exists); a child that exits meanwhile fails the start with its log."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = []
            for ch in children:
                if not ch.running():
                    raise ch.fail("exited during start")
                ch.port = ch.port or _read_port(ch.port_file)
                ch.metrics_port = ch.metrics_port or _read_port(ch.metrics_port_file)
                if (ch.port_file and not ch.port) or (ch.metrics_port_file and not ch.metrics_port):
                    waiting.append(ch)
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise waiting[0].fail(f"wrote no port file within {timeout:.0f} s")
            time.sleep(0.1)

    # --------------------------------------------------------------- access
    @property
    def api_endpoints(self) -> list[str]:
        """``address:port`` of every API node (the gateway address with agent hosts)."""
        return [f"{ch.address}:{ch.port}" for ch in self.children if ch.kind == "api"]

    def members(self) -> list[Member]:
        """Every process of the cluster, in start order."""
        out: list[Member] = []
        if self.etcd is not None:
            for m in self.etcd.members:
                out.append(
                    Member(
                        "etcd", m.name, m.process.pid if m.process else None, m.endpoint,
                        metrics=m.endpoint, log=str(m.log_path), match="etcd",
                    )
                )  # fmt: skip
        for role, pg in (("primary", self.pg), ("standby", self.pg_standby)):
            if pg is not None:
                out.append(
                    Member(
                        "postgres", f"postgres-{role}", pg.postmaster_pid(),
                        f"{pg.host}:{pg.port}", log=str(pg.log_path), match="postgres",
                        extra={"role": role, "data_dir": str(pg.data_dir)},
                    )
                )  # fmt: skip
        for name, sw in self.switches.items():
            if sw is not None:
                out.append(
                    Member(
                        "ovs", f"ovs-{name}", sw.vswitchd_pid, str(sw.db_socket),
                        log=str(sw.vswitchd_log), netns=sw.netns or "", match="ovs-vswitchd",
                    )
                )  # fmt: skip
        for ch in self.children:
            out.append(
                Member(
                    ch.kind, ch.name, ch.proc.pid,
                    f"{ch.address}:{ch.port}" if ch.port else "",
                    metrics=f"{ch.address}:{ch.metrics_port}" if ch.metrics_port else "",
                    log=str(ch.log), netns=ch.netns, match=SERVICE_MODULES[ch.kind],
                    extra=dict(ch.extra),
                )
            )  # fmt: skip
        return out

    def metrics_targets(self) -> list[Member]:
        """Members that serve Prometheus metrics (etcd serves its own on the client port)."""
        return [m for m in self.members() if m.metrics]

    # ------------------------------------------------------------- files
    def write_files(self, *, state: str) -> None:
        """``cluster.json``, ``vimctl.toml`` and ``prometheus-targets.json`` in the directory."""
        members = self.members()
        write_state(
            self.dir,
            {
                "version": STATE_VERSION,
                "state": state,
                "supervisor_pid": os.getpid(),
                "tls": self.config.tls,
                "address": self.address,
                "lab_tag": self.lab.tag if self.lab else "",
                "namespaces": [h.netns for h in self.lab.hosts] if self.lab else [],
                "postgres_dirs": [str(p.base_dir) for p in (self.pg, self.pg_standby) if p],
                "temp_dirs": [str(d) for d in self._temp_dirs()],
                "pg_bindir": str(find_bindir()),
                "eventlog_url": self.pg.sqlalchemy_url(DATABASE) if self.pg else "",
                "standby_url": (
                    self.pg_standby.sqlalchemy_url(DATABASE) if self.pg_standby else ""
                ),
                "etcd_endpoints": self.etcd.endpoints if self.etcd else [],
                "without_metrics": self.without_metrics,
                "start_timings_s": self.timings,
                "members": members_json(members),
            },
        )
        (self.dir / "vimctl.toml").write_text(self.vimctl_profile(), encoding="utf-8")
        targets = [
            {
                "targets": [m.metrics],
                "labels": {
                    "service": f"vim-{m.kind}" if m.kind != "etcd" else "etcd",
                    "member": m.name,
                },
            }
            for m in members
            if m.metrics
        ]
        (self.dir / "prometheus-targets.json").write_text(
            json.dumps(targets, indent=2) + "\n", encoding="utf-8"
        )

    def _temp_dirs(self) -> list[Path]:
        """The harness directories outside ``DIR`` (removed by stop, or by ``down``'s sweep)."""
        dirs = [self.etcd.base_dir] if self.etcd else []
        dirs += [sw.base_dir for sw in self.switches.values() if sw is not None]
        for pg in (self.pg, self.pg_standby):
            if pg is not None:
                dirs += [pg.base_dir] + ([pg.socket_dir] if pg.socket_dir != pg.base_dir else [])
        return dirs

    def vimctl_profile(self) -> str:
        """A vimctl config file (profile ``default``) for this cluster."""
        lines = [
            "# Written by vim-cluster: `vimctl --config THIS_FILE cluster status`",
            "[default]",
            "endpoints = [" + ", ".join(f'"{e}"' for e in self.api_endpoints) + "]",
            f'token_file = "{self.operator_token_file}"',
        ]
        if self.config.tls:
            lines += [
                f'ca = "{self.pki / "ca.pem"}"',
                f'cert = "{self.pki / "operator.pem"}"',
                f'key = "{self.pki / "operator.key"}"',
            ]
        else:
            lines.append("insecure = true")
        return "\n".join(lines) + "\n"

    # ----------------------------------------------------------- health
    def cluster_status(self, timeout_s: float = 5.0) -> Any:
        """``Admin.GetClusterStatus`` from the first API node that answers (as the operator)."""
        import grpc

        from vim._gen.vim.v1 import admin_pb2, admin_pb2_grpc

        token = self.operator_token_file.read_text().strip()
        last: Exception | None = None
        for endpoint in self.api_endpoints:
            with self._channel(endpoint) as channel:
                try:
                    return admin_pb2_grpc.AdminStub(channel).GetClusterStatus(
                        admin_pb2.GetClusterStatusRequest(),
                        metadata=(("authorization", f"Bearer {token}"),),
                        timeout=timeout_s,
                    )
                except grpc.RpcError as exc:
                    last = exc
        raise ClusterError(f"no API node answered GetClusterStatus: {last}")

    def _channel(self, endpoint: str) -> Any:
        import grpc

        if not self.config.tls:
            return grpc.insecure_channel(endpoint)
        creds = grpc.ssl_channel_credentials(
            root_certificates=(self.pki / "ca.pem").read_bytes(),
            private_key=(self.pki / "operator.key").read_bytes(),
            certificate_chain=(self.pki / "operator.pem").read_bytes(),
        )
        return grpc.secure_channel(endpoint, creds)

    def unhealthy(self) -> list[str]:
        """What is not healthy right now (empty: every member is)."""
        problems = [
            f"{ch.kind} {ch.name} exited ({ch.proc.returncode})"
            for ch in self.children
            if not ch.running()
        ]
        try:
            status = self.cluster_status()
        except ClusterError as exc:
            return [*problems, str(exc)]
        if not status.event_log.reachable:
            problems.append(f"event log: {status.event_log.error}")
        problems += [f"etcd {m.endpoint}: {m.error}" for m in status.etcd if not m.healthy]
        if len(status.etcd) != self.config.etcd_members:
            problems.append(f"etcd: {len(status.etcd)} members reported")
        alive = {a.hostname for a in status.agents if a.alive}
        hosts = {h.name for h in self.lab.hosts} if self.lab else set()
        problems += [f"agent {h} not alive" for h in sorted(hosts - alive)]
        counts = {
            "scheduler": self.config.schedulers,
            "faultd": self.config.faultds,
            "sdn": self.config.sdns,
        }
        problems += [
            f"no {leader.role} leader ({leader.error})"
            for leader in status.leaders
            if counts.get(leader.role, 0) and not leader.holder
        ]
        return problems

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Until :meth:`unhealthy` is empty; :class:`ClusterError` with the problems if not."""
        deadline = time.monotonic() + timeout
        while True:
            problems = self.unhealthy()
            if not problems:
                return
            if any(not ch.running() for ch in self.children) or time.monotonic() > deadline:
                dead = next((ch for ch in self.children if not ch.running()), None)
                tail = f"\n{log_tail(dead.log, 30)}" if dead else ""
                raise ClusterError("cluster not healthy: " + "; ".join(problems) + tail)
            time.sleep(0.5)

    def dead_children(self) -> list[str]:
        """Services that exited on their own (the supervisor reports them)."""
        return [
            f"{ch.kind} {ch.name} ({ch.proc.returncode})"
            for ch in self.children
            if not ch.running()
        ]

    # ------------------------------------------------------------- stop
    def stop(self) -> None:
        """Stop everything this cluster started (see the module docstring). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[str] = []
        agents = [ch for ch in self.children if ch.kind == "agent"]
        others = [ch for ch in self.children if ch.kind not in ("agent", "api")]
        apis = [ch for ch in self.children if ch.kind == "api"]
        for group in (agents, others, apis):
            errors += _terminate(group)
        steps: list[tuple[str, Callable[[], None]]] = [
            *((f"ovs {n}", sw.stop) for n, sw in self.switches.items() if sw is not None),
        ]
        if self.lab is not None:
            steps.append(("netns lab", self.lab.stop))
        if self.etcd is not None:
            steps.append(("etcd", self.etcd.stop))
        for what, pg in (("standby", self.pg_standby), ("primary", self.pg)):
            if pg is not None:
                steps.append((f"postgres {what}", pg.cleanup))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # keep stopping the rest, report at the end
                errors.append(f"{what}: {exc}")
        with contextlib.suppress(OSError):
            if (self.dir / "cluster.json").exists():
                data = json.loads((self.dir / "cluster.json").read_text())
                data.update(state="stopped", supervisor_pid=0)
                write_state(self.dir, data)
        if errors:
            raise ClusterError("stop: " + "; ".join(errors))

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _terminate(children: list[_Child]) -> list[str]:
    """SIGTERM every child, wait (bounded) on each, SIGKILL stragglers; reap all."""
    for ch in children:
        if ch.running():
            with contextlib.suppress(ProcessLookupError):
                ch.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    errors = []
    for ch in children:
        try:
            ch.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(ch.proc.pid, signal.SIGKILL)
            try:
                ch.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"{ch.kind} {ch.name} did not die")
        # Its session may hold helpers (API workers): nothing of it may outlive the stop.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(ch.proc.pid, signal.SIGKILL)
    return errors
