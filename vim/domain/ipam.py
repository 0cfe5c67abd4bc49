"""IP address management of one network: its subnets' layouts, addresses and MACs held.

Stream: `ipam-<network_id>`. It is the serialisation point of everything that
must be unique or consistent on one network, so every such change appends to it
at the version it was decided against, in the same append as the resource's own
stream:

- a port's addresses and MAC (`AddressesAllocated` with the port's stream at 0,
  `AddressesReleased` with its termination): no IP or MAC is held twice, even
  when API nodes allocate concurrently (the loser's append conflicts and it
  decides again on the newer state);
- a subnet's layout (`IpamSubnetAdded`/`IpamSubnetRemoved` with the subnet
  stream): CIDRs of one network never overlap, and a subnet whose addresses are
  held cannot be removed;
- the network's termination (`IpamClosed`): refused while any port holds
  addresses here, and nothing is allocated on a closed network.

Automatic addresses come from the allocation pools only, lowest free first;
addresses a caller asks for may be anywhere in the subnet's CIDR except the
network address, the IPv4 broadcast address and the gateway. Generated MACs are
locally administered unicast addresses in `fa:16:3e`, derived from the port id
and re-picked on collision. The parsing helpers below append field violations
rather than raise, so a servicer reports every bad field at once.
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.errors import AlreadyExists, DomainError, FieldViolation, InvalidInput, NotFound

KIND = "ipam"
MAC_PREFIX = "fa:16:3e"
MAX_POOLS = 32
MAX_FIXED_IPS = 16
PREFIX_LIMITS = {4: (8, 30), 6: (16, 126)}
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_MAC_TRIES = 64

Net = ipaddress.IPv4Network | ipaddress.IPv6Network
Addr = ipaddress.IPv4Address | ipaddress.IPv6Address


def stream(network_id: str) -> str:
    return f"{KIND}-{network_id}"


class PoolExhausted(DomainError):
    """No free address (or segmentation id) is left where one was needed."""


# -- parsing (violations, never raises) ----------------------------------------------


def parse_cidr(fld: str, text: str, out: list[FieldViolation]) -> Net | None:
    """A subnet CIDR: canonical, no host bits, prefix within PREFIX_LIMITS."""
    if not text:
        out.append(FieldViolation(fld, "must not be empty"))
        return None
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        out.append(FieldViolation(fld, f"{text[:64]!r} is not an IPv4 or IPv6 CIDR"))
        return None
    if "/" not in text:
        out.append(FieldViolation(fld, "a prefix length is required (e.g. 10.0.0.0/24)"))
        return None
    if net.network_address != ipaddress.ip_interface(text).ip:
        out.append(FieldViolation(fld, f"host bits are set; did you mean {net}?"))
        return None
    low, high = PREFIX_LIMITS[net.version]
    if not low <= net.prefixlen <= high:
        out.append(FieldViolation(fld, f"IPv{net.version} prefix must be /{low} to /{high}"))
        return None
    return net


def parse_ip(fld: str, text: str, out: list[FieldViolation]) -> Addr | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        out.append(FieldViolation(fld, f"{text[:64]!r} is not an IP address"))
        return None


def parse_mac(fld: str, text: str, out: list[FieldViolation]) -> str | None:
    """A unicast MAC, normalised to lower case with colons."""
    mac = text.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        out.append(FieldViolation(fld, f"{text[:64]!r} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
        return None
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        out.append(FieldViolation(fld, "must be a non-zero unicast MAC address"))
        return None
    return mac


def hosts(net: Net) -> tuple[int, int]:
    """First and last address a host may have: no network, no IPv4 broadcast address."""
    first = int(net.network_address) + 1
    last = int(net.broadcast_address) - (1 if net.version == 4 else 0)
    return first, last


def _addr(net: Net, value: int) -> str:
    return str(type(net.network_address)(value))


# -- subnet layouts --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """A subnet's addressing: CIDR, gateway and inclusive allocation pools."""

    cidr: str
    gateway_ip: str
    pools: tuple[tuple[str, str], ...]

    @property
    def network(self) -> Net:
        return ipaddress.ip_network(self.cidr)

    @property
    def version(self) -> int:
        return self.network.version

    def pool_ranges(self) -> Iterator[tuple[int, int]]:
        for start, end in self.pools:
            yield int(ipaddress.ip_address(start)), int(ipaddress.ip_address(end))


