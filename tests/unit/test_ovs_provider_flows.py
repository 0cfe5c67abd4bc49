"""The br-prv flow set and the provider-network checks of the OVS driver (pure)."""

from __future__ import annotations

import pytest

from vim.agent.drivers import NetworkPlanEntry
from vim.agent.ovs_driver import _provider_networks, build_provider_flows, flow_cookie
from vim.errors import InvalidInput

INT, PHY = 1, 2
VLAN = NetworkPlanEntry("net-v", "vlan", 101, 5)
FLAT = NetworkPlanEntry("net-f", "flat", 0, 7)
VXLAN = NetworkPlanEntry("net-x", "vxlan", 1001, 6)


def test_no_provider_network_drops_everything() -> None:
    assert build_provider_flows(INT, PHY, []) == ["table=0,priority=0,actions=drop"]


def test_vlan_network_rewrites_the_tag_both_ways() -> None:
    flows = build_provider_flows(INT, PHY, [VLAN])
    assert flows[1:] == [
        "table=0,priority=10,in_port=1,dl_vlan=5,actions=mod_vlan_vid:101,output:2",
        "table=0,priority=10,in_port=2,dl_vlan=101,actions=mod_vlan_vid:5,output:1",
    ]


def test_flat_network_strips_going_out_and_pushes_coming_in() -> None:
    flows = build_provider_flows(INT, PHY, [FLAT])
    assert flows[1:] == [
        "table=0,priority=10,in_port=1,dl_vlan=7,actions=strip_vlan,output:2",
        "table=0,priority=10,in_port=2,vlan_tci=0x0000/0x1fff,actions=mod_vlan_vid:7,output:1",
    ]


def test_flows_are_ordered_so_equal_plans_give_one_cookie() -> None:
    one = build_provider_flows(INT, PHY, [VLAN, FLAT])
    other = build_provider_flows(INT, PHY, [FLAT, VLAN])
    assert one == other
    assert flow_cookie(one) == flow_cookie(other)
    assert flow_cookie(one) != flow_cookie(build_provider_flows(INT, PHY, [VLAN]))
    assert flow_cookie(one) != flow_cookie(build_provider_flows(PHY, INT, [VLAN, FLAT]))


def test_provider_networks_are_chosen_and_vxlan_left_to_br_tun() -> None:
    assert _provider_networks([VXLAN, VLAN, FLAT]) == [VLAN, FLAT]
    assert _provider_networks([VXLAN]) == []


@pytest.mark.parametrize(
    ("networks", "fields"),
    [
        ([NetworkPlanEntry("v", "vlan", 0, 5)], {"networks[0].segmentation_id"}),
        ([NetworkPlanEntry("v", "vlan", 4095, 5)], {"networks[0].segmentation_id"}),
        ([VXLAN, NetworkPlanEntry("f", "flat", 0, 0)], {"networks[1].local_vlan"}),
        ([VLAN, NetworkPlanEntry("w", "vlan", 101, 8)], {"networks.segmentation_id"}),
        ([FLAT, NetworkPlanEntry("g", "flat", 0, 8)], {"networks.network_type"}),
        ([VLAN, NetworkPlanEntry("x", "vxlan", 1002, 5)], {"networks.local_vlan"}),
    ],
)
def test_bad_provider_plans_are_invalid_input(
    networks: list[NetworkPlanEntry], fields: set[str]
) -> None:
    with pytest.raises(InvalidInput) as bad:
        _provider_networks(networks)
    assert {v.field for v in bad.value.violations} == fields


def test_vlan_ids_and_flat_networks_are_unique_per_physical_network_only() -> None:
    a = NetworkPlanEntry("a", "vlan", 101, 5, "physnet1")
    b = NetworkPlanEntry("b", "vlan", 101, 8, "physnet2")
    fa = NetworkPlanEntry("fa", "flat", 0, 9, "physnet1")
    fb = NetworkPlanEntry("fb", "flat", 0, 10, "physnet2")
    assert _provider_networks([a, b, fa, fb]) == [a, b, fa, fb]
    with pytest.raises(InvalidInput):
        _provider_networks([a, NetworkPlanEntry("c", "vlan", 101, 11, "physnet1")])
