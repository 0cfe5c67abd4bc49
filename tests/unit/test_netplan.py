"""Per-host network plans (`vim.domain.netplan`) as pure computations.

Examples pin the shape (which networks, tags, tunnels, ports land on which host);
hypothesis checks the invariants over random placements and random sequences of
changes: local tags unique and in range per host, a network keeps its tag while
present, no tunnel to self, tunnels exactly between hosts sharing a VXLAN
network, and recomputing from the same facts and plans changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from vim.agent.apiclient import _plan
from vim.api.agents import _plan_msg
from vim.domain import netplan, network, server
from vim.domain.base import parse
from vim.domain.netplan import Attachment, HostPlan

T = "2030-01-01T00:00:00.000Z"


def net(nid: str, kind: network.NetworkType, seg: int, physnet: str = "") -> network.Network:
    return network.evolve(
        None, network.NetworkAllocated(nid, "t1", nid, kind.value, physnet, seg, created_at=T)
    )


def att(hostname: str, port: str, nid: str, sid: str = "") -> Attachment:
    return Attachment(hostname, sid or f"srv-{port}", port, nid, f"fa:16:3e:00:00:{port[-2:]}")


NETS = {
    "vx1": net("vx1", network.NetworkType.VXLAN, 1001),
    "vx2": net("vx2", network.NetworkType.VXLAN, 1002),
    "vl1": net("vl1", network.NetworkType.VLAN, 100, "physnet1"),
    "fl1": net("fl1", network.NetworkType.FLAT, 0, "physnet2"),
}
IPS = {"h1": "10.0.0.1", "h2": "10.0.0.2", "h3": "10.0.0.3", "h4": ""}


def test_plan_holds_networks_tags_tunnels_and_ports_of_each_host() -> None:
    attached = [
        att("h1", "p01", "vx1"),
        att("h1", "p02", "vl1"),
        att("h2", "p03", "vx1"),
        att("h2", "p04", "vx2"),
        att("h3", "p05", "vx2"),
        att("h3", "p06", "fl1"),
    ]
    plans = netplan.compute(IPS, NETS, attached, {})
    assert set(plans) == {"h1", "h2", "h3"}
    h1 = plans["h1"]
    assert h1.tunnel_ip == "10.0.0.1"
    assert [(n.network_id, n.network_type, n.segmentation_id) for n in h1.networks] == [
        ("vl1", "vlan", 100),
        ("vx1", "vxlan", 1001),
    ]
    assert h1.local_tags() == {"vl1": 1, "vx1": 2}  # lowest free tags, in network-id order
    assert [(t.remote_host, t.remote_ip) for t in h1.tunnels] == [("h2", "10.0.0.2")]
    assert [(p.port_id, p.network_id, p.local_vlan) for p in h1.ports] == [
        ("p01", "vx1", 2),
        ("p02", "vl1", 1),
    ]
    # h2 shares vx1 with h1 and vx2 with h3; h3's flat network makes no tunnel.
    assert [t.remote_host for t in plans["h2"].tunnels] == ["h1", "h3"]
    assert [t.remote_host for t in plans["h3"].tunnels] == ["h2"]
    assert plans["h3"].local_tags() == {"fl1": 1, "vx2": 2}


def test_tags_are_kept_while_present_and_freed_tags_are_reused() -> None:
    first = netplan.compute(IPS, NETS, [att("h1", "p01", "vx2"), att("h1", "p02", "vx1")], {})
    assert first["h1"].local_tags() == {"vx1": 1, "vx2": 2}
    # vx1 leaves, vl1 and fl1 arrive: vx2 keeps 2, the newcomers take 1 and 3.
    second = netplan.compute(
        IPS,
        NETS,
        [att("h1", "p01", "vx2"), att("h1", "p03", "vl1"), att("h1", "p04", "fl1")],
        first,
    )
    assert second["h1"].local_tags() == {"vx2": 2, "fl1": 1, "vl1": 3}


def test_host_without_ports_gets_an_empty_plan_once() -> None:
    first = netplan.compute(IPS, NETS, [att("h1", "p01", "vx1"), att("h2", "p02", "vx1")], {})
    after = netplan.compute(IPS, NETS, [att("h2", "p02", "vx1")], first)
    assert after["h1"].empty and netplan.changed(first["h1"], after["h1"])
    assert after["h2"].tunnels == ()  # its only peer left
    again = netplan.compute(IPS, NETS, [att("h2", "p02", "vx1")], after)
    assert not netplan.changed(after["h1"], again["h1"])
    assert not netplan.changed(None, HostPlan("h9"))  # nothing ever planned: nothing to write


def test_no_tunnels_to_or_from_a_host_without_tunnel_ip() -> None:
    plans = netplan.compute(IPS, NETS, [att("h1", "p01", "vx1"), att("h4", "p02", "vx1")], {})
    assert plans["h1"].tunnels == () and plans["h4"].tunnels == ()
    assert plans["h4"].ports[0].local_vlan == 1  # still plugged locally


def test_unknown_or_terminated_networks_are_not_planned() -> None:
    gone = network.evolve(NETS["vx2"], network.NetworkTerminated("vx2", T))
    plans = netplan.compute(
        IPS, {**NETS, "vx2": gone}, [att("h1", "p01", "vx2"), att("h1", "p02", "nope")], {}
    )
    assert "h1" not in plans


def test_attachments_come_from_placed_live_servers() -> None:
    flavor = server.FlavorCopy("f", "f", 1, 512, 1)
    nic = server.Nic("p1", "vx1", "fa:16:3e:00:00:01", ("10.0.0.5",))
    s = server.evolve(None, server.allocate("s1", "t1", "s1", flavor, "img", [nic], now=T))
    assert list(netplan.attachments([s])) == []  # not placed yet
    placed = server.evolve(s, server.schedule(s, "h1", "z1", T))
    assert list(netplan.attachments([placed])) == [
        Attachment("h1", "s1", "p1", "vx1", "fa:16:3e:00:00:01")
    ]
    dead = server.evolve(placed, server.terminate(placed, T))
    assert list(netplan.attachments([dead])) == []


def test_event_round_trips_through_storage() -> None:
    plan = netplan.compute(IPS, NETS, [att("h1", "p01", "vx1"), att("h2", "p02", "vx1")], {})["h1"]
    event = plan.event()
    stored = parse(event.type, event.to_data())
    assert isinstance(stored, netplan.HostNetworkPlanned)
    assert netplan.evolve(None, stored) == plan
    assert plan.view()["tunnels"] == [{"remoteHost": "h2", "remoteIp": "10.0.0.2"}]


def test_tags_run_out_after_4094_networks() -> None:
    present = [f"n{i:05d}" for i in range(4096)]
    tags, left = netplan.assign_local_tags(present, {})
    assert len(tags) == 4094 and sorted(tags.values()) == list(range(1, 4095))
    assert left == ("n04094", "n04095")


def test_corrupt_prior_tags_still_give_unique_tags() -> None:
    tags, left = netplan.assign_local_tags(["a", "b", "c"], {"a": 7, "b": 7, "c": 5000})
    assert tags == {"a": 7, "b": 1, "c": 2} and left == ()


def test_segment_clashes_find_duplicate_ids_in_a_pool_only() -> None:
    nets = [
        NETS["vx1"],
        net("vx9", network.NetworkType.VXLAN, 1001),
        net("vl9", network.NetworkType.VLAN, 1001, "physnet1"),  # another pool
        net("vl8", network.NetworkType.VLAN, 1001, "physnet9"),
    ]
    clashes = netplan.segment_clashes(nets)
    assert clashes == [netplan.SegmentClash("vxlan-global", 1001, ("vx1", "vx9"))]
    assert netplan.segment_clashes(NETS.values()) == []


# -- properties ------------------------------------------------------------------------

HOSTS = [f"h{i}" for i in range(6)]
NET_IDS = sorted(NETS)

attachment_st = st.builds(
    lambda h, n, p: Attachment(h, f"s{p}", f"p{p:03d}", n, f"fa:16:3e:00:00:{p:02x}"),
    st.sampled_from(HOSTS),
    st.sampled_from(NET_IDS),
    st.integers(0, 255),
)
ips_st = st.fixed_dictionaries(
    {h: st.sampled_from(["", f"10.0.0.{i + 1}", f"10.0.0.{i + 1}"]) for i, h in enumerate(HOSTS)}
)


def _unique_ports(attached: Iterable[Attachment]) -> list[Attachment]:
    seen: dict[str, Attachment] = {}
    for a in attached:
        seen.setdefault(a.port_id, a)
    return list(seen.values())


def check_invariants(
    plans: Mapping[str, HostPlan], ips: Mapping[str, str], attached: list[Attachment]
) -> None:
    present: dict[str, set[str]] = {}
    for a in attached:
        present.setdefault(a.host, set()).add(a.network_id)
    for hostname, plan in plans.items():
        tags = plan.local_tags()
        assert len(set(tags.values())) == len(tags), f"duplicate local tag on {hostname}"
        assert all(1 <= t <= 4094 for t in tags.values())
        assert set(tags) == present.get(hostname, set())
        assert all(p.local_vlan == tags[p.network_id] for p in plan.ports)
        assert {p.port_id for p in plan.ports} == {
            a.port_id for a in attached if a.host == hostname
        }
        remotes = {t.remote_host for t in plan.tunnels}
        assert hostname not in remotes, "tunnel to self"
        expected = {
            r
            for r in HOSTS
            if r != hostname
            and ips[hostname]
            and ips[r]
            and any(
                NETS[n].network_type is network.NetworkType.VXLAN
                for n in present.get(hostname, set()) & present.get(r, set())
            )
        }
        assert remotes == expected
        assert all(t.remote_ip == ips[t.remote_host] for t in plan.tunnels)


@settings(max_examples=200, deadline=None)
@given(ips_st, st.lists(st.lists(attachment_st, max_size=30), min_size=1, max_size=6))
def test_plans_keep_their_invariants_through_changes(
    ips: dict[str, str], rounds: list[list[Attachment]]
) -> None:
    """Each round is a whole new placement; plans evolve from the previous round's."""
    previous: dict[str, HostPlan] = {}
    for raw in rounds:
        attached = _unique_ports(raw)
        plans = netplan.compute(ips, NETS, attached, previous)
        check_invariants(plans, ips, attached)
        for hostname, plan in plans.items():
            before = previous.get(hostname)
            if before is None:
                continue
            old = before.local_tags()
            for nid, tag in plan.local_tags().items():
                assert old.get(nid, tag) == tag, f"{nid} changed tag on {hostname}"
        # Deterministic and idempotent: a follower recomputing gets equal plans,
        # and recomputing on top of them records nothing.
        assert netplan.compute(ips, NETS, list(reversed(attached)), previous) == plans
        again = netplan.compute(ips, NETS, attached, plans)
        assert not any(netplan.changed(plans.get(h), p) for h, p in again.items())
        # What the controller records: the plans that changed.
        previous |= {h: p for h, p in plans.items() if netplan.changed(previous.get(h), p)}


def test_the_physical_network_reaches_the_agent_through_the_desired_state() -> None:
    """API plan message -> agent plan entry: a vlan network keeps its physical network
    (VLAN ids repeat across physical networks), a vxlan one has none."""
    plan = netplan.HostPlan(
        "cmp-1",
        "10.0.0.1",
        (
            netplan.PlannedNetwork("n-v", "vlan", "physnet2", 101, 3),
            netplan.PlannedNetwork("n-x", "vxlan", "", 1001, 4),
        ),
    )
    got = _plan(_plan_msg(plan))
    assert got is not None
    assert [(n.network_id, n.physical_network) for n in got.networks] == [
        ("n-v", "physnet2"),
        ("n-x", ""),
    ]
