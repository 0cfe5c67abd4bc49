"""Three namespace hosts, each with its own ovsdb-server and ovs-vswitchd, joined by VXLAN.

The drivers are given what the SDN plan would say: network ``net1`` is VXLAN
VNI 1001 with a different local VLAN on each host (on purpose), ``net2`` is
VNI 1002. A "VM" is a veth whose far end sits in its own namespace with an
address (tx offload off on both ends). Evidence asserted here:

* the OVS ports exist with the right tags and external_ids;
* a VM on host1 pings a VM on host2 through the tunnel (host2's br-tun counts
  the packets on its VNI flow), and a VM on host3;
* a VM on net2 is unreachable from net1 even with an address in the same
  subnet, while net2 itself works across hosts;
* ovs-vswitchd SIGKILLed on host2 and started again: traffic fails until
  ``ensure_flows`` (the reconcile step) runs, then passes again;
* removing everything leaves no port and no tunnel.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from vim.agent import netdev
from vim.agent.drivers import NetworkPlanEntry, PortBinding, TunnelSpec
from vim.agent.ovs_driver import OvsDriver
from vim.harness.netns import LabHost, NetnsLab, netns_exec
from vim.harness.ovs import OvsSwitch
from vim.harness.ports import wait_until

pytestmark = pytest.mark.slow
in_module_loop = pytest.mark.asyncio(loop_scope="module")

NET1_VNI, NET2_VNI = 1001, 1002
# host -> (net1 local VLAN, net2 local VLAN): different per host on purpose.
LOCAL_VLANS = {"host1": (5, 6), "host2": (7, 8), "host3": (9, 10)}
# (vm, host, network, address); the net2 VM shares net1's subnet to prove isolation.
VMS = [
    ("vm1", "host1", "net1", "10.77.0.1"),
    ("vm2", "host2", "net1", "10.77.0.2"),
    ("vm3", "host3", "net1", "10.77.0.3"),
    ("vm4", "host3", "net2", "10.77.0.4"),
    ("vm5", "host2", "net2", "10.77.0.5"),
]


@dataclass
class Host:
    lab: LabHost
    ovs: OvsSwitch
    driver: OvsDriver

    def plan(self) -> list[NetworkPlanEntry]:
        lv1, lv2 = LOCAL_VLANS[self.lab.name]
        return [
            NetworkPlanEntry("net1", "vxlan", NET1_VNI, lv1),
            NetworkPlanEntry("net2", "vxlan", NET2_VNI, lv2),
        ]

    def local_vlan(self, network: str) -> int:
        return LOCAL_VLANS[self.lab.name][0 if network == "net1" else 1]


@dataclass
class Vm:
    name: str
    host: str
    network: str
    ip: str
    netns: str
    binding: PortBinding
    device: str


@dataclass
class Cloud:
    lab: NetnsLab
    hosts: dict[str, Host]
    vms: dict[str, Vm]


@pytest.fixture(scope="module")
def lab() -> Iterator[NetnsLab]:
    with NetnsLab.start(["host1", "host2", "host3"]) as lab:
        yield lab


@pytest.fixture(scope="module")
def switches(lab: NetnsLab) -> Iterator[dict[str, OvsSwitch]]:
    with contextlib.ExitStack() as stack:
        yield {h.name: stack.enter_context(OvsSwitch.start(netns=h.netns)) for h in lab.hosts}


async def _reconcile(host: Host, cloud_lab: NetnsLab, vms: list[Vm]) -> None:
    """What the agent's reconcile pass does with the switch, in its order."""
    await host.driver.ensure_bridges(host.lab.data_cidr)
    await host.driver.ensure_tunnels(
        [TunnelSpec(o.name, o.data_ip) for o in cloud_lab.hosts if o.name != host.lab.name]
    )
    for vm in vms:
        if vm.host == host.lab.name:
            await host.driver.ensure_port(vm.binding, vm.device)
    await host.driver.ensure_flows(host.plan())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cloud(lab: NetnsLab, switches: dict[str, OvsSwitch]) -> AsyncIterator[Cloud]:
    hosts = {}
    for h in lab.hosts:
        ovs = switches[h.name]
        drv = OvsDriver(
            ovs.db_socket, run_dir=ovs.run_dir, underlay_device=h.data_device, netns=h.netns
        )
        await drv.connect()
        hosts[h.name] = Host(h, ovs, drv)
    vms = {}
    for i, (name, host, network, ip) in enumerate(VMS):
        mac = f"02:00:00:00:77:{i + 1:02x}"
        vm_ns = lab.add_netns(name)
        device = f"tap-{name}"
        netdev.ensure_veth(device, "eth0", netns=lab.host(host).netns, peer_netns=vm_ns)
        netdev.set_link("eth0", address=mac, netns=vm_ns)
        netdev.set_tx_offload(device, netns=lab.host(host).netns)
        netdev.set_tx_offload("eth0", netns=vm_ns)
        netdev.add_address("eth0", f"{ip}/24", netns=vm_ns)
        binding = PortBinding(
            f"port-{name}", f"server-{name}", network, mac, hosts[host].local_vlan(network)
        )
        vms[name] = Vm(name, host, network, ip, vm_ns, binding, device)
    try:
        for host_ in hosts.values():
            await _reconcile(host_, lab, list(vms.values()))
        yield Cloud(lab, hosts, vms)
    finally:
        for host_ in hosts.values():
            await host_.driver.close()


def _ping(vm: Vm, ip: str, wait: float = 1.0) -> bool:
    out = netns_exec(vm.netns, ["ping", "-c1", "-n", f"-W{wait:g}", ip], check=False)
    return out.returncode == 0


