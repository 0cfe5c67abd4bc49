"""VLAN and flat provider networks across two namespace hosts on a shared underlay.

Each host runs its own ovsdb-server and ovs-vswitchd; there are no tunnels:
provider traffic leaves through br-prv and br-phy onto the underlay link. The
drivers are given what the SDN plan would say: ``vlan-a`` is VLAN 101 and
``vlan-b`` VLAN 102 (their VMs share one subnet, to prove isolation), ``flat``
is untagged; every network has a different local VLAN on each host (on
purpose). Evidence asserted here:

* a VM on host1 pings a VM on host2 on each of the three networks, and host2's
  br-prv counts the packets on the flow that takes VLAN 101 (resp. untagged
  frames) from the underlay: they crossed the wire with the network's VLAN id,
  not the local one; counters on the underlay bridge see VLANs 101 and 102
  and never a host-local tag;
* ``vlan-a`` and ``vlan-b`` are isolated despite the shared subnet;
* ``vlan-x`` is on another physical network (``physnet9``) and got VLAN 101 from
  that network's pool too: the hosts' underlay is ``physnet1``, so it is not
  bridged there, and its VM does not reach ``vlan-a``'s (no flow for it in
  br-prv, no ping);
* ovs-vswitchd SIGKILLed on host2 and started again: br-prv has no flows and
  traffic fails until ``ensure_flows`` (the reconcile step) runs; then it passes.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from vim.agent import netdev
from vim.agent.drivers import NetworkPlanEntry, PortBinding
from vim.agent.ovs_driver import OvsDriver
from vim.harness.netns import LabHost, NetnsLab, netns_exec
from vim.harness.ovs import OvsSwitch
from vim.harness.ports import wait_until

pytestmark = pytest.mark.slow
in_module_loop = pytest.mark.asyncio(loop_scope="module")

VLAN_A, VLAN_B = 101, 102
PHYSNET = "physnet1"
# host -> local VLAN of (vlan-a, vlan-b, flat, vlan-x): different per host on purpose.
LOCAL_VLANS = {"host1": (3, 4, 5, 9), "host2": (6, 7, 8, 10)}
NETWORKS = ("vlan-a", "vlan-b", "flat", "vlan-x")
# (vm, host, network, address); vlan-b shares vlan-a's subnet to prove isolation.
VMS = [
    ("pa1", "host1", "vlan-a", "10.78.0.1"),
    ("pa2", "host2", "vlan-a", "10.78.0.2"),
    ("pb1", "host1", "vlan-b", "10.78.0.3"),
    ("pb2", "host2", "vlan-b", "10.78.0.4"),
    ("pf1", "host1", "flat", "10.79.0.1"),
    ("pf2", "host2", "flat", "10.79.0.2"),
    ("px1", "host1", "vlan-x", "10.78.0.9"),  # vlan-a's subnet and VLAN id, other physnet
]


@dataclass
class Host:
    lab: LabHost
    ovs: OvsSwitch
    driver: OvsDriver

    def local_vlan(self, network: str) -> int:
        return LOCAL_VLANS[self.lab.name][NETWORKS.index(network)]

    def plan(self) -> list[NetworkPlanEntry]:
        return [
            NetworkPlanEntry("vlan-a", "vlan", VLAN_A, self.local_vlan("vlan-a"), PHYSNET),
            NetworkPlanEntry("vlan-b", "vlan", VLAN_B, self.local_vlan("vlan-b"), PHYSNET),
            NetworkPlanEntry("flat", "flat", 0, self.local_vlan("flat"), PHYSNET),
            NetworkPlanEntry("vlan-x", "vlan", VLAN_A, self.local_vlan("vlan-x"), "physnet9"),
        ]


@dataclass
class Vm:
    name: str
    host: str
    ip: str
    netns: str
    binding: PortBinding
    device: str


@dataclass
class Cloud:
    hosts: dict[str, Host]
    vms: dict[str, Vm]


@pytest.fixture(scope="module")
def lab() -> Iterator[NetnsLab]:
    with NetnsLab.start(["host1", "host2"]) as lab:
        yield lab


@pytest.fixture(scope="module")
def switches(lab: NetnsLab) -> Iterator[dict[str, OvsSwitch]]:
    with contextlib.ExitStack() as stack:
        yield {h.name: stack.enter_context(OvsSwitch.start(netns=h.netns)) for h in lab.hosts}


async def _reconcile(host: Host, vms: list[Vm]) -> None:
    """What the agent's reconcile pass does with the switch, in its order."""
    await host.driver.ensure_bridges(host.lab.data_cidr)
    await host.driver.ensure_tunnels([])
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
            ovs.db_socket,
            run_dir=ovs.run_dir,
            underlay_device=h.data_device,
            physical_network=PHYSNET,
            netns=h.netns,
        )
        await drv.connect()
        hosts[h.name] = Host(h, ovs, drv)
    vms = {}
    for i, (name, host, network, ip) in enumerate(VMS):
        mac = f"02:00:00:00:78:{i + 1:02x}"
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
        vms[name] = Vm(name, host, ip, vm_ns, binding, device)
    try:
        for host_ in hosts.values():
            await _reconcile(host_, list(vms.values()))
        yield Cloud(hosts, vms)
    finally:
        for host_ in hosts.values():
            await host_.driver.close()


def _ping(vm: Vm, ip: str, wait: float = 1.0) -> bool:
    out = netns_exec(vm.netns, ["ping", "-c1", "-n", f"-W{wait:g}", ip], check=False)
    return out.returncode == 0


