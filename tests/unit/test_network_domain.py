"""Networks, subnets, segmentation pools, IPAM and ports as pure decisions.

Each test gives events, runs a decision, and checks the events it returns (or the
error). Hypothesis checks the IPAM invariant: whatever sequence of allocations
and releases, no address is held twice, and automatic addresses come from the
allocation pools only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vim.domain import ipam, network, port
from vim.domain.base import DomainEvent, parse
from vim.errors import AlreadyExists, DomainError, FieldViolation, InvalidInput, NotFound

NOW = "2024-01-01T00:00:00.000Z"
NET = "net-1"


def fold(evolve: Any, events: Iterable[DomainEvent]) -> Any:
    state = None
    for e in events:
        state = evolve(state, e)
    return state


def layout(cidr: str, gateway: str = "", pools: list[tuple[str, str]] | None = None) -> ipam.Layout:
    out: list[FieldViolation] = []
    lay = ipam.layout(cidr, gateway, pools or [], out)
    assert lay is not None, out
    return lay


def with_subnets(*subnets: tuple[str, ipam.Layout]) -> ipam.Ipam:
    state = ipam.empty(NET)
    for sid, lay in subnets:
        state = ipam.evolve(state, ipam.add_subnet(state, sid, lay))
    return state


def violations(
    cidr: str, gateway: str = "", pools: list[tuple[str, str]] | None = None
) -> list[str]:
    out: list[FieldViolation] = []
    assert ipam.layout(cidr, gateway, pools or [], out) is None
    return [v.field for v in out]


# -- segmentation ids ----------------------------------------------------------------------


def test_vlan_gets_lowest_free_id_and_release_returns_it() -> None:
    pool_name = network.pool_id(network.NetworkType.VLAN, "physnet1")
    assert pool_name == "vlan-physnet1"
    given_ = [
        network.SegmentReserved(pool_name, 1, "a"),
        network.SegmentReserved(pool_name, 2, "b"),
        network.SegmentReleased(pool_name, 1, "a"),
    ]
    pool = fold(network.evolve_pool, given_)
    created, seg = network.allocate(
        "c", "t1", "net", network.NetworkType.VLAN, "physnet1", False, {}, pool, NOW
    )
    assert seg == network.SegmentReserved(pool_name, 1, "c")
    assert created.segmentation_id == 1
    assert created.network_type == "VLAN"


def test_vlan_pool_exhausted() -> None:
    pool = network.SegmentPool("vlan-p", {i: f"n{i}" for i in range(1, 4095)})
    with pytest.raises(ipam.PoolExhausted):
        network.reserve_segment(pool, "vlan-p", network.NetworkType.VLAN, "x")


def test_second_flat_network_on_a_physnet_is_refused() -> None:
    pool = fold(network.evolve_pool, [network.SegmentReserved("flat-p", 0, "a")])
    with pytest.raises(DomainError, match="already has a flat network"):
        network.reserve_segment(pool, "flat-p", network.NetworkType.FLAT, "b")


def test_vxlan_pool_is_global_and_terminate_releases() -> None:
    created, seg = network.allocate(
        "n", "t1", "x", network.NetworkType.VXLAN, "", False, {}, None, NOW
    )
    assert (seg.pool, seg.segmentation_id) == ("vxlan-global", 1)
    state = fold(network.evolve, [created])
    ended, released = network.terminate(state, NOW)
    assert released == network.SegmentReleased("vxlan-global", 1, "n")
    assert fold(network.evolve, [created, ended]).terminated
    with pytest.raises(NotFound):
        network.terminate(fold(network.evolve, [created, ended]), NOW)


def test_network_update_is_empty_when_nothing_changes() -> None:
    state = fold(
        network.evolve,
        [network.NetworkAllocated("n", "t", "a", "VXLAN", "", 7, metadata={"k": "v"})],
    )
    assert network.update(state, "a", {"k": "v"}, NOW) == []
    assert network.update(state, "b", None, NOW) == [
        network.NetworkUpdated("n", "b", {"k": "v"}, NOW)
    ]


def test_events_round_trip_through_their_stored_form() -> None:
    events: list[DomainEvent] = [
        network.NetworkAllocated("n", "t", "a", "VLAN", "p", 5, True, {"a": "b"}, NOW),
        network.SubnetAllocated("s", "n", "t", "", "10.0.0.0/24", 4, "10.0.0.1", [["a", "b"]]),
        ipam.AddressesAllocated(
            "n", "p", "fa:16:3e:00:00:01", [{"subnet_id": "s", "ip_address": "x"}]
        ),
        port.PortBound("p", "server-1", NOW),
    ]
    for e in events:
        assert parse(e.type, e.to_data()) == e


# -- subnet layouts ------------------------------------------------------------------------


def test_default_layout_v4_excludes_network_broadcast_and_gateway() -> None:
    lay = layout("10.0.0.0/24")
    assert (lay.gateway_ip, lay.pools) == ("10.0.0.1", (("10.0.0.2", "10.0.0.254"),))
    middle = layout("10.0.0.0/29", gateway="10.0.0.3")
    assert middle.pools == (("10.0.0.1", "10.0.0.2"), ("10.0.0.4", "10.0.0.6"))


def test_default_layout_v6() -> None:
    lay = layout("2001:DB8::/64")
    assert lay.cidr == "2001:db8::/64"
    assert lay.version == 6
    assert lay.gateway_ip == "2001:db8::1"
    assert lay.pools == (("2001:db8::2", "2001:db8::ffff:ffff:ffff:ffff"),)


@pytest.mark.parametrize(
    ("cidr", "gateway", "pools", "fields"),
    [
        ("", "", [], ["cidr"]),
        ("10.0.0.1/24", "", [], ["cidr"]),
        ("10.0.0.0", "", [], ["cidr"]),
        ("10.0.0.0/31", "", [], ["cidr"]),
        ("2001:db8::/127", "", [], ["cidr"]),
        ("not-a-cidr", "", [], ["cidr"]),
        ("10.0.0.0/24", "10.0.1.1", [], ["gateway_ip"]),
        ("10.0.0.0/24", "10.0.0.255", [], ["gateway_ip"]),
        ("10.0.0.0/24", "2001:db8::1", [], ["gateway_ip"]),
        ("10.0.0.0/24", "nope", [], ["gateway_ip"]),
        ("10.0.0.0/24", "", [("10.0.0.10", "10.0.1.5")], ["allocation_pools[0]"]),
        ("10.0.0.0/24", "", [("10.0.0.20", "10.0.0.10")], ["allocation_pools[0]"]),
        ("10.0.0.0/24", "", [("10.0.0.1", "10.0.0.10")], ["allocation_pools[0]"]),
        (
            "10.0.0.0/24",
            "",
            [("10.0.0.10", "10.0.0.20"), ("10.0.0.15", "10.0.0.30")],
            ["allocation_pools[1]"],
        ),
        ("10.0.0.0/24", "", [("x", "10.0.0.30")], ["allocation_pools[0].start"]),
    ],
)
def test_bad_layouts_name_the_bad_field(
    cidr: str, gateway: str, pools: list[tuple[str, str]], fields: list[str]
) -> None:
    assert violations(cidr, gateway, pools) == fields


def test_overlapping_subnets_on_one_network_are_refused() -> None:
    state = with_subnets(("s1", layout("10.0.0.0/24")))
    with pytest.raises(DomainError, match="overlaps"):
        ipam.add_subnet(state, "s2", layout("10.0.0.128/25"))
    # Another version never overlaps.
    assert ipam.add_subnet(state, "s3", layout("2001:db8::/64")).subnet_id == "s3"


# -- addresses and MACs --------------------------------------------------------------------


def test_automatic_allocation_takes_one_address_per_version_lowest_first() -> None:
    state = with_subnets(("v4", layout("10.0.0.0/29")), ("v6", layout("2001:db8::/64")))
    first = ipam.allocate(state, "p1", [])
    assert first.fixed_ips == [
        {"subnet_id": "v4", "ip_address": "10.0.0.2"},
        {"subnet_id": "v6", "ip_address": "2001:db8::2"},
    ]
    assert first.mac_address.startswith("fa:16:3e:")
    state = ipam.evolve(state, first)
    second = ipam.allocate(state, "p2", [])
    assert [f["ip_address"] for f in second.fixed_ips] == ["10.0.0.3", "2001:db8::3"]
    assert second.mac_address != first.mac_address


def test_released_address_is_reused_and_exhaustion_is_a_domain_error() -> None:
    state = with_subnets(("s", layout("10.0.0.0/29")))  # pool .2-.6: five addresses
    for i in range(5):
        state = ipam.evolve(state, ipam.allocate(state, f"p{i}", [("s", None)]))
    with pytest.raises(ipam.PoolExhausted):
        ipam.allocate(state, "p9", [])
    released = ipam.release(state, "p2")
    assert released == ipam.AddressesReleased(NET, "p2")
    state = ipam.evolve(state, released)
    again = ipam.allocate(state, "p9", [])
    assert again.fixed_ips == [{"subnet_id": "s", "ip_address": "10.0.0.4"}]
    assert ipam.release(state, "p2") is None


def test_explicit_addresses_and_macs() -> None:
    state = with_subnets(("s", layout("10.0.0.0/24")))
    got = ipam.allocate(state, "p1", [("s", "10.0.0.50"), ("s", None)], "FA:16:3E:AA:BB:CC".lower())
    assert got.fixed_ips == [
        {"subnet_id": "s", "ip_address": "10.0.0.50"},
        {"subnet_id": "s", "ip_address": "10.0.0.2"},
    ]
    state = ipam.evolve(state, got)
    with pytest.raises(AlreadyExists):
        ipam.allocate(state, "p2", [("s", "10.0.0.50")])
    with pytest.raises(AlreadyExists):
        ipam.allocate(state, "p2", [], "fa:16:3e:aa:bb:cc")


@pytest.mark.parametrize(
    ("requests", "field"),
    [
        ([("other", None)], "fixed_ips[0].subnet_id"),
        ([("s", "10.0.1.5")], "fixed_ips[0].ip_address"),
        ([("s", "10.0.0.0")], "fixed_ips[0].ip_address"),
        ([("s", "10.0.0.255")], "fixed_ips[0].ip_address"),
        ([("s", "10.0.0.1")], "fixed_ips[0].ip_address"),
        ([("s", "10.0.0.9"), ("s", "10.0.0.9")], "fixed_ips[1].ip_address"),
        ([("s", "bogus")], "fixed_ips[0].ip_address"),
    ],
)
def test_bad_fixed_ips_are_invalid_input(
    requests: list[tuple[str, str | None]], field: str
) -> None:
    state = with_subnets(("s", layout("10.0.0.0/24")))
    with pytest.raises(InvalidInput) as err:
        ipam.allocate(state, "p", requests)
    assert [v.field for v in err.value.violations] == [field]


@pytest.mark.parametrize("mac", ["01:00:5e:00:00:01", "00:00:00:00:00:00", "fa:16:3e:zz:00:00"])
def test_bad_macs(mac: str) -> None:
    out: list[FieldViolation] = []
    assert ipam.parse_mac("mac_address", mac, out) is None
    assert [v.field for v in out] == ["mac_address"]


def test_subnet_in_use_and_network_with_ports_cannot_go() -> None:
    state = with_subnets(("s", layout("10.0.0.0/24")), ("t", layout("10.1.0.0/24")))
    state = ipam.evolve(state, ipam.allocate(state, "p", [("s", None)]))
    with pytest.raises(DomainError, match="in use"):
        ipam.remove_subnet(state, "s")
    assert ipam.remove_subnet(state, "t") == ipam.IpamSubnetRemoved(NET, "t")
    with pytest.raises(DomainError, match="port"):
        ipam.close(state)
    state = ipam.evolve(state, ipam.AddressesReleased(NET, "p"))
    closed = ipam.evolve(state, ipam.close(state))
    with pytest.raises(NotFound):
        ipam.allocate(closed, "q", [])
    with pytest.raises(NotFound):
        ipam.add_subnet(closed, "u", layout("10.2.0.0/24"))


def test_network_without_subnets_gives_a_port_only_a_mac() -> None:
    got = ipam.allocate(ipam.empty(NET), "p", [])
    assert got.fixed_ips == []


# -- ports ---------------------------------------------------------------------------------


def _port(device: str = "") -> port.Port:
    created = port.allocate("p", NET, "t", "eth0", "fa:16:3e:00:00:01", [], device, {}, NOW)
    state: port.Port = port.evolve(None, created)
    return state


def test_bind_is_idempotent_and_refuses_a_second_device() -> None:
    state = _port()
    assert port.bind(state, "srv-1", NOW) == [port.PortBound("p", "srv-1", NOW)]
    bound = fold(
        port.evolve, [port.PortAllocated("p", NET, "t", "", "m"), port.PortBound("p", "srv-1")]
    )
    assert port.bind(bound, "srv-1", NOW) == []
    with pytest.raises(DomainError):
        port.bind(bound, "srv-2", NOW)
    assert port.set_device(bound, "srv-2", NOW) == [
        port.PortUnbound("p", "srv-1", NOW),
        port.PortBound("p", "srv-2", NOW),
    ]
    assert port.set_device(bound, "", NOW) == [port.PortUnbound("p", "srv-1", NOW)]


def test_bound_port_terminates_only_by_force() -> None:
    bound = _port("srv-1")
    with pytest.raises(DomainError, match="unbind"):
        port.terminate(bound, NOW)
    assert port.terminate(bound, NOW, force=True) == port.PortTerminated("p", NET, NOW)
    assert port.terminate(_port(), NOW) == port.PortTerminated("p", NET, NOW)


def test_port_view_is_proto_json() -> None:
    created = port.allocate(
        "p",
        NET,
        "t",
        "eth0",
        "fa:16:3e:00:00:01",
        [{"subnet_id": "s", "ip_address": "10.0.0.2"}],
        "",
        {"a": "b"},
        NOW,
    )
    view = port.evolve(None, created).view()
    assert view["fixedIps"] == [{"subnetId": "s", "ipAddress": "10.0.0.2"}]
    assert view["macAddress"] == "fa:16:3e:00:00:01"


# -- the IPAM invariant --------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("auto"), st.integers(0, 40)),
        st.tuples(st.just("ask"), st.integers(0, 40), st.integers(0, 31)),
        st.tuples(st.just("release"), st.integers(0, 40)),
    ),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(
    ops=_ops,
    pool_bounds=st.lists(st.tuples(st.integers(2, 29), st.integers(0, 4)), min_size=0, max_size=3),
)
def test_ipam_never_hands_out_a_duplicate_or_out_of_pool_address(
    ops: list[tuple[Any, ...]], pool_bounds: list[tuple[int, int]]
) -> None:
    # Disjoint pools inside 10.0.0.0/27 (gateway .1), built from the drawn bounds.
    pools: list[tuple[str, str]] = []
    used: set[int] = set()
    for start, length in pool_bounds:
        span = set(range(start, min(start + length, 30) + 1))
        if span & used:
            continue
        used |= span
        pools.append((f"10.0.0.{min(span)}", f"10.0.0.{max(span)}"))
    lay = layout("10.0.0.0/27", pools=pools)
    in_pool = {ipaddress.ip_address(a) + i for a, b in lay.pool_ranges() for i in range(b - a + 1)}
    state = with_subnets(("s", lay))
    automatic: dict[str, str] = {}
    for op in ops:
        pid = f"p{op[1]}"
        try:
            if op[0] == "auto":
                event = ipam.allocate(state, pid, [])
                automatic[pid] = event.fixed_ips[0]["ip_address"]
            elif op[0] == "ask":
                event = ipam.allocate(state, pid, [("s", f"10.0.0.{op[2]}")])
            else:
                released = ipam.release(state, pid)
                if released is None:
                    continue
                event = released  # type: ignore[assignment]
                automatic.pop(pid, None)
        except (DomainError, AlreadyExists, InvalidInput):
            continue
        state = ipam.evolve(state, event)
        held = [ip for h in state.holdings.values() for _, ip in h.fixed_ips]
        assert len(held) == len(set(held)), "an address is held twice"
        assert sorted(held) == sorted(state.ips)
        macs = [h.mac_address for h in state.holdings.values()]
        assert len(macs) == len(set(macs)), "a MAC is held twice"
        for ip in automatic.values():
            assert ipaddress.ip_address(ip) in in_pool, f"{ip} is outside the pools"
        for ip in held:
            assert ipaddress.ip_address(ip) in lay.network and ip not in (
                "10.0.0.0",
                "10.0.0.31",
                lay.gateway_ip,
            )