def _reaches(cloud: Cloud, src: str, dst: str, within: float = 10.0) -> None:
    """Poll until a ping from ``src`` to ``dst`` passes (ARP and the tunnel's
    neighbour resolution take a moment the first time)."""
    vm = cloud.vms[src]
    wait_until(lambda: _ping(vm, cloud.vms[dst].ip), within, interval=0.2, what=f"{src} -> {dst}")


def _vni_packets(ovs: OvsSwitch, vni: int) -> int:
    dump = ovs.ofctl("dump-flows", ovs.mgmt_target("br-tun"), f"table=2,tun_id={vni}")
    return sum(int(n) for n in re.findall(r"n_packets=(\d+)", dump))


@in_module_loop
async def test_ports_tags_and_traffic_through_the_tunnel(cloud: Cloud) -> None:
    # The OVS ports exist with the right tags and ids.
    for host in cloud.hosts.values():
        listed = {p.port_id: p for p in await host.driver.list_ports()}
        mine = [vm for vm in cloud.vms.values() if vm.host == host.lab.name]
        assert set(listed) == {vm.binding.port_id for vm in mine}
        for vm in mine:
            port = listed[vm.binding.port_id]
            assert port.vlan_tag == host.local_vlan(vm.network)
            assert (port.server_id, port.network_id, port.mac_address) == (
                vm.binding.server_id,
                vm.network,
                vm.binding.mac_address,
            )
            assert port.ofport > 0
            assert host.ovs.vsctl("get", "Port", vm.device, "tag").strip() == str(port.vlan_tag)

    host2 = cloud.hosts["host2"].ovs
    before = _vni_packets(host2, NET1_VNI)
    _reaches(cloud, "vm1", "vm2")
    assert _vni_packets(host2, NET1_VNI) > before  # it came out of a VXLAN tunnel on VNI 1001
    _reaches(cloud, "vm1", "vm3")
    _reaches(cloud, "vm3", "vm2")
    # net2 works across hosts, and is invisible from net1 despite the shared subnet.
    _reaches(cloud, "vm5", "vm4")
    assert not _ping(cloud.vms["vm1"], cloud.vms["vm4"].ip)
    assert not _ping(cloud.vms["vm2"], cloud.vms["vm5"].ip)  # same host, other network


_SINK = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
srv.settimeout(20)
conn, _ = srv.accept()
conn.settimeout(20)
total = 0
while chunk := conn.recv(65536):
    total += len(chunk)
conn.sendall(str(total).encode())
conn.close()
"""

_SOURCE = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20) as conn:
    conn.sendall(b"x" * int(sys.argv[3]))
    conn.shutdown(socket.SHUT_WR)
    print(conn.recv(64).decode())
"""


def test_tcp_crosses_the_tunnel_with_full_size_segments(cloud: Cloud) -> None:
    """TCP needs tx offload off on the VM veths and room for 1500-byte frames plus
    VXLAN on the underlay (MTU 1600): a 4 MiB transfer arrives whole."""
    _reaches(cloud, "vm3", "vm1")
    server, client = cloud.vms["vm1"], cloud.vms["vm3"]
    size = 4 << 20
    sink = subprocess.Popen(
        ["ip", "netns", "exec", server.netns, sys.executable, "-c", _SINK, server.ip],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        port = sink.stdout.readline().strip()
        sent = netns_exec(
            client.netns, [sys.executable, "-c", _SOURCE, server.ip, port, str(size)], timeout=30
        )
        assert sent.stdout.strip() == str(size)
        assert sink.wait(timeout=20) == 0
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()


@in_module_loop
async def test_vswitchd_restart_needs_flows_reinstalled(cloud: Cloud) -> None:
    _reaches(cloud, "vm1", "vm2")
    host2 = cloud.hosts["host2"]
    host2.ovs.kill_vswitchd()
    assert not _ping(cloud.vms["vm1"], cloud.vms["vm2"].ip)
    host2.ovs.start_vswitchd()
    # Ports and tunnels are back (they live in the database); br-tun has no flows.
    assert {p.port_id for p in await host2.driver.list_ports()} == {"port-vm2", "port-vm5"}
    assert "cookie=0x" not in host2.ovs.ofctl("dump-flows", host2.ovs.mgmt_target("br-tun"))
    assert not _ping(cloud.vms["vm1"], cloud.vms["vm2"].ip)
    await host2.driver.ensure_flows(host2.plan())
    _reaches(cloud, "vm1", "vm2")
    _reaches(cloud, "vm5", "vm4")
    # A full reconcile pass afterwards changes nothing and keeps traffic flowing.
    await _reconcile(host2, cloud.lab, list(cloud.vms.values()))
    assert _ping(cloud.vms["vm1"], cloud.vms["vm2"].ip, wait=2)


@in_module_loop
async def test_removing_everything_leaves_no_port(cloud: Cloud) -> None:
    for vm in cloud.vms.values():
        host = cloud.hosts[vm.host]
        await host.driver.remove_port(vm.binding.port_id)
        await host.driver.remove_port(vm.binding.port_id)
        netdev.delete_link(vm.device, netns=host.lab.netns)
    for host in cloud.hosts.values():
        await host.driver.ensure_tunnels([])
        await host.driver.ensure_flows([])
        assert await host.driver.list_ports() == []
        assert sorted(host.ovs.vsctl("list-ports", "br-int").split()) == ["int-prv", "patch-tun"]
        assert host.ovs.vsctl("list-ports", "br-tun").split() == ["patch-int"]
        for vm in cloud.vms.values():
            if vm.host == host.lab.name:
                assert not netdev.link_exists(vm.device, host.lab.netns)
