"""The namespace lab and the per-host OVS harness: real namespaces, nftables, daemons."""

from __future__ import annotations

import ipaddress
import os
import subprocess
from pathlib import Path

import pytest

from vim.agent import netdev
from vim.harness.netns import LabHost, NetnsLab
from vim.harness.ovs import OvsSwitch
from vim.harness.ports import wait_until


def _ping(src: LabHost | None, ip: str) -> bool:
    argv = ["ping", "-c1", "-n", "-W1", ip]
    if src is None:
        return subprocess.run(argv, capture_output=True, check=False).returncode == 0
    return src.run(argv, check=False).returncode == 0


@pytest.mark.slow
def test_lab_links_partitions_and_power(tmp_path: Path) -> None:
    with NetnsLab.start(3, gateway=True) as lab:
        h1, h2, h3 = lab.hosts
        assert lab.mgmt_subnet != lab.data_subnet
        for subnet in (lab.mgmt_subnet, lab.data_subnet):
            assert subnet.subnet_of(ipaddress.IPv4Network("172.16.0.0/12"))
            assert subnet.prefixlen == 24
        assert h1.run(["cat", "/sys/class/net/mgmt0/mtu"]).stdout.strip() == "1600"
        # The data links carry no address; give two of them one to test data partitions.
        for h in (h1, h2):
            netdev.add_address(h.data_device, h.data_cidr, netns=h.netns)

        assert _ping(h1, h2.mgmt_ip)
        assert _ping(h1, h2.data_ip)
        assert lab.gateway_ip is not None
        assert _ping(None, h3.mgmt_ip)  # the root namespace reaches hosts via the gateway
        assert _ping(h3, lab.gateway_ip)

        lab.isolate(h2.name)
        assert not _ping(h1, h2.mgmt_ip)
        assert not _ping(h1, h2.data_ip)
        assert not _ping(None, h2.mgmt_ip)
        assert _ping(h1, h3.mgmt_ip)
        lab.isolate(h2.name)  # idempotent
        lab.isolate(h2.name, data=False)  # management only: data flows again
        assert _ping(h1, h2.data_ip)
        assert not _ping(h1, h2.mgmt_ip)
        lab.heal(h2.name)
        assert _ping(h1, h2.mgmt_ip)
        assert _ping(h1, h2.data_ip)

        lab.cut(h1.name, h3.name)
        assert not _ping(h1, h3.mgmt_ip)
        assert not _ping(h3, h1.mgmt_ip)
        assert _ping(h1, h2.mgmt_ip)
        assert _ping(h3, h2.mgmt_ip)
        lab.heal()
        assert _ping(h1, h3.mgmt_ip)

        lab.power_off(h3.name)
        assert not _ping(h1, h3.mgmt_ip)
        lab.power_on(h3.name)
        wait_until(lambda: _ping(h1, h3.mgmt_ip), 10, what="h3 back")

        sleeper = h1.spawn(["sleep", "300"], tmp_path / "sleep.log")
        names = [h.netns for h in lab.hosts] + [lab.underlay_ns]
        gateway = lab.gateway_device
    # stop(): the child is dead, namespaces and the root end of the gateway are gone.
    assert sleeper.poll() is not None
    assert not any(Path("/var/run/netns", n).exists() for n in names)
    assert gateway is not None
    assert not Path("/sys/class/net", gateway).exists()
    lab.stop()  # idempotent


def test_ovs_switch_in_a_namespace_survives_a_vswitchd_kill() -> None:
    with NetnsLab.start(["h1"]) as lab:
        host = lab.host("h1")
        ovs = OvsSwitch.start(netns=host.netns)
        try:
            assert ovs.db_socket.exists()
            ovs.vsctl("add-br", "br-x", "--", "set", "Bridge", "br-x", "datapath_type=netdev")
            # ovs-vswitchd runs inside the host: its internal port is a tap there.
            wait_until(lambda: netdev.link_exists("br-x", host.netns), 5, what="br-x tap")
            assert not os.path.exists("/sys/class/net/br-x")
            assert "actions=NORMAL" in ovs.ofctl("dump-flows", ovs.mgmt_target("br-x"))
            pid = ovs.vswitchd_pid
            assert pid is not None

            ovs.kill_vswitchd()
            assert not ovs.vswitchd_running()
            assert not Path(f"/proc/{pid}").exists()
            assert ovs.vsctl("list-br").split() == ["br-x"]  # the database lives on
            ovs.start_vswitchd()
            assert ovs.vswitchd_running()
            assert ovs.vswitchd_pid != pid
            assert ovs.appctl_rc("version") == 0
        finally:
            ovs.stop()
        assert not ovs.base_dir.exists()
        assert not ovs.vswitchd_running()
        assert not ovs.ovsdb_running()
        ovs.stop()  # idempotent
