"""DomainSpec -> libvirt domain XML, and back to the facts the agent stored in it. Pure.

Invariants:

* A server's domain is named ``vim-<server_id>`` and has a UUID derived from the
  server id (uuid5), so redefining it replaces the same domain, never adds one.
* The domain is always ``type='qemu'`` (software emulation: ``/dev/kvm`` cannot run
  guests on these machines; production would switch the type, nothing else).
* ``<metadata>`` carries the server id, the server name, the spec's hash and the
  spec's metadata under the namespace :data:`NS`; :func:`read_metadata` reads them
  back, and the driver redefines a domain only when the hash differs.
* A NIC is ``<interface type='ethernet'>`` with the port's MAC and a tap named by
  :func:`tap_name` (libvirt creates the tap; the switch driver plugs it into br-int).
* The serial console goes to a file (``console_log``); the watchdog policy maps to
  ``<watchdog model='i6300esb' action=.../>`` and NONE means no device at all.
* Invalid specs raise :class:`~vim.agent.errors.InvalidDomainSpec` listing every bad field.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from vim.agent.drivers import DomainSpec, WatchdogAction
from vim.agent.errors import InvalidDomainSpec
from vim.errors import FieldViolation

NS = "urn:x-vim:domain:1"
"""XML namespace of the agent's element inside ``<metadata>``."""
DOMAIN_PREFIX = "vim-"
TAP_PREFIX = "tap"
IFNAMSIZ = 15
"""Longest Linux interface name."""
_UUID_NS = uuid.UUID("6c2d0a5e-0f43-4c8e-9a55-5a1f0d1c7b3e")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_WATCHDOG_ACTIONS = {
    WatchdogAction.RESET: "reset",
    WatchdogAction.POWEROFF: "poweroff",
    WatchdogAction.PAUSE: "pause",
}

ET.register_namespace("vim", NS)


@dataclass(frozen=True, slots=True)
class DomainPaths:
    """Host files of one domain; the driver chooses them under its state dir."""

    console_log: str
    overlay_disk: str = ""
    """The qcow2 overlay of the spec's image; required when ``spec.image_path`` is set."""


def domain_name(server_id: str) -> str:
    """``vim-<server_id>``, the name of a managed domain."""
    return DOMAIN_PREFIX + server_id


def server_id_of(domain: str) -> str | None:
    """The server id of a managed domain's name, None for any other domain."""
    if domain.startswith(DOMAIN_PREFIX) and len(domain) > len(DOMAIN_PREFIX):
        return domain[len(DOMAIN_PREFIX) :]
    return None


def domain_uuid(server_id: str) -> str:
    """A UUID that depends only on the server id (stable across redefinitions)."""
    return str(uuid.uuid5(_UUID_NS, server_id))


def tap_name(port_id: str) -> str:
    """The tap device of a port: ``tap`` + the port id's first 11 characters (<= 15).

    The switch driver plugs the device of this name, so both sides must use this function.
    """
    return (TAP_PREFIX + port_id)[:IFNAMSIZ]


def spec_hash(spec: DomainSpec) -> str:
    """A digest of everything in the spec that shapes the domain (stable across runs)."""
    body = {
        "server_id": spec.server_id,
        "name": spec.name,
        "vcpus": spec.vcpus,
        "ram_mb": spec.ram_mb,
        "disk_gb": spec.disk_gb,
        "image_path": spec.image_path,
        "kernel_path": spec.kernel_path,
        "initrd_path": spec.initrd_path,
        "kernel_cmdline": spec.kernel_cmdline,
        "nics": [
            [n.port_id, n.network_id, n.mac_address, list(n.ip_addresses), n.mtu] for n in spec.nics
        ],
        "watchdog": spec.watchdog.value,
        "metadata": dict(sorted(spec.metadata.items())),
    }
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()[:32]


def validate(spec: DomainSpec) -> None:
    """Raise InvalidDomainSpec naming every field the driver cannot use."""
    bad: list[FieldViolation] = []
    if not _ID_RE.match(spec.server_id):
        bad.append(FieldViolation("server_id", "1-64 of [A-Za-z0-9._-], not starting with . - _"))
    if spec.vcpus < 1:
        bad.append(FieldViolation("vcpus", "must be >= 1"))
    if spec.ram_mb < 1:
        bad.append(FieldViolation("ram_mb", "must be >= 1"))
    if spec.disk_gb < 0:
        bad.append(FieldViolation("disk_gb", "must be >= 0"))
    if spec.initrd_path and not spec.kernel_path:
        bad.append(FieldViolation("initrd_path", "needs kernel_path"))
    if spec.kernel_cmdline and not spec.kernel_path:
        bad.append(FieldViolation("kernel_cmdline", "needs kernel_path"))
    for field_name in ("image_path", "kernel_path", "initrd_path"):
        value = getattr(spec, field_name)
        if value and not value.startswith("/"):
            bad.append(FieldViolation(field_name, "must be an absolute path"))
    taps: set[str] = set()
    for i, nic in enumerate(spec.nics):
        if not _ID_RE.match(nic.port_id):
            bad.append(FieldViolation(f"nics[{i}].port_id", "1-64 of [A-Za-z0-9._-]"))
        elif tap_name(nic.port_id) in taps:
            bad.append(FieldViolation(f"nics[{i}].port_id", "tap name clashes with another NIC"))
        taps.add(tap_name(nic.port_id))
        if not _MAC_RE.match(nic.mac_address):
            bad.append(FieldViolation(f"nics[{i}].mac_address", "must be xx:xx:xx:xx:xx:xx"))
        if not 68 <= nic.mtu <= 65535:
            bad.append(FieldViolation(f"nics[{i}].mtu", "must be 68..65535"))
    if bad:
        raise InvalidDomainSpec(bad)


