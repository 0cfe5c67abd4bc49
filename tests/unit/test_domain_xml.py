"""DomainSpec -> libvirt XML: every element parsed back; validation names every bad field."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET

import pytest

from vim.agent.domain_xml import (
    NS,
    DomainPaths,
    domain_name,
    domain_uuid,
    domain_xml,
    read_metadata,
    server_id_of,
    spec_hash,
    tap_name,
)
from vim.agent.drivers import DomainSpec, NicSpec, WatchdogAction
from vim.agent.errors import InvalidDomainSpec

PATHS = DomainPaths(console_log="/state/console/vim-s1.log", overlay_disk="/state/disks/s1.qcow2")
NIC_A = NicSpec("5f1c2a3b-9d8e-4f00-8a1b-2c3d4e5f6a7b", "net-1", "52:54:00:12:34:56", ("10.0.0.5",))
NIC_B = NicSpec("port-b", "net-2", "52:54:00:ab:cd:ef", mtu=1450)


def spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = {
        "server_id": "s1",
        "name": "web-1",
        "vcpus": 2,
        "ram_mb": 512,
        "disk_gb": 1,
    }
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


def parse(s: DomainSpec, paths: DomainPaths = PATHS) -> ET.Element:
    return ET.fromstring(domain_xml(s, paths))


def test_identity_size_and_metadata() -> None:
    root = parse(spec(metadata={"vnf": "fw", "tier": "1"}))
    assert root.tag == "domain" and root.get("type") == "qemu"
    assert root.findtext("name") == "vim-s1" == domain_name("s1")
    assert uuid.UUID(root.findtext("uuid", "")) == uuid.UUID(domain_uuid("s1"))
    assert domain_uuid("s1") == domain_uuid("s1") != domain_uuid("s2")
    assert root.findtext("title") == "web-1"
    mem = root.find("memory")
    assert mem is not None and mem.get("unit") == "MiB" and mem.text == "512"
    assert root.findtext("vcpu") == "2"
    server = root.find(f"metadata/{{{NS}}}server")
    assert server is not None
    assert server.findtext(f"{{{NS}}}server-id") == "s1"
    assert server.findtext(f"{{{NS}}}name") == "web-1"
    assert server.findtext(f"{{{NS}}}spec-hash") == spec_hash(
        spec(metadata={"vnf": "fw", "tier": "1"})
    )
    metas = {m.get("key"): m.text for m in server.findall(f"{{{NS}}}meta")}
    assert metas == {"vnf": "fw", "tier": "1"}
    assert root.findtext("on_poweroff") == "destroy"
    assert root.findtext("on_reboot") == "restart"
    assert root.findtext("on_crash") == "destroy"
    assert root.find("features/acpi") is not None


def test_os_boots_the_disk_without_a_kernel() -> None:
    root = parse(spec())
    t = root.find("os/type")
    assert t is not None and t.text == "hvm" and t.get("arch") == "x86_64"
    boot = root.find("os/boot")
    assert boot is not None and boot.get("dev") == "hd"
    assert root.find("os/kernel") is None and root.find("os/initrd") is None


def test_os_direct_kernel_boot() -> None:
    root = parse(spec(kernel_path="/k/vmlinuz", initrd_path="/k/initrd", kernel_cmdline="quiet"))
    assert root.findtext("os/kernel") == "/k/vmlinuz"
    assert root.findtext("os/initrd") == "/k/initrd"
    assert root.findtext("os/cmdline") == "quiet"
    assert root.find("os/boot") is None


def test_disk_only_with_an_image() -> None:
    assert parse(spec()).find("devices/disk") is None
    disk = parse(spec(image_path="/images/cirros.qcow2")).find("devices/disk")
    assert disk is not None and disk.get("type") == "file" and disk.get("device") == "disk"
    driver, source, target = disk.find("driver"), disk.find("source"), disk.find("target")
    assert driver is not None and driver.get("type") == "qcow2"
    assert source is not None and source.get("file") == PATHS.overlay_disk
    assert target is not None and target.get("dev") == "vda" and target.get("bus") == "virtio"


def test_nics_are_ethernet_taps_with_the_ports_mac() -> None:
    root = parse(spec(nics=(NIC_A, NIC_B)))
    ifaces = root.findall("devices/interface")
    assert [i.get("type") for i in ifaces] == ["ethernet", "ethernet"]
    for iface, nic in zip(ifaces, (NIC_A, NIC_B), strict=True):
        mac, target = iface.find("mac"), iface.find("target")
        model, mtu = iface.find("model"), iface.find("mtu")
        assert mac is not None and mac.get("address") == nic.mac_address
        assert target is not None and target.get("dev") == tap_name(nic.port_id)
        assert model is not None and model.get("type") == "virtio"
        assert mtu is not None and mtu.get("size") == str(nic.mtu)


def test_tap_names_fit_ifnamsiz() -> None:
    assert tap_name(NIC_A.port_id) == "tap5f1c2a3b-9d8"
    assert tap_name("p") == "tapp"
    assert len(tap_name("x" * 64)) == 15


def test_serial_console_goes_to_the_log_file() -> None:
    serial = parse(spec()).find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    source, target = serial.find("source"), serial.find("target")
    assert source is not None and source.get("path") == PATHS.console_log
    assert target is not None and target.get("port") == "0"


@pytest.mark.parametrize(
    ("policy", "action"),
    [
        (WatchdogAction.RESET, "reset"),
        (WatchdogAction.POWEROFF, "poweroff"),
        (WatchdogAction.PAUSE, "pause"),
        (WatchdogAction.NONE, None),
    ],
)
def test_watchdog_policy(policy: WatchdogAction, action: str | None) -> None:
    found = parse(spec(watchdog=policy)).findall("devices/watchdog")
    if action is None:
        assert found == []
    else:
        assert len(found) == 1
        assert found[0].get("model") == "i6300esb" and found[0].get("action") == action


def test_spec_hash_follows_every_field() -> None:
    base = spec(nics=(NIC_A,))
    assert spec_hash(base) == spec_hash(spec(nics=(NIC_A,)))
    changed = [
        spec(nics=(NIC_A,), ram_mb=1024),
        spec(nics=(NIC_A,), vcpus=3),
        spec(nics=(NIC_A, NIC_B)),
        spec(nics=(NIC_A,), watchdog=WatchdogAction.RESET),
        spec(nics=(NIC_A,), metadata={"a": "b"}),
        spec(nics=(NIC_A,), image_path="/i.qcow2"),
        spec(nics=(NIC_A,), name="other"),
    ]
    assert len({spec_hash(s) for s in changed} | {spec_hash(base)}) == len(changed) + 1


def test_read_metadata_round_trip_and_foreign_domains() -> None:
    s = spec(metadata={"k": "v"})
    stored = read_metadata(domain_xml(s, PATHS))
    assert stored is not None
    assert (stored.server_id, stored.name, stored.spec_hash) == ("s1", "web-1", spec_hash(s))
    assert stored.metadata == {"k": "v"}
    assert read_metadata("<domain type='test'><name>other</name></domain>") is None
    assert read_metadata("not xml") is None


def test_server_id_of_names() -> None:
    assert server_id_of("vim-abc") == "abc"
    assert server_id_of("vim-") is None
    assert server_id_of("other") is None


def test_every_bad_field_is_named() -> None:
    bad = spec(
        server_id="../etc",
        vcpus=0,
        ram_mb=0,
        disk_gb=-1,
        image_path="relative.qcow2",
        initrd_path="/i",
        nics=(
            NicSpec("ok", "n", "52:54:00:XX:00:01"),
            NicSpec("", "n", "52:54:00:00:00:02", mtu=10),
        ),
    )
    with pytest.raises(InvalidDomainSpec) as err:
        domain_xml(bad, PATHS)
    fields = {v.field for v in err.value.violations}
    assert fields == {
        "server_id",
        "vcpus",
        "ram_mb",
        "disk_gb",
        "image_path",
        "initrd_path",
        "nics[0].mac_address",
        "nics[1].port_id",
        "nics[1].mtu",
    }


def test_clashing_taps_and_missing_overlay_path_are_refused() -> None:
    clash = spec(
        nics=(
            NicSpec("abcdefghijkl-1", "n", "52:54:00:00:00:01"),
            NicSpec("abcdefghijkl-2", "n", "52:54:00:00:00:02"),
        )
    )
    with pytest.raises(InvalidDomainSpec, match=r"nics\[1\].port_id"):
        domain_xml(clash, PATHS)
    with pytest.raises(InvalidDomainSpec, match="overlay"):
        domain_xml(spec(image_path="/i.qcow2"), DomainPaths(console_log="/c.log"))
