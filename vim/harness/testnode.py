"""A private libvirt `test:///` node per agent: a node description file with given capacity.

Role: `test:///default` is one fake node shared by every connection of a process;
``test:///ABSOLUTE/PATH/node.xml`` gives each connection (each simulated host's
agent) its own fake node, with no daemon. :func:`write_test_node` writes such a
file and returns its URI::

    uri = write_test_node(tmp_path / "host1.xml", cpus=8, memory_mib=16384)
    driver = LibvirtDriver(uri, tmp_path / "host1-state")

Invariants: the node starts with no domains, no networks and no pools; every
``virConnectOpen`` of the URI builds a fresh node from the file (state is per
connection, and lost when the connection closes, like a host rebooting).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

__all__ = ["test_node_uri", "write_test_node"]


def test_node_uri(path: Path) -> str:
    """``test:///ABS/PATH`` for a node file."""
    return "test://" + str(path.resolve())


def write_test_node(
    path: Path,
    *,
    cpus: int = 4,
    memory_mib: int = 8192,
    mhz: int = 2000,
    foreign_domains: Sequence[str] = (),
) -> str:
    """Write a test-driver node description with ``cpus`` and ``memory_mib``; its URI.

    ``foreign_domains`` are names of running 64 MiB domains already on the node (not
    the agent's: for tests that the driver leaves them alone).
    """
    if cpus < 1 or memory_mib < 1:
        raise ValueError("cpus and memory_mib must be >= 1")
    node = ET.Element("node")
    cpu = ET.SubElement(node, "cpu")
    for tag, value in (
        ("mhz", mhz),
        ("model", "x86_64"),
        ("nodes", 1),
        ("sockets", 1),
        ("cores", cpus),
        ("threads", 1),
        ("active", cpus),
    ):
        ET.SubElement(cpu, tag).text = str(value)
    ET.SubElement(node, "memory").text = str(memory_mib * 1024)
    for name in foreign_domains:
        dom = ET.SubElement(node, "domain", type="test")
        ET.SubElement(dom, "name").text = name
        ET.SubElement(dom, "memory").text = str(64 * 1024)
        ET.SubElement(ET.SubElement(dom, "os"), "type").text = "hvm"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(ET.tostring(node, encoding="unicode") + "\n", encoding="utf-8")
    return test_node_uri(path)
