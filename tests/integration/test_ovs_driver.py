"""OvsDriver against a real ovsdb-server + ovs-vswitchd (netdev datapath) in a namespace host.

One host: bridges, ports, tunnels and flows are created, repeated (a repeat
changes nothing), changed and removed, and the flows come back after a real
SIGKILL of ovs-vswitchd. The VXLAN data path across hosts is in
``test_ovs_multihost.py``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from vim.agent import netdev
from vim.agent.drivers import NetworkPlanEntry, PortBinding, TunnelSpec
from vim.agent.ovs_driver import OvsDriver
from vim.errors import InvalidInput, Unavailable
from vim.harness.netns import LabHost, NetnsLab
from vim.harness.ovs import OvsSwitch

NET = NetworkPlanEntry("net-a", "vxlan", 1001, 5)


@pytest.fixture
def lab() -> Iterator[NetnsLab]:
    with NetnsLab.start(["h1"]) as lab:
        yield lab


@pytest.fixture
def ovs(lab: NetnsLab) -> Iterator[OvsSwitch]:
    with OvsSwitch.start(netns=lab.host("h1").netns) as ovs:
        yield ovs


@pytest.fixture
def host(lab: NetnsLab) -> LabHost:
    return lab.host("h1")


@pytest.fixture
async def driver(ovs: OvsSwitch, host: LabHost) -> AsyncIterator[OvsDriver]:
    drv = OvsDriver(
        ovs.db_socket, run_dir=ovs.run_dir, underlay_device=host.data_device, netns=host.netns
    )
    await drv.connect()
    yield drv
    await drv.close()


def _decode(value: Any) -> Any:
    """An OVSDB JSON value: ``["map", pairs]`` -> dict, ``["set"|"uuid", x]`` -> x."""
    if isinstance(value, list) and value and value[0] == "map":
        return dict(value[1])
    if isinstance(value, list) and value and value[0] in ("set", "uuid"):
        return value[1]
    return value


def _rows(ovs: OvsSwitch, table: str, columns: str) -> list[dict[str, Any]]:
    """``ovs-vsctl list TABLE`` as dicts of decoded values."""
    out = json.loads(ovs.vsctl("--format=json", f"--columns={columns}", "list", table))
    return [
        {name: _decode(value) for name, value in zip(out["headings"], data, strict=True)}
        for data in out["data"]
    ]


def _config(ovs: OvsSwitch) -> dict[str, list[dict[str, Any]]]:
    """Every row (uuid and configuration columns) of the tables the driver writes."""
    return {
        "Bridge": _rows(ovs, "Bridge", "_uuid,name,datapath_type,fail_mode,ports,external_ids"),
        "Port": _rows(ovs, "Port", "_uuid,name,tag,interfaces"),
        "Interface": _rows(ovs, "Interface", "_uuid,name,type,options,external_ids,mtu_request"),
    }


def _ports(ovs: OvsSwitch, bridge: str) -> list[str]:
    return sorted(ovs.vsctl("list-ports", bridge).split())


def _our_flows(ovs: OvsSwitch) -> list[str]:
    dump = ovs.ofctl("dump-flows", ovs.mgmt_target("br-tun")).splitlines()
    return [line for line in dump if "cookie=0x" in line and "cookie=0x0," not in line]


async def test_ensure_bridges_twice_builds_the_layout_once(
    driver: OvsDriver, ovs: OvsSwitch, host: LabHost
) -> None:
    await driver.ensure_bridges(host.data_cidr)
    first = _config(ovs)
    await driver.ensure_bridges(host.data_cidr)
    assert _config(ovs) == first  # a repeat changes nothing

    bridges = {b["name"]: b for b in first["Bridge"]}
    assert set(bridges) == {"br-int", "br-tun", "br-phy", "br-prv"}
    assert all(b["datapath_type"] == "netdev" for b in bridges.values())
    assert bridges["br-tun"]["fail_mode"] == "secure"
    assert bridges["br-prv"]["fail_mode"] == "secure"
    assert bridges["br-tun"]["external_ids"]["vim-local-ip"] == host.data_ip
    ifaces = {i["name"]: i for i in first["Interface"]}
    assert ifaces["patch-tun"]["type"] == "patch"
    assert ifaces["patch-tun"]["options"] == {"peer": "patch-int"}
    assert ifaces["patch-int"]["options"] == {"peer": "patch-tun"}
    for name, peer in [("int-prv", "prv-int"), ("prv-phy", "phy-prv")]:
        assert (ifaces[name]["type"], ifaces[name]["options"]) == ("patch", {"peer": peer})
        assert ifaces[peer]["options"] == {"peer": name}
    assert ifaces[host.data_device]["mtu_request"] == 1600
    assert _ports(ovs, "br-phy") == sorted([host.data_device, "phy-prv"])
    assert _ports(ovs, "br-int") == ["int-prv", "patch-tun"]
    assert _ports(ovs, "br-prv") == ["prv-int", "prv-phy"]
    assert _ports(ovs, "br-tun") == ["patch-int"]
    # The kernel side: the endpoint address on br-phy, the kernel blind on the underlay link.
    addr = host.run(["ip", "-4", "-o", "addr", "show", "dev", "br-phy"]).stdout
    assert host.data_cidr in addr
    ruleset = host.run(["nft", "list", "table", "netdev", netdev.NFT_TABLE]).stdout
    assert f'device "{host.data_device}"' in ruleset
    assert "policy drop" in ruleset


async def test_ensure_port_twice_gives_one_tagged_port_with_ids(
    driver: OvsDriver, ovs: OvsSwitch, host: LabHost
) -> None:
    await driver.ensure_bridges(host.data_cidr)
    netdev.ensure_tap("tap-a", netns=host.netns)
    binding = PortBinding("port-a", "server-1", "net-a", "02:00:00:00:00:0A", 5)
    await driver.ensure_port(binding, "tap-a")
    before = _config(ovs)
    await driver.ensure_port(binding, "tap-a")
    assert _config(ovs) == before

    assert _ports(ovs, "br-int") == ["int-prv", "patch-tun", "tap-a"]
    port = next(p for p in before["Port"] if p["name"] == "tap-a")
    assert port["tag"] == 5
    iface = next(i for i in before["Interface"] if i["name"] == "tap-a")
    assert iface["external_ids"] == {
        "iface-id": "port-a",
        "vim-port-id": "port-a",
        "vim-server-id": "server-1",
        "vim-network-id": "net-a",
        "attached-mac": "02:00:00:00:00:0a",
    }

    async def listed() -> list[PortBinding]:
        return list(await driver.list_ports())

    ports = await listed()
    assert [(p.port_id, p.server_id, p.network_id, p.vlan_tag) for p in ports] == [
        ("port-a", "server-1", "net-a", 5)
    ]
    assert ports[0].ofport > 0

    # A new tag is applied in place; a new device for the same port replaces the old one.
    await driver.ensure_port(
        PortBinding("port-a", "server-1", "net-a", binding.mac_address, 9), "tap-a"
    )
    assert [p.vlan_tag for p in await listed()] == [9]
    netdev.ensure_tap("tap-b", netns=host.netns)
    await driver.ensure_port(binding, "tap-b")
    assert _ports(ovs, "br-int") == ["int-prv", "patch-tun", "tap-b"]
    assert [p.port_id for p in await listed()] == ["port-a"]


async def test_remove_port_twice_leaves_foreign_ports_alone(
    driver: OvsDriver, ovs: OvsSwitch, host: LabHost
) -> None:
    await driver.ensure_bridges(host.data_cidr)
    for tap in ("tap-a", "tap-x"):
        netdev.ensure_tap(tap, netns=host.netns)
    await driver.ensure_port(PortBinding("port-a", "s1", "net-a", "02:00:00:00:00:01", 5), "tap-a")
    ovs.vsctl("add-port", "br-int", "tap-x")  # someone else's port: no vim-port-id

    await driver.remove_port("port-a")
    await driver.remove_port("port-a")
    await driver.remove_port("never-existed")
    assert _ports(ovs, "br-int") == ["int-prv", "patch-tun", "tap-x"]
    assert await driver.list_ports() == []


async def test_tunnels_are_exactly_the_given_set(
    driver: OvsDriver, ovs: OvsSwitch, host: LabHost
) -> None:
    with pytest.raises(Unavailable):  # no endpoint known yet
        await driver.ensure_tunnels([TunnelSpec("h2", "172.16.0.2")])
    await driver.ensure_bridges(host.data_cidr)
    await driver.ensure_tunnels([TunnelSpec("h2", "172.16.0.2"), TunnelSpec("h3", "172.16.0.3")])
    await driver.ensure_tunnels([TunnelSpec("h3", "172.16.0.3"), TunnelSpec("h4", "172.16.0.4")])
    before = _config(ovs)
    await driver.ensure_tunnels([TunnelSpec("h4", "172.16.0.4"), TunnelSpec("h3", "172.16.0.3")])
    assert _config(ovs) == before

    tunnels = {i["options"]["remote_ip"]: i for i in before["Interface"] if i["type"] == "vxlan"}
    assert set(tunnels) == {"172.16.0.3", "172.16.0.4"}
    for remote, iface in tunnels.items():
        assert iface["options"] == {"remote_ip": remote, "local_ip": host.data_ip, "key": "flow"}
    assert tunnels["172.16.0.4"]["external_ids"] == {"vim-remote-host": "h4"}
    assert len(_ports(ovs, "br-tun")) == 3  # patch-int + two tunnels

    await driver.ensure_tunnels([])
    assert _ports(ovs, "br-tun") == ["patch-int"]


async def test_bad_specs_are_invalid_input(driver: OvsDriver, host: LabHost) -> None:
    await driver.ensure_bridges(host.data_cidr)
    with pytest.raises(InvalidInput) as bad:
        await driver.ensure_port(PortBinding("p", "s", "n", "not-a-mac", 0), "a/b")
    fields = {v.field for v in bad.value.violations}
    assert fields == {"binding.vlan_tag", "binding.mac_address", "device"}
    with pytest.raises(InvalidInput):
        await driver.ensure_port(PortBinding("p", "s", "n", "02:00:00:00:00:01", 5), "br-tun")
    with pytest.raises(InvalidInput):
        await driver.ensure_tunnels([TunnelSpec("h2", "not-an-ip")])
    with pytest.raises(InvalidInput):
        await driver.ensure_tunnels([TunnelSpec("self", host.data_ip)])
    with pytest.raises(InvalidInput) as bad:
        await driver.ensure_flows(
            [NET, NetworkPlanEntry("net-b", "vxlan", 1001, 6), NetworkPlanEntry("c", "vxlan", 0, 0)]
        )
    assert {v.field for v in bad.value.violations} == {
        "networks.segmentation_id",
        "networks[2].segmentation_id",
        "networks[2].local_vlan",
    }
    with pytest.raises(InvalidInput):
        await driver.ensure_bridges("300.1.2.3")


async def test_flows_are_cheap_to_repeat_and_come_back_after_vswitchd_restart(
    driver: OvsDriver, ovs: OvsSwitch, host: LabHost
) -> None:
    await driver.ensure_bridges(host.data_cidr)
    await driver.ensure_tunnels([TunnelSpec("h2", "172.16.0.2")])
    await driver.ensure_flows([NET])
    flows = _our_flows(ovs)
    assert len(flows) == 10
    assert any("tun_id=0x3e9" in f and "mod_vlan_vid:5" in f for f in flows)
    assert any("dl_vlan=5" in f and "set_tunnel:0x3e9" in f for f in flows)
    assert len({f.split(",")[0] for f in flows}) == 1  # one cookie for the whole set

    # A repeat does not rewrite: a learned-table flow (cookie 0) survives it.
    target = ovs.mgmt_target("br-tun")
    ovs.ofctl(
        "add-flow", target, "table=20,priority=1,dl_vlan=5,dl_dst=02:00:00:00:00:99,actions=drop"
    )
    await driver.ensure_flows([NET])
    assert "02:00:00:00:00:99" in ovs.ofctl("dump-flows", target, "table=20")
    # A stale foreign flow makes it rewrite the table.
    ovs.ofctl("add-flow", target, "table=7,priority=1,actions=drop")
    await driver.ensure_flows([NET])
    dump = ovs.ofctl("dump-flows", target)
    assert "table=7" not in dump
    assert "02:00:00:00:00:99" not in dump

    # Another plan: another cookie, old flows gone.
    net_b = NetworkPlanEntry("net-b", "vxlan", 2002, 6)
    await driver.ensure_flows([NET, net_b])
    assert len(_our_flows(ovs)) == 13
    assert {f.split(",")[0] for f in _our_flows(ovs)} != {flows[0].split(",")[0]}

    # ovs-vswitchd dies: ports survive in the database, flows do not.
    ovs.kill_vswitchd()
    with pytest.raises(Unavailable):
        await driver.ensure_flows([NET])
    ovs.start_vswitchd()
    assert _our_flows(ovs) == []
    assert len(_ports(ovs, "br-tun")) == 2
    await driver.ensure_bridges(host.data_cidr)
    await driver.ensure_flows([NET, net_b])
    assert len(_our_flows(ovs)) == 13


async def test_provider_flows_are_cheap_to_repeat_and_rewritten_when_foreign(
    driver: OvsDriver, ovs: OvsSwitch, host: LabHost, monkeypatch: pytest.MonkeyPatch
) -> None:
    await driver.ensure_bridges(host.data_cidr)
    await driver.ensure_tunnels([])
    plan = [NET, NetworkPlanEntry("v", "vlan", 101, 6), NetworkPlanEntry("f", "flat", 0, 7)]
    await driver.ensure_flows(plan)
    target = ovs.mgmt_target("br-prv")

    def ours() -> list[str]:
        dump = ovs.ofctl("dump-flows", target, "--no-stats").splitlines()
        return [line for line in dump if "cookie=0x" in line and "cookie=0x0," not in line]

    flows = ours()
    assert len(flows) == 5 and len({f.split(",")[0] for f in flows}) == 1
    assert any("dl_vlan=6" in f and "mod_vlan_vid:101" in f for f in flows)
    assert any("dl_vlan=101" in f and "mod_vlan_vid:6" in f for f in flows)
    assert any("dl_vlan=7" in f and "strip_vlan" in f for f in flows)
    assert len(_our_flows(ovs)) == 7 + 3  # br-tun: the vxlan network only
    # A repeat only dumps (once per bridge) and writes nothing.
    calls: list[tuple[str, ...]] = []
    real = driver._ofctl

    def spy(*args: str, stdin: str | None = None) -> str:
        calls.append(args[:2])
        return real(*args, stdin=stdin)

    monkeypatch.setattr(driver, "_ofctl", spy)
    await driver.ensure_flows(plan)
    assert calls == [("dump-flows", ovs.mgmt_target("br-tun")), ("dump-flows", target)]
    # A foreign flow makes it rewrite the table; the result is the same set.
    ovs.ofctl("add-flow", target, "table=0,priority=1,dl_vlan=9,actions=drop")
    await driver.ensure_flows(plan)
    assert "dl_vlan=9" not in ovs.ofctl("dump-flows", target)
    assert ours() == flows
    # Dropping the provider networks leaves br-prv with its drop-all flow only.
    await driver.ensure_flows([NET])
    assert [f.split(", ", 1)[1] for f in ours()] == ["priority=0 actions=drop"]


async def test_provider_networks_need_an_underlay(ovs: OvsSwitch, host: LabHost) -> None:
    drv = OvsDriver(ovs.db_socket, run_dir=ovs.run_dir, netns=host.netns)
    await drv.connect()
    try:
        await drv.ensure_bridges(host.data_cidr)
        await drv.ensure_tunnels([])
        with pytest.raises(InvalidInput) as bad:
            await drv.ensure_flows([NET, NetworkPlanEntry("v", "vlan", 101, 6)])
        assert {v.field for v in bad.value.violations} == {"networks.network_type"}
        assert len(_our_flows(ovs)) == 10  # the VXLAN flows are installed regardless
        assert "br-prv" not in ovs.vsctl("list-br").split()
    finally:
        await drv.close()


async def test_missing_pieces_are_unavailable_not_crashes(ovs: OvsSwitch, host: LabHost) -> None:
    drv = OvsDriver(ovs.db_socket, run_dir=ovs.run_dir, underlay_device="nope0", netns=host.netns)
    await drv.connect()
    try:
        binding = PortBinding("p", "s", "n", "02:00:00:00:00:01", 5)
        with pytest.raises(Unavailable):  # no br-int yet
            await drv.ensure_port(binding, "tap-a")
        with pytest.raises(Unavailable):  # the underlay link does not exist
            await drv.ensure_bridges(host.data_cidr)
        # The database part is recorded regardless: a later pass can finish the job.
        assert sorted(ovs.vsctl("list-br").split()) == ["br-int", "br-phy", "br-prv", "br-tun"]
    finally:
        await drv.close()
    with pytest.raises(Unavailable):
        await OvsDriver(ovs.base_dir / "no.sock").connect()
