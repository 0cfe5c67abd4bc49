"""Test hosts as network namespaces: an underlay, N hosts, partitions and power-off.

Role: one :class:`NetnsLab` is a private little data centre for tests,
benchmarks and the local multi-host cluster. It is not pytest-specific::

    with NetnsLab.start(["host1", "host2"], gateway=True) as lab:
        h1 = lab.host("host1")
        h1.run(["ping", "-c1", lab.host("host2").mgmt_ip])
        lab.isolate("host2")      # nftables: host2 can reach no one
        lab.heal()

Topology (``<tag>`` is random per lab, so concurrent labs never collide)::

    netns vim-<tag>-ul (underlay): Linux bridges br-mgmt and br-data
        br-mgmt ports: m<i> (one per host) [+ gw, the root namespace's link]
        br-data ports: d<i> (one per host)
    netns vim-<tag>-<host>: mgmt0 (veth peer of m<i>, holds mgmt_ip/24)
                            data0 (veth peer of d<i>, no address: the host's
                                   switch takes it, e.g. OVS br-phy)

Invariants:

* Two random, distinct /24s inside 172.16.0.0/12 per lab: one management
  subnet (agents, control plane), one data subnet (tunnel endpoints). They are
  chosen not to overlap any route of the root namespace. Host ``i`` (from 0)
  gets ``.(10+i)`` in both; the root namespace's gateway link (optional) is
  ``.1`` of the management subnet, so services in the root namespace listening
  on that address (or on 0.0.0.0) are reachable from every host.
* Management and data are separate links on separate bridges, so a dead
  switch (ovs-vswitchd killed) never cuts a host's management traffic, and a
  fault test can partition exactly what it means to.
* Every link has MTU 1600 (VXLAN adds 50-54 bytes; guests keep 1500). IPv6 is
  off in every namespace (no router solicitations or DAD noise), loopback is up.
* Partitions are nftables ``bridge`` family rules in the underlay namespace
  (forward hook), never in a host namespace: a userspace switch reading a
  host's link with a raw socket would not see netfilter rules there.
  :meth:`NetnsLab.isolate`, :meth:`NetnsLab.cut` and :meth:`NetnsLab.heal`
  re-render one table atomically (``nft -f``), so they are idempotent.
* Power-off sets the underlay ends of a host's links down (the host sees no
  carrier); processes inside keep running until their owner kills them.
* :meth:`NetnsLab.stop` SIGKILLs every process still inside the lab's
  namespaces (all are the lab's own: the names are random), deletes the
  namespaces and waits (bounded) until the kernel has destroyed them (deletion
  is asynchronous: the root end of the gateway link disappears only then). It
  is idempotent; labs not stopped are stopped at interpreter exit.
* Every namespace operation uses pyroute2 (netlink); commands inside a
  namespace run through ``ip netns exec``. Failures raise
  :class:`~vim.harness.ports.HarnessError`.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import ipaddress
import os
import random
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ParamSpec, TypeVar

from pyroute2 import IPRoute, netns

from vim.harness.ports import HarnessError, wait_until

__all__ = [
    "LabHost",
    "NetnsLab",
    "netns_exec",
    "netns_popen",
]

UNDERLAY_MTU = 1600
_NETNS_DIR = Path("/var/run/netns")
_SUPERNET = ipaddress.IPv4Network("172.16.0.0/12")
_NFT_TABLE = "vimlab"
_CMD_TIMEOUT = 30.0
_DESTROY_TIMEOUT = 10.0
_MGMT_DEV = "mgmt0"
_DATA_DEV = "data0"

_live: set[NetnsLab] = set()
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


def _argv(ns: str | None, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else list(argv)


def netns_exec(
    ns: str | None,
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = _CMD_TIMEOUT,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` inside namespace ``ns`` (``None``: here) and capture its output.

    With ``check`` a non-zero exit raises :class:`HarnessError` carrying stderr.
    """
    full = _argv(ns, argv)
    try:
        proc = subprocess.run(
            full, capture_output=True, text=True, timeout=timeout, input=input, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"{' '.join(full)} timed out after {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(full)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc


def netns_popen(ns: str | None, argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``ns`` as our child, output appended to ``log_path``.

    ``ip netns exec`` execs the command, so the child's pid is the command's.
    """
    with log_path.open("ab") as log:
        return subprocess.Popen(
            _argv(ns, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _root_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=2):
            dst = route.get("dst")
            if dst:
                nets.append(ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False))
    return [n for n in nets if isinstance(n, ipaddress.IPv4Network)]


def _pick_subnets(n: int) -> list[ipaddress.IPv4Network]:
    """``n`` distinct random /24s in 172.16.0.0/12 overlapping no root route."""
    used = _root_networks()
    chosen: list[ipaddress.IPv4Network] = []
    subnets = list(_SUPERNET.subnets(new_prefix=24))
    for _ in range(200):
        cand = random.choice(subnets)
        if cand in chosen or any(cand.overlaps(u) for u in used):
            continue
        chosen.append(cand)
        if len(chosen) == n:
            return chosen
    raise HarnessError("no free /24 in 172.16.0.0/12")


def _ns_pids(ns: str) -> list[int]:
    """Pids of processes living in namespace ``ns`` (by inode of its netns)."""
    try:
        inode = os.stat(_NETNS_DIR / ns).st_ino
    except OSError:
        return []
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{name}/ns/net").st_ino == inode:
                pids.append(int(name))
    return pids


@dataclass
class LabHost:
    """One test host: its namespace, its two links and its addresses."""

    name: str
    index: int
    netns: str
    mgmt_ip: str
    data_ip: str
    prefixlen: int = 24
    mgmt_device: str = _MGMT_DEV
    data_device: str = _DATA_DEV
    """The host's data link, left without an address for the host's switch."""
    underlay_ports: tuple[str, str] = ("", "")
    """The underlay ends (mgmt, data) of the host's links, in the underlay namespace."""
    _children: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @property
    def data_cidr(self) -> str:
        """``data_ip/24``: the tunnel endpoint address a switch puts on its bridge."""
        return f"{self.data_ip}/{self.prefixlen}"

    @property
    def mgmt_cidr(self) -> str:
        return f"{self.mgmt_ip}/{self.prefixlen}"

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host's namespace (see :func:`netns_exec`)."""
        return netns_exec(self.netns, argv, check=check, timeout=timeout)

    def spawn(self, argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        """Start a long-running child inside the host; the lab kills it at stop."""
        proc = netns_popen(self.netns, argv, log_path)
        self._children.append(proc)
        return proc

    def ipr(self) -> IPRoute:
        """A pyroute2 handle inside this host's namespace (use as a context manager)."""
        return IPRoute(netns=self.netns)


class NetnsLab:
    """An underlay namespace with two bridges and N host namespaces. Build it with :meth:`start`."""

    def __init__(self, tag: str, mgmt: ipaddress.IPv4Network, data: ipaddress.IPv4Network) -> None:
        """Low-level constructor; it creates nothing. Use :meth:`start`."""
        self.tag = tag
        self.mgmt_subnet = mgmt
        self.data_subnet = data
        self.underlay_ns = f"vim-{tag}-ul"
        self.gateway_ip: str | None = None
        self.gateway_device: str | None = None
        self._hosts: dict[str, LabHost] = {}
        self._extra: list[str] = []
        self._isolated: dict[str, tuple[bool, bool]] = {}  # host -> (mgmt, data)
        self._cuts: set[frozenset[str]] = set()
        self._stopped = False

    # ------------------------------------------------------------ building
    @classmethod
    @_off_loop
    def start(cls, hosts: int | Iterable[str] = 3, *, gateway: bool = False) -> NetnsLab:
        """Create the underlay and the hosts (``3`` → host1..host3, or given names).

        ``gateway=True`` also links the root namespace to the management bridge
        at :attr:`gateway_ip` (``.1``).
        """
        names = [f"host{i + 1}" for i in range(hosts)] if isinstance(hosts, int) else list(hosts)
        if len(set(names)) != len(names) or len(names) > 200:
            raise ValueError("host names must be distinct, at most 200")
        mgmt, data = _pick_subnets(2)
        lab = cls(uuid.uuid4().hex[:6], mgmt, data)
        _live.add(lab)
        try:
            lab._make_underlay()
            for name in names:
                lab.add_host(name)
            if gateway:
                lab._make_gateway()
        except BaseException:
            lab.stop()
            raise
        return lab

    def _new_netns(self, name: str) -> None:
        netns.create(name)
        netns_exec(
            name,
            [
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def _make_underlay(self) -> None:
        self._new_netns(self.underlay_ns)
        with IPRoute(netns=self.underlay_ns) as ipr:
            for br in ("br-mgmt", "br-data"):
                ipr.link("add", ifname=br, kind="bridge", br_stp_state=0, br_forward_delay=0)
                ipr.link("set", index=ipr.link_lookup(ifname=br)[0], state="up", mtu=UNDERLAY_MTU)
        self._apply_partitions()

    @_off_loop
    def add_host(self, name: str) -> LabHost:
        """Create one more host namespace linked to both bridges."""
        if name in self._hosts:
            raise ValueError(f"host {name} exists")
        index = len(self._hosts)
        host = LabHost(
            name=name,
            index=index,
            netns=f"vim-{self.tag}-{name}",
            mgmt_ip=str(self.mgmt_subnet.network_address + 10 + index),
            data_ip=str(self.data_subnet.network_address + 10 + index),
            underlay_ports=(f"m{index}", f"d{index}"),
        )
        self._hosts[name] = host
        self._new_netns(host.netns)
        links = (
            (host.underlay_ports[0], _MGMT_DEV, "br-mgmt"),
            (host.underlay_ports[1], _DATA_DEV, "br-data"),
        )
        with IPRoute(netns=self.underlay_ns) as ipr:
            for ul, dev, br in links:
                ipr.link(
                    "add", ifname=ul, kind="veth", peer={"ifname": dev, "net_ns_fd": host.netns}
                )
                idx = ipr.link_lookup(ifname=ul)[0]
                master = ipr.link_lookup(ifname=br)[0]
                ipr.link("set", index=idx, master=master, mtu=UNDERLAY_MTU, state="up")
        with host.ipr() as ipr:
            for dev in (_MGMT_DEV, _DATA_DEV):
                ipr.link("set", index=ipr.link_lookup(ifname=dev)[0], mtu=UNDERLAY_MTU, state="up")
            mgmt_idx = ipr.link_lookup(ifname=_MGMT_DEV)[0]
            ipr.addr("add", index=mgmt_idx, address=host.mgmt_ip, prefixlen=host.prefixlen)
        return host

    @_off_loop
    def add_netns(self, label: str) -> str:
        """One more namespace owned by the lab (e.g. a "VM"): ``vim-<tag>-<label>``, with
        loopback up and IPv6 off; deleted by :meth:`stop`. Returns its name."""
        name = f"vim-{self.tag}-{label}"
        if name in self._extra or label in self._hosts or label == "ul":
            raise ValueError(f"namespace {label} exists in lab {self.tag}")
        self._extra.append(name)
        self._new_netns(name)
        return name

    def _make_gateway(self) -> None:
        dev = f"vg{self.tag}"
        gw_ip = str(self.mgmt_subnet.network_address + 1)
        with IPRoute() as ipr:
            ipr.link(
                "add", ifname=dev, kind="veth", peer={"ifname": "gw", "net_ns_fd": self.underlay_ns}
            )
            idx = ipr.link_lookup(ifname=dev)[0]
            ipr.addr("add", index=idx, address=gw_ip, prefixlen=self.mgmt_subnet.prefixlen)
            ipr.link("set", index=idx, mtu=UNDERLAY_MTU, state="up")
        self.gateway_device = dev
        with IPRoute(netns=self.underlay_ns) as ipr:
            idx = ipr.link_lookup(ifname="gw")[0]
            master = ipr.link_lookup(ifname="br-mgmt")[0]
            ipr.link("set", index=idx, master=master, mtu=UNDERLAY_MTU, state="up")
        self.gateway_ip = gw_ip

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -------------------------------------------------------------- access
    @property
    def hosts(self) -> list[LabHost]:
        return list(self._hosts.values())

    def host(self, name: str) -> LabHost:
        try:
            return self._hosts[name]
        except KeyError:
            raise KeyError(f"no host {name!r} in lab {self.tag}") from None

    def underlay_run(
        self, argv: Sequence[str], *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the underlay namespace (e.g. ``tcpdump`` on a bridge)."""
        return netns_exec(self.underlay_ns, argv, check=check)

    # ---------------------------------------------------------- partitions
    def isolate(self, name: str, *, mgmt: bool = True, data: bool = True) -> None:
        """Drop every frame to or from host ``name`` on its management and/or data link."""
        self.host(name)
        self._isolated[name] = (mgmt, data)
        self._apply_partitions()

    def cut(self, a: str, b: str) -> None:
        """Drop every frame between hosts ``a`` and ``b`` (both directions, both links)."""
        self.host(a)
        self.host(b)
        self._cuts.add(frozenset((a, b)))
        self._apply_partitions()

    def heal(self, name: str | None = None) -> None:
        """Remove every partition (or every one involving host ``name``)."""
        if name is None:
            self._isolated.clear()
            self._cuts.clear()
        else:
            self._isolated.pop(name, None)
            self._cuts = {c for c in self._cuts if name not in c}
        self._apply_partitions()

    def _ports(self, name: str) -> tuple[str, str]:
        return self.host(name).underlay_ports

    def _apply_partitions(self) -> None:
        rules = []
        for name, links in sorted(self._isolated.items()):
            for port, cut in zip(self._ports(name), links, strict=True):
                if cut:
                    rules += [f'iifname "{port}" drop', f'oifname "{port}" drop']
        for pair in sorted(tuple(sorted(c)) for c in self._cuts):
            a, b = pair
            for pa, pb in zip(self._ports(a), self._ports(b), strict=True):
                rules += [
                    f'iifname "{pa}" oifname "{pb}" drop',
                    f'iifname "{pb}" oifname "{pa}" drop',
                ]
        body = "\n".join(f"    {r}" for r in rules)
        script = (
            f"table bridge {_NFT_TABLE}\n"
            f"delete table bridge {_NFT_TABLE}\n"
            f"table bridge {_NFT_TABLE} {{\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            f"{body}\n"
            "  }\n"
            "}\n"
        )
        netns_exec(self.underlay_ns, ["nft", "-f", "-"], input=script)

    # ----------------------------------------------------------- power
    @_off_loop
    def _set_links(self, name: str, state: str) -> None:
        with IPRoute(netns=self.underlay_ns) as ipr:
            for port in self._ports(name):
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], state=state)

    def power_off(self, name: str) -> None:
        """Unplug host ``name``: its links lose carrier (its processes keep running)."""
        self._set_links(name, "down")

    def power_on(self, name: str) -> None:
        """Plug host ``name`` back in."""
        self._set_links(name, "up")

    # ------------------------------------------------------------ teardown
    def _namespaces(self) -> list[str]:
        return [*self._extra, *(h.netns for h in self._hosts.values()), self.underlay_ns]

    @_off_loop
    def stop(self) -> None:
        """Kill what runs inside, delete every namespace, wait until they are gone. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        _live.discard(self)
        for host in self._hosts.values():
            for proc in host._children:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_DESTROY_TIMEOUT)
        errors = []
        for ns in self._namespaces():
            for pid in _ns_pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                if (_NETNS_DIR / ns).exists():
                    netns.remove(ns)
            except OSError as exc:
                errors.append(f"{ns}: {exc}")
        gw = self.gateway_device
        if gw is not None:

            def gateway_gone() -> bool:
                with IPRoute() as ipr:
                    return not ipr.link_lookup(ifname=gw)

            try:
                wait_until(gateway_gone, _DESTROY_TIMEOUT, what=f"{gw} to disappear")
            except HarnessError as exc:
                errors.append(str(exc))
        if errors:
            raise HarnessError("lab teardown: " + "; ".join(errors))


def _stop_leftovers() -> None:
    """atexit: never leave a namespace of ours behind when the interpreter exits."""
    for lab in list(_live):
        with contextlib.suppress(Exception):
            lab.stop()


atexit.register(_stop_leftovers)