def _reaches(cloud: Cloud, src: str, dst: str, within: float = 10.0) -> None:
    vm = cloud.vms[src]
    wait_until(lambda: _ping(vm, cloud.vms[dst].ip), within, interval=0.2, what=f"{src} -> {dst}")


def _prv_packets(ovs: OvsSwitch, match: str) -> int:
    dump = ovs.ofctl("dump-flows", ovs.mgmt_target("br-prv"), match)
    return sum(int(n) for n in re.findall(r"n_packets=(\d+)", dump))


def _ofport(ovs: OvsSwitch, name: str) -> int:
    return int(ovs.vsctl("get", "Interface", name, "ofport").strip())


_WIRE_TABLE = "vimwire"
_LOCAL_TAGS = sorted({t for tags in LOCAL_VLANS.values() for t in tags})


def _count_wire(lab: NetnsLab) -> None:
    """nftables counters on the underlay bridge: frames by 802.1Q VLAN id."""
    local = ", ".join(map(str, _LOCAL_TAGS))
    script = (
        f"table bridge {_WIRE_TABLE}\n"
        f"delete table bridge {_WIRE_TABLE}\n"
        f"table bridge {_WIRE_TABLE} {{\n"
        "  chain forward {\n"
        "    type filter hook forward priority -10; policy accept;\n"
        f'    vlan id {VLAN_A} counter comment "a"\n'
        f'    vlan id {VLAN_B} counter comment "b"\n'
        f'    vlan id {{ {local} }} counter comment "local"\n'
        "  }\n"
        "}\n"
    )
    netns_exec(lab.underlay_ns, ["nft", "-f", "-"], input=script)


def _wire_counts(lab: NetnsLab) -> dict[str, int]:
    out = lab.underlay_run(["nft", "list", "table", "bridge", _WIRE_TABLE]).stdout
    return {
        name: int(packets)
        for packets, name in re.findall(r'counter packets (\d+) bytes \d+ comment "(\w+)"', out)
    }


@in_module_loop
async def test_vlan_and_flat_traffic_crosses_the_underlay(cloud: Cloud, lab: NetnsLab) -> None:
    _count_wire(lab)
    host2 = cloud.hosts["host2"].ovs
    from_phy = _ofport(host2, "prv-phy")
    tagged = f"in_port={from_phy},dl_vlan={VLAN_A}"
    untagged = f"in_port={from_phy},vlan_tci=0x0000/0x1fff"
    before_a, before_flat = _prv_packets(host2, tagged), _prv_packets(host2, untagged)
    _reaches(cloud, "pa1", "pa2")
    assert _prv_packets(host2, tagged) > before_a  # arrived carrying VLAN 101
    _reaches(cloud, "pb2", "pb1")
    _reaches(cloud, "pf1", "pf2")
    assert _prv_packets(host2, untagged) > before_flat  # arrived untagged
    # On the wire: the networks' VLAN ids, never a host-local tag.
    wire = _wire_counts(lab)
    assert wire["a"] > 0 and wire["b"] > 0
    assert wire["local"] == 0

    # vlan-a and vlan-b share a subnet but not a segment: no ping across, either way.
    assert not _ping(cloud.vms["pa1"], cloud.vms["pb2"].ip)
    assert not _ping(cloud.vms["pb1"], cloud.vms["pa2"].ip)
    assert not _ping(cloud.vms["pa2"], cloud.vms["pb2"].ip)  # same host, other network

    # vlan-x: same VLAN id and subnet as vlan-a, another physical network: not bridged.
    host1 = cloud.hosts["host1"]
    x_local = host1.local_vlan("vlan-x")
    flows = host1.ovs.ofctl("dump-flows", host1.ovs.mgmt_target("br-prv"), "--no-stats")
    assert f"dl_vlan={x_local}" not in flows and f"mod_vlan_vid:{x_local}" not in flows
    assert not _ping(cloud.vms["px1"], cloud.vms["pa2"].ip)
    assert not _ping(cloud.vms["pa2"], cloud.vms["px1"].ip)


@in_module_loop
async def test_vswitchd_restart_needs_provider_flows_reinstalled(cloud: Cloud) -> None:
    _reaches(cloud, "pa1", "pa2")
    host2 = cloud.hosts["host2"]
    host2.ovs.kill_vswitchd()
    host2.ovs.start_vswitchd()
    # Ports and patches live in the database; br-prv (secure) has no flows: it drops.
    assert "cookie=0x" not in host2.ovs.ofctl("dump-flows", host2.ovs.mgmt_target("br-prv"))
    assert not _ping(cloud.vms["pa1"], cloud.vms["pa2"].ip)
    assert not _ping(cloud.vms["pf1"], cloud.vms["pf2"].ip)
    await host2.driver.ensure_flows(host2.plan())
    _reaches(cloud, "pa1", "pa2")
    _reaches(cloud, "pf2", "pf1")
    assert not _ping(cloud.vms["pa1"], cloud.vms["pb2"].ip)
    # A full reconcile pass afterwards changes nothing and keeps traffic flowing.
    flows = host2.ovs.ofctl("dump-flows", host2.ovs.mgmt_target("br-prv"), "--no-stats")
    await _reconcile(host2, list(cloud.vms.values()))
    assert host2.ovs.ofctl("dump-flows", host2.ovs.mgmt_target("br-prv"), "--no-stats") == flows
    assert _ping(cloud.vms["pa1"], cloud.vms["pa2"].ip, wait=2)
