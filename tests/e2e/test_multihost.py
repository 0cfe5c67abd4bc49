"""Three compute hosts, each a network namespace with its own libvirt test node, its own
ovsdb-server and ovs-vswitchd and its own `vim-agent` process, under one control plane.

The API node, the scheduler and the SDN controller run in the test's process on a
SQLite log and listen on the lab's gateway address, which every host reaches over
its management link; tunnels run over the separate data links (VXLAN).

A "VM" NIC is a veth: the host end is named as the domain XML names the tap
(`tap_name(port_id)`) and the agent plugs it into br-int; the far end sits in a
namespace of its own with the port's MAC and IP address (the libvirt test driver
runs no guest). Evidence asserted, through the API only for every change:

* a VXLAN network and three servers; the scheduler spreads them over the hosts;
  each domain exists on exactly its server's host, and each host's OVS has
  exactly its servers' ports, with the plan's local VLAN tag and the port ids;
* traffic passes between server ports on different hosts, through the tunnel;
* an agent SIGKILLed and restarted converges without duplicating anything
  (same domains, same ports, no new report events);
* every agent supervises its host's ovs-vswitchd (`--supervise`, run inside the
  host's namespace): one SIGKILLed is restarted by the agent (a new pid that
  answers), HostServiceFailed then HostServiceRecovered are in the host's log,
  the br-tun flows the restart lost are reinstalled and traffic passes again;
* after every server is deleted, no domain and no port remain on any host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.e2e.test_agents_api import AUTH, MEMBER, SECRET, Catalogue, allocation, populate
from tests.integration.test_agent_supervision import vswitchd_service
from tests.waiting import until
from vim._gen.vim.v1 import compute_pb2, compute_pb2_grpc
from vim.agent.domain_xml import tap_name
from vim.agent.supervisor import SupervisedService, process_alive, read_pid
from vim.api.server import ApiConfig, ApiNode
from vim.harness.netns import LabHost, NetnsLab, netns_exec
from vim.harness.ovs import OvsSwitch
from vim.harness.ports import HarnessError
from vim.harness.testnode import write_test_node
from vim.scheduler.service import SchedulerConfig, SchedulerService
from vim.sdn.service import SdnConfig, SdnService

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
HOSTS = ("host1", "host2", "host3")


@dataclass
class Host:
    lab: LabHost
    ovs: OvsSwitch
    workdir: Path
    api: str
    proc: Any = None
    uri: str = ""

    @property
    def name(self) -> str:
        return self.lab.name

    @property
    def status_file(self) -> Path:
        return self.workdir / "status.json"

    @property
    def vswitchd(self) -> SupervisedService:
        """The host's ovs-vswitchd as its agent supervises it (same pidfile, sockets and
        log as the harness's; restarted with `--detach`, in the agent's namespace)."""
        return vswitchd_service(self.ovs)

    def start_agent(self) -> None:
        self.status_file.unlink(missing_ok=True)
        token = self.workdir / "token"
        token.write_text(AUTH.mint_agent(self.name))
        argv = [
            sys.executable,
            "-m",
            "vim.agent.service",
            "--hostname",
            self.name,
            "--zone",
            "z1",
            "--api",
            self.api,
            "--token-file",
            str(token),
            "--libvirt-uri",
            self.uri,
            "--state-dir",
            str(self.workdir / "state"),
            "--ovs",
            str(self.ovs.db_socket),
            "--ovs-run-dir",
            str(self.ovs.run_dir),
            "--underlay-device",
            self.lab.data_device,
            "--underlay-ip",
            self.lab.data_ip,
            "--resync",
            "2",
            "--status-file",
            str(self.status_file),
            "--supervise",
            json.dumps(
                {
                    "name": self.vswitchd.name,
                    "pidfile": str(self.vswitchd.pidfile),
                    "start": list(self.vswitchd.start),
                    "probe": list(self.vswitchd.probe),
                }
            ),
        ]
        self.proc = self.lab.spawn(["env", f"PYTHONPATH={ROOT}", *argv], self.workdir / "agent.log")

    def kill_agent(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=15)

    def status(self) -> dict[str, Any] | None:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.workdir / "agent.log").read_text(errors="replace")[-3000:]
            raise AssertionError(f"agent of {self.name} exited {self.proc.returncode}:\n{log}")
        try:
            data: dict[str, Any] = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None
        return data

    def domains(self) -> dict[str, str]:
        status = self.status()
        return dict(status["domains"]) if status else {}

    def vim_ports(self) -> dict[str, dict[str, str]]:
        """br-int ports carrying vim external_ids: device -> {tag, port_id, server_id, ...}."""
        # One ovs-vsctl call, one OVSDB transaction: a port removed meanwhile is in neither.
        interfaces, ports = (
            json.loads(line)
            for line in self.ovs.vsctl(
                "--format=json",
                "--columns=name,external_ids",
                "list",
                "Interface",
                "--",
                "--columns=name,tag",
                "list",
                "Port",
            ).splitlines()
            if line.strip()
        )
        tags = {name: tag for name, tag in ports["data"]}
        found = {}
        for name, ids in interfaces["data"]:
            ext = dict(ids[1])
            if "vim-port-id" in ext and name in tags:
                tag = tags[name]
                found[name] = {**ext, "tag": "[]" if isinstance(tag, list) else str(tag)}
        return found


@dataclass
class Cloud:
    lab: NetnsLab
    node: ApiNode
    compute: compute_pb2_grpc.ComputeStub
    catalogue: Catalogue
    hosts: dict[str, Host]
    spare_netns: list[str] = field(default_factory=list)
    """Namespaces for "VMs", made before any gRPC thread runs (see `plug_vm`)."""
    vms: dict[str, str] = field(default_factory=dict)
    """port id -> the VM namespace holding its far end."""

    async def server(self, sid: str) -> compute_pb2.Server:
        return await self.compute.GetServer(
            compute_pb2.GetServerRequest(server_id=sid), metadata=MEMBER
        )

    def plan_tags(self, host: str) -> dict[str, int]:
        """port id -> local VLAN, from the SDN controller's plan in the log."""
        assert self.node.node is not None
        entry = self.node.node.model.get(f"netplan-{host}")
        return {} if entry is None else {p.port_id: p.local_vlan for p in entry.state.ports}

    async def events(self, stream: str) -> list[str]:
        assert self.node.node is not None
        return [e.type for e in await self.node.node.log.read_stream(stream)]

    def plug_vm(self, host: Host, nic: compute_pb2.Nic) -> None:
        """The "guest" end of a server NIC: a veth into a namespace of its own.

        With `ip` commands (fork + exec): pyroute2's namespace helpers fork a Python
        child, which crashes in a process with gRPC threads running.
        """
        vm_ns = self.spare_netns.pop()
        dev, ns = tap_name(nic.port_id), host.lab.netns
        for argv in (
            [
                "ip",
                "-n",
                ns,
                "link",
                "add",
                dev,
                "mtu",
                "1500",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                vm_ns,
            ],
            ["ip", "-n", vm_ns, "link", "set", "eth0", "address", nic.mac_address, "up"],
            ["ip", "-n", ns, "link", "set", dev, "up"],
            ["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"],
            ["ip", "netns", "exec", vm_ns, "ethtool", "-K", "eth0", "tx", "off"],
            ["ip", "-n", vm_ns, "addr", "add", f"{nic.ip_addresses[0]}/24", "dev", "eth0"],
        ):
            netns_exec(None, argv)
        self.vms[nic.port_id] = vm_ns


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    with NetnsLab.start(list(HOSTS), gateway=True) as lab:
        yield lab