def domain_xml(spec: DomainSpec, paths: DomainPaths) -> str:
    """The libvirt domain XML for ``spec`` (validated first)."""
    validate(spec)
    if spec.image_path and not paths.overlay_disk:
        raise InvalidDomainSpec([FieldViolation("image_path", "needs an overlay disk path")])
    dom = ET.Element("domain", type="qemu")
    ET.SubElement(dom, "name").text = domain_name(spec.server_id)
    ET.SubElement(dom, "uuid").text = domain_uuid(spec.server_id)
    if spec.name:
        ET.SubElement(dom, "title").text = spec.name
    _metadata(ET.SubElement(dom, "metadata"), spec)
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.ram_mb)
    ET.SubElement(dom, "vcpu").text = str(spec.vcpus)
    _os(ET.SubElement(dom, "os"), spec)
    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    _devices(ET.SubElement(dom, "devices"), spec, paths)
    return ET.tostring(dom, encoding="unicode")


def _metadata(parent: ET.Element, spec: DomainSpec) -> None:
    server = ET.SubElement(parent, f"{{{NS}}}server")
    ET.SubElement(server, f"{{{NS}}}server-id").text = spec.server_id
    ET.SubElement(server, f"{{{NS}}}name").text = spec.name
    ET.SubElement(server, f"{{{NS}}}spec-hash").text = spec_hash(spec)
    for key, value in sorted(spec.metadata.items()):
        ET.SubElement(server, f"{{{NS}}}meta", key=key).text = value


def _os(parent: ET.Element, spec: DomainSpec) -> None:
    ET.SubElement(parent, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.kernel_path:
        ET.SubElement(parent, "kernel").text = spec.kernel_path
        if spec.initrd_path:
            ET.SubElement(parent, "initrd").text = spec.initrd_path
        if spec.kernel_cmdline:
            ET.SubElement(parent, "cmdline").text = spec.kernel_cmdline
    else:
        ET.SubElement(parent, "boot", dev="hd")


def _devices(parent: ET.Element, spec: DomainSpec, paths: DomainPaths) -> None:
    if spec.image_path:
        disk = ET.SubElement(parent, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2")
        ET.SubElement(disk, "source", file=paths.overlay_disk)
        ET.SubElement(disk, "target", dev="vda", bus="virtio")
    for nic in spec.nics:
        iface = ET.SubElement(parent, "interface", type="ethernet")
        ET.SubElement(iface, "mac", address=nic.mac_address)
        ET.SubElement(iface, "target", dev=tap_name(nic.port_id))
        ET.SubElement(iface, "model", type="virtio")
        ET.SubElement(iface, "mtu", size=str(nic.mtu))
    serial = ET.SubElement(parent, "serial", type="file")
    ET.SubElement(serial, "source", path=paths.console_log)
    ET.SubElement(serial, "target", port="0")
    action = _WATCHDOG_ACTIONS.get(spec.watchdog)
    if action is not None:
        ET.SubElement(parent, "watchdog", model="i6300esb", action=action)
    ET.SubElement(parent, "memballoon", model="none")


@dataclass(frozen=True, slots=True)
class StoredMetadata:
    """What :func:`read_metadata` finds in a domain's XML."""

    server_id: str
    name: str
    spec_hash: str
    metadata: dict[str, str]


def read_metadata(xml: str) -> StoredMetadata | None:
    """The agent's metadata in a domain's XML; None if absent or the XML is not a domain."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    server = root.find(f"metadata/{{{NS}}}server")
    if server is None:
        return None
    return StoredMetadata(
        server_id=server.findtext(f"{{{NS}}}server-id", ""),
        name=server.findtext(f"{{{NS}}}name", ""),
        spec_hash=server.findtext(f"{{{NS}}}spec-hash", ""),
        metadata={m.get("key", ""): m.text or "" for m in server.findall(f"{{{NS}}}meta")},
    )
