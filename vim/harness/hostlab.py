"""A failover lab: a control plane in the root namespace and agent hosts in namespaces.

Role: the host-failure evidence (``bench.host_failover``,
``tests/integration/test_partition.py``) needs every piece real and separate::

    lab = HostLab.start(workdir, eventlog_url, ["host1", "host2", "host3"])
    lab.cut("host2")          # its links go down inside its namespace
    lab.kill_agent("host2")   # then its agent (and the test:/// domains inside it) dies
    lab.restore("host2")      # links up again, a fresh agent, its BMC registered again
    lab.stop()

What runs:

* a :class:`~vim.harness.netns.NetnsLab` with a root-namespace gateway; every
  control-plane listener binds the gateway address (``.1`` of the management
  subnet), which the hosts reach and nothing beyond this machine does;
* one etcd member (clients on 127.0.0.1 and the gateway); ``etcd_tuned``
  gives ``--heartbeat-interval=100 --election-timeout=500``, whose smallest
  lease TTL is 1 s instead of 2 s;
* one ``vim-api`` process (``--insecure``, one worker), one ``vim-scheduler``
  and one ``vim-faultd`` process, each elected through etcd, on the given event
  log (PostgreSQL);
* per host: its namespace and its ``vim-agent`` inside it, on its own libvirt
  ``test:///PATH`` node (the domains live inside the agent's connection, so
  they die with the agent) and ``--ovs none``; it answers the fault manager's
  UDP heartbeats on its management address (the agent's default, any free
  port; ``faultd_args`` such as ``--suspect-after 0`` tune or disable the
  fault manager's side). A host in ``bmc_hosts`` is
  registered with ``bmc_endpoint=netns://<namespace>`` (fenced by
  ``NetnsPowerDriver``); the others have no endpoint (self-fencing only).

Invariants:

* An agent registers its host itself, and that registration carries no BMC
  endpoint; :meth:`HostLab.start_agent` waits for the agent's first pass (it
  registers before it) and only then registers the endpoint as the admin, so
  the endpoint is what the log holds whenever a round begins.
* Every wait is on a condition with a deadline; a child that exits while being
  waited for raises :class:`~vim.harness.ports.HarnessError` with its log tail.
* :meth:`HostLab.stop` kills agents, services, the lab's namespaces and etcd
  (SIGKILL, waiting on each child) and is idempotent; the event log's database
  is the caller's.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from vim._gen.vim.v1 import hosts_pb2, hosts_pb2_grpc
from vim.api.auth import Authenticator
from vim.harness.etcd import EtcdCluster
from vim.harness.netns import LabHost, NetnsLab, netns_exec
from vim.harness.ports import HarnessError, log_tail
from vim.harness.testnode import write_test_node

__all__ = ["HostLab", "LabAgent"]

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0
PARTITION_TABLE = "vimpartition"
_BIN = Path(sys.executable).parent


def _gateway_etcd(gateway: str) -> type[EtcdCluster]:
    """The harness's etcd whose members also accept clients on the lab gateway."""

    class GatewayEtcd(EtcdCluster):
        def _command(self, i: int, state: str) -> list[str]:
            argv = super()._command(i, state)
            m = self.members[i]
            urls = f"{m.client_url},http://{gateway}:{m.client_port}"
            return [
                f"--listen-client-urls={urls}" if a.startswith("--listen-client-urls=") else a
                for a in argv
            ]

    return GatewayEtcd


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIM_", "PG"))}
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    return env