@pytest.fixture
def switches(lab: NetnsLab, tmp_path: Path) -> Iterator[dict[str, OvsSwitch]]:
    with contextlib.ExitStack() as stack:
        found = {
            h.name: stack.enter_context(OvsSwitch.start(netns=h.netns, base_dir=tmp_path / "ovs"))
            for h in lab.hosts
        }
        for ovs in found.values():  # before each switch stops (the stack unwinds backwards)
            stack.callback(_kill_restarted_vswitchd, ovs)
        yield found


def _kill_restarted_vswitchd(ovs: OvsSwitch) -> None:
    """SIGKILL an ovs-vswitchd that an agent's supervisor restarted: it detached, so it
    is no child of the harness, which stops only its own. (The agents are dead by now.)"""
    pid = read_pid(vswitchd_service(ovs).pidfile)
    if pid is None or pid == ovs.vswitchd_pid or not process_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"ovs-vswitchd {pid} survived SIGKILL")
        time.sleep(0.02)


@pytest.fixture
async def cloud(
    lab: NetnsLab, switches: dict[str, OvsSwitch], tmp_path: Path
) -> AsyncIterator[Cloud]:
    assert lab.gateway_ip is not None
    spare = [lab.add_netns(f"vm{i}") for i in range(len(HOSTS))]
    node = ApiNode(
        ApiConfig(
            listen=f"{lab.gateway_ip}:0",
            eventlog_url=f"sqlite:///{tmp_path}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
        )
    )
    await node.start()
    assert node.node is not None
    scheduler = SchedulerService(
        node.node.log, node.node.model, config=SchedulerConfig(idle_wait_s=0.2)
    )
    sdn = SdnService(node.node.log, node.node.model, config=SdnConfig(idle_wait_s=0.2))
    tasks = [asyncio.create_task(scheduler.run()), asyncio.create_task(sdn.run())]
    hosts: dict[str, Host] = {}
    try:
        for h in lab.hosts:
            workdir = tmp_path / h.name
            workdir.mkdir()
            host = Host(h, switches[h.name], workdir, node.address)
            host.uri = write_test_node(workdir / "node.xml", cpus=8, memory_mib=16384)
            host.start_agent()
            hosts[h.name] = host
        async with grpc.aio.insecure_channel(node.address) as ch:
            catalogue = await populate(ch)
            yield Cloud(
                lab, node, compute_pb2_grpc.ComputeStub(ch), catalogue, hosts, spare_netns=spare
            )
    finally:
        for host in hosts.values():
            host.kill_agent()
        await scheduler.stop()
        await sdn.stop()
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await node.stop()