def layout(
    cidr: str,
    gateway_ip: str,
    pools: Sequence[tuple[str, str]],
    out: list[FieldViolation],
) -> Layout | None:
    """A validated layout with defaults filled in, or None with violations added."""
    before = len(out)
    net = parse_cidr("cidr", cidr, out)
    if net is None:
        return None
    first, last = hosts(net)
    gateway = first
    if gateway_ip:
        gw = parse_ip("gateway_ip", gateway_ip, out)
        if gw is not None and (gw.version != net.version or not first <= int(gw) <= last):
            out.append(FieldViolation("gateway_ip", f"must be a host address of {net}"))
        elif gw is not None:
            gateway = int(gw)
    ranges = _pools(net, gateway, pools, out) if pools else _default_pools(first, last, gateway)
    if len(out) > before:
        return None
    return Layout(
        str(net), _addr(net, gateway), tuple((_addr(net, a), _addr(net, b)) for a, b in ranges)
    )


def _default_pools(first: int, last: int, gateway: int) -> list[tuple[int, int]]:
    """Every host address but the gateway, as one or two ranges."""
    ranges = [(first, gateway - 1), (gateway + 1, last)]
    return [(a, b) for a, b in ranges if a <= b]


def _pools(
    net: Net, gateway: int, pools: Sequence[tuple[str, str]], out: list[FieldViolation]
) -> list[tuple[int, int]]:
    first, last = hosts(net)
    if len(pools) > MAX_POOLS:
        out.append(FieldViolation("allocation_pools", f"at most {MAX_POOLS} pools"))
        return []
    ranges: list[tuple[int, int, int]] = []
    for i, (start, end) in enumerate(pools):
        fld = f"allocation_pools[{i}]"
        a, b = parse_ip(f"{fld}.start", start, out), parse_ip(f"{fld}.end", end, out)
        if a is None or b is None:
            continue
        if a.version != net.version or b.version != net.version:
            out.append(FieldViolation(fld, f"must be IPv{net.version} addresses"))
        elif not (first <= int(a) <= last and first <= int(b) <= last):
            out.append(FieldViolation(fld, f"must lie within the host addresses of {net}"))
        elif int(a) > int(b):
            out.append(FieldViolation(fld, "start must not be after end"))
        elif int(a) <= gateway <= int(b):
            out.append(FieldViolation(fld, "must not include the gateway address"))
        else:
            ranges.append((int(a), int(b), i))
    ranges.sort()
    for (_, b1, _), (a2, _, i) in itertools.pairwise(ranges):
        if a2 <= b1:
            out.append(FieldViolation(f"allocation_pools[{i}]", "overlaps another pool"))
    return [(a, b) for a, b, _ in ranges]