@dataclass
class LabAgent:
    """One host's agent process and what it last wrote to its status file."""

    host: LabHost
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def name(self) -> str:
        return self.host.name

    @property
    def status_file(self) -> Path:
        return self.workdir / "status.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "agent.log"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def status(self) -> dict[str, Any] | None:
        """The agent's last status file (None before its first pass or if unreadable)."""
        try:
            data: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
        return data

    def running(self) -> set[str]:
        """Server ids whose domain runs on this host's node, as its living agent last wrote
        (a dead agent's ``test:///`` node died with it: nothing runs there)."""
        if not self.alive():
            return set()
        status = self.status()
        if status is None:
            return set()
        return {sid for sid, power in status["domains"].items() if power == "RUNNING"}

    def kill(self) -> None:
        """SIGKILL the agent and reap it (its domains die with its libvirt connection)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=15)


@dataclass
class HostLab:
    """See the module docstring. Build it with :meth:`start`."""

    workdir: Path
    eventlog_url: str
    lab: NetnsLab
    etcd: EtcdCluster
    auth: Authenticator
    secret_file: Path
    agent_ttl_s: int
    bmc_hosts: frozenset[str]
    agent_args: tuple[str, ...] = ()
    api_address: str = ""
    services: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agents: dict[str, LabAgent] = field(default_factory=dict)
    _stopped: bool = False

    @classmethod
    def start(
        cls,
        workdir: Path,
        eventlog_url: str,
        hosts: Sequence[str] = ("host1", "host2", "host3"),
        *,
        agent_ttl_s: int = 2,
        etcd_tuned: bool = False,
        bmc_hosts: Iterable[str] | None = None,
        faultd_args: Sequence[str] = (),
        agent_args: Sequence[str] = (),
    ) -> HostLab:
        """Start everything; return once every agent has registered (see the docstring)."""
        workdir.mkdir(parents=True, exist_ok=True)
        secret = base64.b64encode(secrets.token_bytes(48))
        secret_file = workdir / "auth.secret"
        secret_file.write_bytes(secret + b"\n")
        lab = NetnsLab.start(list(hosts), gateway=True)
        assert lab.gateway_ip is not None
        try:
            etcd = _gateway_etcd(lab.gateway_ip).start(1, workdir, tuned=etcd_tuned)
        except BaseException:
            lab.stop()
            raise
        self = cls(
            workdir=workdir,
            eventlog_url=eventlog_url,
            lab=lab,
            etcd=etcd,
            auth=Authenticator(secret),
            secret_file=secret_file,
            agent_ttl_s=agent_ttl_s,
            bmc_hosts=frozenset(hosts if bmc_hosts is None else bmc_hosts),
            agent_args=tuple(agent_args),
        )
        try:
            self._start_services(faultd_args)
            for h in lab.hosts:
                self.agents[h.name] = LabAgent(h, workdir / h.name)
            for name in self.agents:
                self._spawn_agent(name)
            for name in self.agents:
                self._registered(name)
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------ control plane
    @property
    def gateway(self) -> str:
        assert self.lab.gateway_ip is not None
        return self.lab.gateway_ip

    def etcd_endpoints(self, address: str | None = None) -> str:
        return ",".join(f"{address or '127.0.0.1'}:{m.client_port}" for m in self.etcd.members)

    def admin_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer " + self.auth.mint("ops", "ops", ["admin"])),)

    def member_metadata(self, tenant: str = "t1") -> tuple[tuple[str, str], ...]:
        token = self.auth.mint("bench", tenant, ["member"])
        return (("authorization", "Bearer " + token),)

    def _popen(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as sink:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=_env(),
                start_new_session=True,
            )
        self.services[name] = proc
        return proc

    def _start_services(self, faultd_args: Sequence[str]) -> None:
        port_file = self.workdir / "api.port"
        port_file.unlink(missing_ok=True)
        self._popen(
            "api",
            [
                *(sys.executable, "-m", "vim.api.server", "--insecure", "--workers", "1"),
                *("--listen", f"{self.gateway}:0", "--port-file", str(port_file)),
                *("--metrics-listen", "off", "--grace", "1"),
                *("--eventlog-url", self.eventlog_url, "--auth-secret-file", str(self.secret_file)),
            ],
        )
        etcd = self.etcd_endpoints()
        self._popen(
            "scheduler",
            [str(_BIN / "vim-scheduler"), "--eventlog-url", self.eventlog_url, "--etcd", etcd],
        )
        self._popen(
            "faultd",
            [
                *(str(_BIN / "vim-faultd"), "--eventlog-url", self.eventlog_url, "--etcd", etcd),
                *("--lease-ttl", str(self.agent_ttl_s), "--name", "faultd-1"),
                *faultd_args,
            ],
        )
        port = self._until("the API's port file", lambda: _read_int(port_file))
        self.api_address = f"{self.gateway}:{port}"

    def _until(self, what: str, probe: Any, timeout_s: float = START_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            for name, proc in self.services.items():
                if proc.poll() is not None:
                    raise HarnessError(
                        f"{name} exited with {proc.returncode} while waiting for {what}\n"
                        f"{log_tail(self.workdir / f'{name}.log')}"
                    )
            got = probe()
            if got:
                return got
            if time.monotonic() > deadline:
                raise HarnessError(f"timed out waiting for {what}")
            time.sleep(0.05)

    # ------------------------------------------------------------------ agents
    def _spawn_agent(self, name: str) -> None:
        agent = self.agents[name]
        agent.workdir.mkdir(parents=True, exist_ok=True)
        agent.status_file.unlink(missing_ok=True)
        agent.starts += 1
        token = agent.workdir / "token"
        token.write_text(self.auth.mint_agent(name, ttl_s=24 * 3600.0))
        uri = write_test_node(agent.workdir / f"node-{agent.starts}.xml", cpus=64, memory_mib=65536)
        argv = [
            *(sys.executable, "-m", "vim.agent.service", "--hostname", name, "--zone", "z1"),
            *("--api", self.api_address, "--token-file", str(token)),
            *("--etcd", self.etcd_endpoints(self.gateway), "--ttl", str(self.agent_ttl_s)),
            *("--libvirt-uri", uri, "--state-dir", str(agent.workdir / "state")),
            *("--management-address", agent.host.mgmt_ip, "--ovs", "none"),
            *("--vcpus", "64", "--ram-mb", "65536", "--disk-gb", "1000"),
            *("--status-file", str(agent.status_file), "--log-level", "INFO"),
            *self.agent_args,
        ]
        argv = ["env", *(f"{k}={v}" for k, v in _env().items() if k == "PYTHONPATH"), *argv]
        agent.proc = agent.host.spawn(argv, agent.log_path)

    def _registered(self, name: str) -> None:
        """Until the agent has made its first pass; then its BMC endpoint, if it has one."""
        agent = self.agents[name]

        def first_pass() -> bool:
            if not agent.alive():
                raise HarnessError(f"agent {name} exited\n{log_tail(agent.log_path)}")
            return agent.status() is not None

        self._until(f"{name}'s first pass", first_pass)
        if name in self.bmc_hosts:
            self.register_bmc(name, f"netns://{agent.host.netns}")

    def register_bmc(self, name: str, endpoint: str) -> None:
        """Register host ``name`` again as the admin, with its spec and ``endpoint``."""
        with grpc.insecure_channel(self.api_address) as ch:
            stub = hosts_pb2_grpc.HostsStub(ch)
            md = self.admin_metadata()
            h = stub.GetHost(hosts_pb2.GetHostRequest(hostname=name), metadata=md, timeout=10)
            if h.bmc_endpoint == endpoint:
                return
            stub.RegisterHost(
                hosts_pb2.RegisterHostRequest(
                    request_id=str(uuid.uuid4()),
                    hostname=name,
                    zone=h.zone,
                    vcpus=h.physical.vcpus,
                    ram_mb=h.physical.ram_mb,
                    disk_gb=h.physical.disk_gb,
                    cpu_allocation_ratio=h.allocation_ratios.cpu,
                    ram_allocation_ratio=h.allocation_ratios.ram,
                    disk_allocation_ratio=h.allocation_ratios.disk,
                    hypervisor_type=h.hypervisor_type,
                    management_address=h.management_address,
                    bmc_endpoint=endpoint,
                    max_instances=h.physical.instances,
                ),
                metadata=md,
                timeout=10,
            )

    def start_agent(self, name: str) -> None:
        """A fresh agent on host ``name`` (a new, empty ``test:///`` node); returns once it
        registered and its BMC endpoint is registered again."""
        self._spawn_agent(name)
        self._registered(name)

    def kill_agent(self, name: str) -> None:
        self.agents[name].kill()

    # --------------------------------------------------------------- faults
    def _links(self, name: str) -> list[str]:
        out = netns_exec(self.lab.host(name).netns, ["ip", "-o", "link", "show"]).stdout
        return [
            line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line
        ]

    def cut(self, name: str) -> None:
        """Cut host ``name`` off as power loss looks from outside: its links go down inside
        its namespace, so nothing it sends afterwards (a TCP reset included) leaves it."""
        host = self.lab.host(name)
        for dev in (host.mgmt_device, host.data_device):
            netns_exec(host.netns, ["ip", "link", "set", "dev", dev, "down"])

    def restore(self, name: str) -> None:
        """Every link of host ``name`` up again (after a cut or a netns fence)."""
        ns = self.lab.host(name).netns
        for dev in self._links(name):
            netns_exec(ns, ["ip", "link", "set", "dev", dev, "up"])

    def partition(self, name: str) -> None:
        """nftables inside host ``name``: drop everything in and out (its processes live)."""
        script = (
            f"table inet {PARTITION_TABLE} {{\n"
            "  chain input { type filter hook input priority -300; policy drop; }\n"
            "  chain output { type filter hook output priority -300; policy drop; }\n"
            "}\n"
        )
        netns_exec(self.lab.host(name).netns, ["nft", "-f", "-"], input=script)

    def heal(self, name: str) -> None:
        """Delete the partition table of host ``name``."""
        netns_exec(self.lab.host(name).netns, ["nft", "delete", "table", "inet", PARTITION_TABLE])

    # ----------------------------------------------------------------- stop
    def stop(self) -> None:
        """Kill everything this lab started (see the module docstring). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        errors: list[str] = []
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                agent.kill()
        for proc in self.services.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                errors.append(f"pid {proc.pid} did not die")
        for what, step in (("netns lab", self.lab.stop), ("etcd", self.etcd.stop)):
            try:
                step()
            except Exception as exc:  # keep stopping the rest, report at the end
                errors.append(f"{what}: {exc}")
        if errors:
            raise HarnessError("host lab stop: " + "; ".join(errors))


def _read_int(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text(encoding="utf-8").strip())
    return None