def _ping(vm_ns: str, ip: str, wait_s: float = 1.0) -> bool:
    argv = ["ping", "-c1", "-n", f"-W{wait_s:g}", ip]
    return netns_exec(vm_ns, argv, check=False).returncode == 0


async def test_three_hosts_servers_tunnels_restart_and_cleanup(cloud: Cloud) -> None:
    for host in cloud.hosts.values():
        await until(f"{host.name}'s first pass", host.status)

    sids = []
    for i in range(3):
        made = await cloud.compute.AllocateCompute(
            allocation(cloud.catalogue, f"vm{i}"), metadata=MEMBER
        )
        sids.append(made.server_id)
    placed: dict[str, compute_pb2.Server] = {}
    for sid in sids:
        placed[sid] = await until(
            f"{sid} placed", lambda sid=sid: _placed(cloud.server(sid)), timeout_s=30
        )
    assert {s.host for s in placed.values()} == set(HOSTS)  # spread: one per host
    for s in placed.values():
        cloud.plug_vm(cloud.hosts[s.host], s.nics[0])

    # Every domain on exactly its server's host; every server ACTIVE.
    for name, host in cloud.hosts.items():
        mine = {sid for sid, s in placed.items() if s.host == name}
        await until(
            f"{name}'s domains",
            lambda host=host, mine=mine: host.domains() == dict.fromkeys(mine, "RUNNING"),
        )
    for sid in sids:
        await until(
            f"{sid} ACTIVE",
            lambda sid=sid: _state(cloud.server(sid), compute_pb2.SERVER_STATE_ACTIVE),
        )

    # Each host's OVS holds exactly its servers' ports, with the plan's tags and the ids.
    for name, host in cloud.hosts.items():
        mine = {s.nics[0].port_id: s for s in placed.values() if s.host == name}
        ports = await until(
            f"{name}'s ports",
            lambda host=host, mine=mine: (
                (p := host.vim_ports())
                and {x["vim-port-id"] for x in p.values()} == set(mine)
                and p
            ),
        )
        tags = cloud.plan_tags(name)
        for dev, ids in ports.items():
            s = mine[ids["vim-port-id"]]
            assert dev == tap_name(s.nics[0].port_id)
            assert ids["vim-server-id"] == s.server_id
            assert ids["vim-network-id"] == cloud.catalogue.network_id
            assert ids["attached-mac"] == s.nics[0].mac_address.lower()
            assert int(ids["tag"]) == tags[s.nics[0].port_id]

    # Traffic between server ports on different hosts, through the VXLAN tunnels.
    a, b, c = (placed[sid] for sid in sids)
    for src, dst in ((a, b), (b, c), (c, a)):
        await until(
            f"{src.host} -> {dst.host}",
            lambda src=src, dst=dst: asyncio.to_thread(
                _ping, cloud.vms[src.nics[0].port_id], dst.nics[0].ip_addresses[0]
            ),
        )

    # SIGKILL one agent and restart it: it converges without duplicating anything.
    victim = cloud.hosts[b.host]
    domains_before, ports_before = victim.domains(), victim.vim_ports()
    events_before = {sid: await cloud.events(f"server-{sid}") for sid in sids}
    victim.kill_agent()
    victim.start_agent()
    await until("the restarted agent's pass", victim.status)
    await until("the same domains", lambda: victim.domains() == domains_before)
    assert victim.vim_ports() == ports_before
    for sid in sids:
        assert await cloud.events(f"server-{sid}") == events_before[sid]
    await until(
        "traffic again",
        lambda: asyncio.to_thread(_ping, cloud.vms[a.nics[0].port_id], b.nics[0].ip_addresses[0]),
    )

    # SIGKILL ovs-vswitchd on a's host: the agent's supervisor restarts it, the host's log
    # records the outage, the flows the restart lost are reinstalled, a -> b passes again.
    await _vswitchd_killed_and_recovered(cloud, cloud.hosts[a.host], a, b)

    # Delete everything: no domain and no port remain.
    for sid in sids:
        await cloud.compute.TerminateCompute(
            compute_pb2.TerminateComputeRequest(request_id=str(uuid.uuid4()), server_id=sid),
            metadata=MEMBER,
        )
    for host in cloud.hosts.values():
        await until(
            f"{host.name} empty",
            lambda host=host: host.domains() == {} and host.vim_ports() == {},
        )


