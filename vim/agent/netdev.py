"""Kernel network devices for the agent: taps, veths, addresses, offloads (pyroute2).

Role: the small set of host-kernel operations the switch driver and the
hypervisor driver need around Open vSwitch: create the tap or veth a server
NIC is plugged with, give it an MTU, turn tx checksum offload off, move a
veth end into another namespace (a "VM" in tests), put the tunnel endpoint
address on ``br-phy``, and keep the kernel off the underlay link.

Invariants:

* Every function is idempotent: creating what exists (with the same kind)
  changes nothing but MTU/state, deleting what is gone succeeds, adding an
  address that is there is a no-op.
* ``netns=None`` means the caller's own namespace (the agent runs in its host's
  namespace); a name means that named namespace (``/var/run/netns/<name>``).
* Functions are blocking (netlink round trips of ~1 ms, ``ethtool``/``nft``
  subprocesses of a few ms): async callers should run them in a thread.
  Called on an event loop's thread anyway, the netlink ones hop to a worker
  thread by themselves (pyroute2's sync API cannot run inside a running loop).
* Interface names are validated (1..15 chars, no ``/`` or whitespace) before
  any call; a bad one raises :class:`ValueError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import re
import subprocess
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = [
    "add_address",
    "delete_link",
    "drop_kernel_ingress",
    "ensure_tap",
    "ensure_veth",
    "link_exists",
    "move_to_netns",
    "set_link",
    "set_tx_offload",
]

_IFNAME = re.compile(r"^[^\s/:]{1,15}$")
_ENOENT = 2
_ESRCH = 3
_ENODEV = 19
_EEXIST = 17
_CMD_TIMEOUT = 10.0
NFT_TABLE = "vim_underlay"
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _off_loop(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` in a worker thread when called from a thread with a running event loop:
    pyroute2's synchronous API drives its own event loop, which cannot nest."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return fn(*args, **kwargs)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(fn, *args, **kwargs).result()

    return wrapper


def check_ifname(name: str) -> str:
    """``name`` if it is a valid Linux interface name, else :class:`ValueError`."""
    if not _IFNAME.match(name) or name in (".", ".."):
        raise ValueError(f"invalid interface name {name!r} (1-15 chars, no '/', ':' or spaces)")
    return name


def _ipr(netns: str | None) -> IPRoute:
    return IPRoute(netns=netns) if netns else IPRoute()


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else None


def _run(netns: str | None, argv: Sequence[str], stdin: str | None = None) -> None:
    full = ["ip", "netns", "exec", netns, *argv] if netns else list(argv)
    proc = subprocess.run(
        full, input=stdin, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise OSError(f"{' '.join(full)} exited {proc.returncode}: {proc.stderr.strip()}")


@_off_loop
def link_exists(name: str, netns: str | None = None) -> bool:
    """True if interface ``name`` exists in ``netns``."""
    check_ifname(name)
    with _ipr(netns) as ipr:
        return _index(ipr, name) is not None


def _link_kind(ipr: IPRoute, index: int) -> str:
    link = ipr.get_links(index)[0]
    info = link.get("IFLA_LINKINFO")
    return str(info.get("IFLA_INFO_KIND")) if info else ""


@_off_loop
def set_link(
    name: str,
    *,
    mtu: int | None = None,
    up: bool = True,
    address: str | None = None,
    netns: str | None = None,
) -> None:
    """Set MTU and MAC ``address`` (if given) and admin state of an existing interface."""
    check_ifname(name)
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            raise FileNotFoundError(f"no interface {name} in netns {netns or '(own)'}")
        kw: dict[str, object] = {"state": "up" if up else "down"}
        if mtu is not None:
            kw["mtu"] = mtu
        if address is not None:
            kw["address"] = address.lower()
        ipr.link("set", index=idx, **kw)


@_off_loop
def ensure_tap(name: str, *, mtu: int = 1500, netns: str | None = None) -> None:
    """A persistent tap device ``name``, up, with ``mtu`` (created if missing).

    An existing interface of another kind under that name is an error
    (:class:`FileExistsError`), never silently replaced.
    """
    check_ifname(name)
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            ipr.link("add", ifname=name, kind="tuntap", mode="tap")
            idx = _index(ipr, name)
            assert idx is not None
        elif _link_kind(ipr, idx) != "tun":
            raise FileExistsError(f"{name} exists and is not a tap")
        ipr.link("set", index=idx, mtu=mtu, state="up")


@_off_loop
def ensure_veth(
    name: str,
    peer: str,
    *,
    mtu: int = 1500,
    netns: str | None = None,
    peer_netns: str | None = None,
) -> None:
    """A veth pair ``name`` (in ``netns``) <-> ``peer`` (in ``peer_netns``, default the same),
    both up with ``mtu``. Created if ``name`` is missing; an existing ``name`` that
    is not a veth raises :class:`FileExistsError`."""
    check_ifname(name)
    check_ifname(peer)
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            spec: dict[str, object] = {"ifname": peer}
            if peer_netns and peer_netns != netns:
                spec["net_ns_fd"] = peer_netns
            ipr.link("add", ifname=name, kind="veth", peer=spec)
            idx = _index(ipr, name)
            assert idx is not None
        elif _link_kind(ipr, idx) != "veth":
            raise FileExistsError(f"{name} exists and is not a veth")
        ipr.link("set", index=idx, mtu=mtu, state="up")
    set_link(peer, mtu=mtu, netns=peer_netns if peer_netns else netns)


@_off_loop
def move_to_netns(name: str, target_netns: str, *, netns: str | None = None) -> None:
    """Move ``name`` from ``netns`` into ``target_netns`` (no-op if it is there already)."""
    check_ifname(name)
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is not None:
            ipr.link("set", index=idx, net_ns_fd=target_netns)
            return
    if not link_exists(name, target_netns):
        raise FileNotFoundError(f"no interface {name} in {netns or '(own)'} nor in {target_netns}")


@_off_loop
def delete_link(name: str, *, netns: str | None = None) -> None:
    """Delete interface ``name`` (a veth takes its peer with it); gone already is fine."""
    check_ifname(name)
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return
        try:
            ipr.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code not in (_ENODEV, _ENOENT):
                raise


@_off_loop
def add_address(name: str, cidr: str, *, netns: str | None = None) -> None:
    """Put ``cidr`` (``a.b.c.d/len``) on ``name`` and bring it up; present already is fine."""
    check_ifname(name)
    iface = ipaddress.ip_interface(cidr)
    with _ipr(netns) as ipr:
        idx = _index(ipr, name)
        if idx is None:
            raise FileNotFoundError(f"no interface {name} in netns {netns or '(own)'}")
        have = {
            (a.get("IFA_ADDRESS"), a["prefixlen"])
            for a in ipr.get_addr(index=idx, family=4 if iface.version == 4 else 10)
        }
        if (str(iface.ip), iface.network.prefixlen) not in have:
            try:
                ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            except NetlinkError as exc:
                if exc.code != _EEXIST:
                    raise
        ipr.link("set", index=idx, state="up")


def set_tx_offload(name: str, *, enabled: bool = False, netns: str | None = None) -> None:
    """Turn tx checksum offload on or off (``ethtool -K NAME tx off``).

    Off is required on both ends of a veth that a userspace (netdev) OVS
    datapath reads, or TCP across it hangs on bad checksums.
    """
    check_ifname(name)
    _run(netns, ["ethtool", "-K", name, "tx", "on" if enabled else "off"])


def drop_kernel_ingress(name: str, *, netns: str | None = None) -> None:
    """Keep the kernel from seeing frames arriving on ``name`` (nftables netdev ingress drop).

    For an underlay link given to a userspace OVS bridge: OVS reads it with a
    raw socket before the ingress hook, so it still sees every frame, while the
    kernel no longer answers ARP or UDP on it a second time. Idempotent (the
    table and the base chain, whose policy is the drop, are added with ``add``).
    """
    check_ifname(name)
    chain = f"in_{name}".replace("-", "_").replace(".", "_")
    script = (
        f"add table netdev {NFT_TABLE}\n"
        f"add chain netdev {NFT_TABLE} {chain} "
        f'{{ type filter hook ingress device "{name}" priority 0; policy drop; }}\n'
    )
    _run(netns, ["nft", "-f", "-"], stdin=script)