# -- events ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IpamSubnetAdded(DomainEvent):
    network_id: str
    subnet_id: str
    cidr: str
    gateway_ip: str
    allocation_pools: list[list[str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class IpamSubnetRemoved(DomainEvent):
    network_id: str
    subnet_id: str


@dataclass(frozen=True, slots=True)
class AddressesAllocated(DomainEvent):
    network_id: str
    port_id: str
    mac_address: str
    fixed_ips: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AddressesReleased(DomainEvent):
    network_id: str
    port_id: str


@dataclass(frozen=True, slots=True)
class IpamClosed(DomainEvent):
    network_id: str


# -- state -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holding:
    """What one port holds: its MAC and (subnet_id, ip) pairs."""

    mac_address: str
    fixed_ips: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Ipam:
    network_id: str
    subnets: dict[str, Layout] = field(default_factory=dict)
    holdings: dict[str, Holding] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)  # ip -> port id
    macs: dict[str, str] = field(default_factory=dict)  # mac -> port id
    closed: bool = False

    def in_use(self, subnet_id: str) -> list[str]:
        """Ports holding an address of the subnet."""
        return [p for p, h in self.holdings.items() if any(s == subnet_id for s, _ in h.fixed_ips)]


def empty(network_id: str) -> Ipam:
    return Ipam(network_id)


def evolve(state: Ipam | None, event: DomainEvent, _recorded: object = None) -> Ipam:
    s = state or Ipam(getattr(event, "network_id", ""))
    match event:
        case IpamSubnetAdded():
            pools = tuple((p[0], p[1]) for p in event.allocation_pools)
            subnets = {**s.subnets, event.subnet_id: Layout(event.cidr, event.gateway_ip, pools)}
            return replace(s, subnets=subnets)
        case IpamSubnetRemoved():
            return replace(s, subnets={k: v for k, v in s.subnets.items() if k != event.subnet_id})
        case AddressesAllocated():
            pairs = tuple((f["subnet_id"], f["ip_address"]) for f in event.fixed_ips)
            return replace(
                s,
                holdings={**s.holdings, event.port_id: Holding(event.mac_address, pairs)},
                ips={**s.ips, **{ip: event.port_id for _, ip in pairs}},
                macs={**s.macs, event.mac_address: event.port_id},
            )
        case AddressesReleased() if event.port_id in s.holdings:
            held = s.holdings[event.port_id]
            gone = {ip for _, ip in held.fixed_ips}
            return replace(
                s,
                holdings={k: v for k, v in s.holdings.items() if k != event.port_id},
                ips={k: v for k, v in s.ips.items() if k not in gone},
                macs={k: v for k, v in s.macs.items() if k != held.mac_address},
            )
        case IpamClosed():
            return replace(s, closed=True)
    return s


# -- decisions ---------------------------------------------------------------------------


def add_subnet(state: Ipam, subnet_id: str, lay: Layout) -> IpamSubnetAdded:
    """Add a subnet's layout; its CIDR must not overlap another subnet of the network."""
    _open(state)
    net = lay.network
    for other_id, other in state.subnets.items():
        if other.version == net.version and other.network.overlaps(net):
            raise DomainError(
                f"{lay.cidr} overlaps {other.cidr} (subnet {other_id}) on this network"
            )
    pools = [[a, b] for a, b in lay.pools]
    return IpamSubnetAdded(state.network_id, subnet_id, lay.cidr, lay.gateway_ip, pools)


def remove_subnet(state: Ipam, subnet_id: str) -> IpamSubnetRemoved:
    users = state.in_use(subnet_id)
    if users:
        raise DomainError(f"subnet {subnet_id} has addresses in use by {len(users)} port(s)")
    return IpamSubnetRemoved(state.network_id, subnet_id)


def close(state: Ipam) -> IpamClosed:
    """Close the network's IPAM; refused while any port holds addresses here."""
    if state.holdings:
        raise DomainError(f"network {state.network_id} still has {len(state.holdings)} port(s)")
    return IpamClosed(state.network_id)


def release(state: Ipam, port_id: str) -> AddressesReleased | None:
    """Release a port's addresses; None if it holds none here (a repeat)."""
    if port_id not in state.holdings:
        return None
    return AddressesReleased(state.network_id, port_id)


def allocate(
    state: Ipam,
    port_id: str,
    requests: Sequence[tuple[str, str | None]],
    mac: str | None = None,
) -> AddressesAllocated:
    """Addresses and a MAC for a new port; see the module docstring for the rules."""
    _open(state)
    if port_id in state.holdings:
        raise AlreadyExists(f"port {port_id} already holds addresses on this network")
    if mac is not None and mac in state.macs:
        raise AlreadyExists(f"MAC address {mac} is in use on network {state.network_id}")
    taken: set[str] = set()
    pairs = _requested(state, requests, taken) if requests else _automatic(state, taken)
    fixed = [{"subnet_id": s, "ip_address": ip} for s, ip in pairs]
    return AddressesAllocated(state.network_id, port_id, mac or _new_mac(state, port_id), fixed)


def _open(state: Ipam) -> None:
    if state.closed:
        raise NotFound(f"network {state.network_id} not found")


def _requested(
    state: Ipam, requests: Sequence[tuple[str, str | None]], taken: set[str]
) -> list[tuple[str, str]]:
    if len(requests) > MAX_FIXED_IPS:
        raise InvalidInput(
            f"at most {MAX_FIXED_IPS} fixed IPs",
            [FieldViolation("fixed_ips", f"at most {MAX_FIXED_IPS} entries")],
        )
    bad: list[FieldViolation] = []
    wanted: list[tuple[int, str, str | None]] = []
    for i, (subnet_id, ip) in enumerate(requests):
        lay = state.subnets.get(subnet_id)
        if lay is None:
            bad.append(
                FieldViolation(f"fixed_ips[{i}].subnet_id", f"not a subnet of {state.network_id}")
            )
        elif ip:
            addr = _explicit(state, lay, f"fixed_ips[{i}].ip_address", ip, taken, bad)
            wanted.append((i, subnet_id, addr))
        else:
            wanted.append((i, subnet_id, None))
    if bad:
        raise InvalidInput("invalid fixed_ips: " + "; ".join(v.description for v in bad), bad)
    # Explicit addresses are all reserved first, so an automatic one never takes them.
    pairs: list[tuple[str, str]] = []
    for _, subnet_id, addr in wanted:
        pairs.append((subnet_id, addr or _free(state, subnet_id, taken)))
    return pairs


def _explicit(
    state: Ipam, lay: Layout, fld: str, text: str, taken: set[str], bad: list[FieldViolation]
) -> str | None:
    addr = parse_ip(fld, text, bad)
    if addr is None:
        return None
    net = lay.network
    first, last = hosts(net)
    ip = str(addr)
    if addr.version != net.version or not first <= int(addr) <= last:
        bad.append(FieldViolation(fld, f"{ip} is not a host address of {lay.cidr}"))
    elif ip == lay.gateway_ip:
        bad.append(FieldViolation(fld, f"{ip} is the subnet's gateway"))
    elif ip in taken:
        bad.append(FieldViolation(fld, f"{ip} is asked for twice"))
    elif ip in state.ips:
        raise AlreadyExists(f"IP address {ip} is in use on network {state.network_id}")
    else:
        taken.add(ip)
        return ip
    return None


def _automatic(state: Ipam, taken: set[str]) -> list[tuple[str, str]]:
    """One address of each IP version the network has subnets of, first subnet with room."""
    pairs: list[tuple[str, str]] = []
    for version in (4, 6):
        candidates = [sid for sid, lay in state.subnets.items() if lay.version == version]
        for sid in candidates:
            ip = _first_free(state, sid, taken)
            if ip is not None:
                taken.add(ip)
                pairs.append((sid, ip))
                break
        else:
            if candidates:
                raise PoolExhausted(
                    f"no free IPv{version} address left on network {state.network_id}"
                )
    return pairs


def _free(state: Ipam, subnet_id: str, taken: set[str]) -> str:
    ip = _first_free(state, subnet_id, taken)
    if ip is None:
        raise PoolExhausted(f"no free address left in the pools of subnet {subnet_id}")
    taken.add(ip)
    return ip


def _first_free(state: Ipam, subnet_id: str, taken: set[str]) -> str | None:
    """The lowest free pool address; the scan skips at most the held addresses."""
    lay = state.subnets[subnet_id]
    net = lay.network
    for start, end in lay.pool_ranges():
        for value in range(start, end + 1):
            ip = _addr(net, value)
            if ip not in state.ips and ip not in taken:
                return ip
    return None


def _new_mac(state: Ipam, port_id: str) -> str:
    for attempt in range(_MAC_TRIES):
        digest = hashlib.sha256(f"{port_id}:{attempt}".encode()).digest()
        mac = MAC_PREFIX + "".join(f":{b:02x}" for b in digest[:3])
        if mac not in state.macs:
            return mac
    raise PoolExhausted(f"could not find a free MAC address on network {state.network_id}")


def fixed_ip_views(pairs: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Fixed IPs as the API's `FixedIp` JSON."""
    return [{"subnetId": str(p["subnet_id"]), "ipAddress": str(p["ip_address"])} for p in pairs]