async def _vswitchd_killed_and_recovered(
    cloud: Cloud, host: Host, src: compute_pb2.Server, dst: compute_pb2.Server
) -> None:
    """SIGKILL `host`'s ovs-vswitchd (`src`'s or `dst`'s host) and watch the agent bring
    it back: restart, log records, flows, then traffic from `src` to `dst`; print when."""
    assert cloud.node.node is not None
    log, stream, service = cloud.node.node.log, f"host-{host.name}", host.vswitchd
    flows = _tun_flows(host.ovs)
    assert flows, "no br-tun flows before the kill"
    events_before = len(await log.read_stream(stream))
    first = read_pid(service.pidfile)
    assert first is not None and process_alive(first)

    os.kill(first, signal.SIGKILL)  # the harness reaps it only at the end: a zombie till then
    killed = time.monotonic()
    await until("the killed ovs-vswitchd gone", lambda: not process_alive(first), timeout_s=5)
    # A new ovs-vswitchd, started by the agent's supervisor (not the harness), answers.
    second = await until(
        "a new ovs-vswitchd answering",
        lambda: (
            (pid := read_pid(service.pidfile)) not in (None, first)
            and process_alive(pid)
            and host.ovs.appctl_rc("version") == 0
            and pid
        ),
        timeout_s=5,
    )
    restarted = time.monotonic() - killed
    # It started with no flows: every one back means the agent's reconcile pass ran.
    await until(
        "the br-tun flows reinstalled", lambda: _tun_flows(host.ovs, ready=False) == flows, 5
    )
    reinstalled = time.monotonic() - killed
    vm, ip = cloud.vms[src.nics[0].port_id], dst.nics[0].ip_addresses[0]
    # A short reply wait, so the figure printed below is not rounded up to whole seconds.
    await until("traffic after the restart", lambda: asyncio.to_thread(_ping, vm, ip, 0.25), 10)
    resumed = time.monotonic() - killed
    # Failed, then recovered: both recorded through the Agents API, in that order.
    events = await until(
        f"HostServiceRecovered in {stream}",
        lambda: _service_events(log, stream, events_before),
        timeout_s=5,
    )
    assert [e.type for e in events] == ["HostServiceFailed", "HostServiceRecovered"], events
    assert all(e.data["service"] == "ovs-vswitchd" for e in events)
    # Seen dead, or its probe cut off by the kill while in flight: both are this outage.
    failed, recovered = events[0].data, events[1].data
    assert f"process {first} is gone" in failed["detail"] or "probe" in failed["detail"], failed
    assert recovered["restarts"] >= 1
    assert read_pid(service.pidfile) == second and process_alive(second)
    print(
        f"ovs-vswitchd (pid {first}) SIGKILLed on {host.name} ({failed['detail']!r}): pid"
        f" {second} answering after {restarted:.2f}s ({recovered['restarts']} restart(s)),"
        f" flows back after {reinstalled:.2f}s, traffic after {resumed:.2f}s"
    )


async def _service_events(log: Any, stream: str, skip: int) -> list[Any]:
    """The host's HostService* events after the first `skip` of its stream, once the
    recovery is among them."""
    events = [e for e in (await log.read_stream(stream))[skip:] if e.type.startswith("HostService")]
    return events if any(e.type == "HostServiceRecovered" for e in events) else []


def _tun_flows(ovs: OvsSwitch, *, ready: bool = True) -> set[str] | None:
    """br-tun's flows as the agent installs them, without counters (each carries the
    agent's cookie; the flows that the learn action adds have none). With `ready`
    False, None while the bridge's OpenFlow socket is not there yet (a restarted
    ovs-vswitchd answers `ovs-appctl` before it has set up its bridges)."""
    try:
        dump = ovs.ofctl("--no-stats", "dump-flows", ovs.mgmt_target("br-tun"))
    except HarnessError:
        if ready:
            raise
        return None
    return {line.strip() for line in dump.splitlines() if "cookie=" in line}


async def _placed(call: Any) -> compute_pb2.Server | None:
    s = await call
    return s if s.host else None


async def _state(call: Any, state: int) -> bool:
    s = await call
    return bool(s.state == state and not s.task)
