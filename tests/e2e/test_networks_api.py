"""The `vim.v1.Networks` service on a real API node, over a real gRPC channel.

Each test starts an `ApiNode` in this process on its own SQLite event log, mints
bearer tokens with the node's secret and calls it through `grpc.aio`. What is
checked is what a client sees: statuses, BadRequest field names, the answers,
and (for idempotency) that a repeat writes nothing to the log.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from vim._gen.vim.v1 import networks_pb2 as pb
from vim._gen.vim.v1 import networks_pb2_grpc
from vim.api.auth import Authenticator
from vim.api.server import ApiConfig, ApiNode

SECRET = b"x" * 32
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Api:
    node: ApiNode
    stub: networks_pb2_grpc.NetworksAsyncStub
    alice: Metadata  # member of tenant-a
    bob: Metadata  # member of tenant-b
    admin: Metadata  # admin of tenant-ops

    async def head(self) -> int:
        assert self.node.node is not None
        return await self.node.node.log.head()


def _auth(user: str, tenant: str, *roles: str) -> Metadata:
    return (("authorization", "Bearer " + Authenticator(SECRET).mint(user, tenant, roles)),)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    config = ApiConfig(
        listen="127.0.0.1:0",
        eventlog_url=f"sqlite:///{tmp_path / 'eventlog.db'}",
        metrics_listen=None,
        auth_secret=SECRET,
        grace_s=1.0,
    )
    node = ApiNode(config)
    await node.start()
    try:
        async with grpc.aio.insecure_channel(node.address) as channel:
            yield Api(
                node,
                networks_pb2_grpc.NetworksStub(channel),
                _auth("alice", "tenant-a", "member"),
                _auth("bob", "tenant-b", "member"),
                _auth("root", "tenant-ops", "admin"),
            )
    finally:
        await node.stop()


_counter = iter(range(1_000_000))


def rid() -> str:
    return f"req-{next(_counter)}"


async def status_of(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


def bad_fields(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def vlan(api: Api, md: Metadata, name: str = "net", **kw: Any) -> pb.Network:
    request = pb.AllocateNetworkRequest(
        request_id=rid(),
        name=name,
        network_type=pb.NETWORK_TYPE_VLAN,
        physical_network="physnet1",
        **kw,
    )
    result: pb.Network = await api.stub.AllocateNetwork(request, metadata=md)
    return result


async def subnet(api: Api, md: Metadata, network_id: str, cidr: str, **kw: Any) -> pb.Subnet:
    request = pb.AllocateSubnetRequest(request_id=rid(), network_id=network_id, cidr=cidr, **kw)
    result: pb.Subnet = await api.stub.AllocateSubnet(request, metadata=md)
    return result


async def new_port(api: Api, md: Metadata, network_id: str, **kw: Any) -> pb.Port:
    request = pb.AllocatePortRequest(request_id=rid(), network_id=network_id, **kw)
    result: pb.Port = await api.stub.AllocatePort(request, metadata=md)
    return result


# -- tests -----------------------------------------------------------------------------------


async def test_networks_get_distinct_segmentation_ids_and_release_them(api: Api) -> None:
    a = await vlan(api, api.alice, "a")
    b = await vlan(api, api.alice, "b")
    vx = await api.stub.AllocateNetwork(
        pb.AllocateNetworkRequest(
            request_id=rid(), name="overlay", network_type=pb.NETWORK_TYPE_VXLAN
        ),
        metadata=api.alice,
    )
    assert (a.segmentation_id, b.segmentation_id) == (1, 2)
    assert vx.segmentation_id == 1 and vx.network_type == pb.NETWORK_TYPE_VXLAN
    assert a.tenant_id == "tenant-a" and a.physical_network == "physnet1"
    got = await api.stub.GetNetwork(
        pb.GetNetworkRequest(network_id=a.network_id), metadata=api.alice
    )
    assert got == a

    # Concurrent allocations on one pool never share an id.
    many = await asyncio.gather(*(vlan(api, api.alice, f"c{i}") for i in range(10)))
    ids = [n.segmentation_id for n in many] + [a.segmentation_id, b.segmentation_id]
    assert len(set(ids)) == len(ids)

    await api.stub.TerminateNetwork(
        pb.TerminateNetworkRequest(request_id=rid(), network_id=a.network_id), metadata=api.alice
    )
    assert (await vlan(api, api.alice, "again")).segmentation_id == 1  # released, reused
    err = await status_of(
        api.stub.GetNetwork(pb.GetNetworkRequest(network_id=a.network_id), metadata=api.alice)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND


async def test_subnets_v4_and_v6_and_ports_get_distinct_addresses(api: Api) -> None:
    net = await vlan(api, api.alice)
    v4 = await subnet(api, api.alice, net.network_id, "10.0.0.0/24", name="v4")
    v6 = await subnet(api, api.alice, net.network_id, "2001:db8::/64")
    assert (v4.ip_version, v4.gateway_ip) == (4, "10.0.0.1")
    assert [(p.start, p.end) for p in v4.allocation_pools] == [("10.0.0.2", "10.0.0.254")]
    assert (v6.ip_version, v6.gateway_ip) == (6, "2001:db8::1")

    ports = [await new_port(api, api.alice, net.network_id, name=f"p{i}") for i in range(5)]
    macs = {p.mac_address for p in ports}
    assert len(macs) == 5 and all(m.startswith("fa:16:3e:") for m in macs)
    v4s = [f.ip_address for p in ports for f in p.fixed_ips if f.subnet_id == v4.subnet_id]
    v6s = [f.ip_address for p in ports for f in p.fixed_ips if f.subnet_id == v6.subnet_id]
    assert len(set(v4s)) == 5 and len(set(v6s)) == 5
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(v4.cidr) for ip in v4s)

    fixed = await new_port(
        api,
        api.alice,
        net.network_id,
        fixed_ips=[pb.FixedIp(subnet_id=v4.subnet_id, ip_address="10.0.0.200")],
        mac_address="FA:16:3E:01:02:03",
        device_id="server-1",
    )
    assert [f.ip_address for f in fixed.fixed_ips] == ["10.0.0.200"]
    assert fixed.mac_address == "fa:16:3e:01:02:03"
    taken = await status_of(
        new_port(
            api,
            api.alice,
            net.network_id,
            fixed_ips=[pb.FixedIp(subnet_id=v4.subnet_id, ip_address="10.0.0.200")],
        )
    )
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS
    listed = await api.stub.ListPorts(
        pb.ListPortsRequest(network_id=net.network_id, device_id="server-1"), metadata=api.alice
    )
    assert [p.port_id for p in listed.ports] == [fixed.port_id]
    subnets = await api.stub.ListSubnets(
        pb.ListSubnetsRequest(network_id=net.network_id), metadata=api.alice
    )
    assert {s.subnet_id for s in subnets.subnets} == {v4.subnet_id, v6.subnet_id}


async def test_fifty_concurrent_ports_on_a_small_subnet(api: Api) -> None:
    net = await vlan(api, api.alice)
    sub = await subnet(api, api.alice, net.network_id, "192.168.7.0/28")  # 13 usable
    results = await asyncio.gather(
        *(new_port(api, api.alice, net.network_id) for _ in range(50)), return_exceptions=True
    )
    ok = [r for r in results if isinstance(r, pb.Port)]
    failed = [r for r in results if not isinstance(r, pb.Port)]
    assert len(ok) == 13
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in failed)
    assert {e.code() for e in failed if isinstance(e, grpc.aio.AioRpcError)} == {
        grpc.StatusCode.FAILED_PRECONDITION
    }
    ips = [p.fixed_ips[0].ip_address for p in ok]
    assert len(set(ips)) == 13
    assert len({p.mac_address for p in ok}) == 13
    assert sub.gateway_ip not in ips


async def test_terminations_are_refused_while_in_use(api: Api) -> None:
    net = await vlan(api, api.alice)
    sub = await subnet(api, api.alice, net.network_id, "10.9.0.0/24")
    p = await new_port(api, api.alice, net.network_id, device_id="server-9")

    async def terminate_subnet() -> Any:
        return await api.stub.TerminateSubnet(
            pb.TerminateSubnetRequest(request_id=rid(), subnet_id=sub.subnet_id),
            metadata=api.alice,
        )

    async def terminate_network() -> Any:
        return await api.stub.TerminateNetwork(
            pb.TerminateNetworkRequest(request_id=rid(), network_id=net.network_id),
            metadata=api.alice,
        )

    async def terminate_port() -> Any:
        return await api.stub.TerminatePort(
            pb.TerminatePortRequest(request_id=rid(), port_id=p.port_id), metadata=api.alice
        )

    for call in (terminate_subnet, terminate_network, terminate_port):
        err = await status_of(call())
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, call.__name__
    unbound = await api.stub.UpdatePort(
        pb.UpdatePortRequest(
            request_id=rid(), port_id=p.port_id, update_mask=FieldMask(paths=["device_id"])
        ),
        metadata=api.alice,
    )
    assert unbound.device_id == ""
    await terminate_port()
    await terminate_subnet()
    await terminate_network()
    listed = await api.stub.ListNetworks(pb.ListNetworksRequest(), metadata=api.alice)
    assert net.network_id not in {n.network_id for n in listed.networks}


async def test_tenant_isolation_and_shared_networks(api: Api) -> None:
    private = await vlan(api, api.alice)
    sub = await subnet(api, api.alice, private.network_id, "10.1.0.0/24")
    p = await new_port(api, api.alice, private.network_id)
    for call in (
        api.stub.GetNetwork(pb.GetNetworkRequest(network_id=private.network_id), metadata=api.bob),
        api.stub.GetSubnet(pb.GetSubnetRequest(subnet_id=sub.subnet_id), metadata=api.bob),
        api.stub.GetPort(pb.GetPortRequest(port_id=p.port_id), metadata=api.bob),
        new_port(api, api.bob, private.network_id),
        subnet(api, api.bob, private.network_id, "10.2.0.0/24"),
        api.stub.TerminatePort(
            pb.TerminatePortRequest(request_id=rid(), port_id=p.port_id), metadata=api.bob
        ),
    ):
        assert (await status_of(call)).code() == grpc.StatusCode.NOT_FOUND
    assert not (await api.stub.ListNetworks(pb.ListNetworksRequest(), metadata=api.bob)).networks
    assert not (await api.stub.ListPorts(pb.ListPortsRequest(), metadata=api.bob)).ports

    # Only an admin makes a shared network; every tenant then sees it and attaches to it.
    denied = await status_of(vlan(api, api.alice, shared=True))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    shared = await vlan(api, api.admin, "public", shared=True)
    await subnet(api, api.admin, shared.network_id, "172.16.0.0/24")
    bobs = await new_port(api, api.bob, shared.network_id)
    assert bobs.tenant_id == "tenant-b" and len(bobs.fixed_ips) == 1
    visible = await api.stub.ListNetworks(pb.ListNetworksRequest(), metadata=api.bob)
    assert [n.network_id for n in visible.networks] == [shared.network_id]
    changed = await status_of(
        api.stub.UpdateNetwork(
            pb.UpdateNetworkRequest(request_id=rid(), network_id=shared.network_id, name="x"),
            metadata=api.bob,
        )
    )
    assert changed.code() == grpc.StatusCode.PERMISSION_DENIED
    # The admin sees everything; alice does not see bob's port on the shared network.
    every = await api.stub.ListPorts(pb.ListPortsRequest(), metadata=api.admin)
    assert {p.port_id, bobs.port_id} <= {x.port_id for x in every.ports}
    mine = await api.stub.ListPorts(pb.ListPortsRequest(), metadata=api.alice)
    assert [x.port_id for x in mine.ports] == [p.port_id]


async def test_allocate_port_is_idempotent_by_request_id(api: Api) -> None:
    net = await vlan(api, api.alice)
    await subnet(api, api.alice, net.network_id, "10.3.0.0/24")
    request = pb.AllocatePortRequest(request_id="port-once", network_id=net.network_id, name="a")
    first = await api.stub.AllocatePort(request, metadata=api.alice)
    head = await api.head()
    again = await api.stub.AllocatePort(request, metadata=api.alice)
    assert again == first
    assert await api.head() == head, "a repeat must not write"
    other = pb.AllocatePortRequest(request_id="port-once", network_id=net.network_id, name="b")
    err = await status_of(api.stub.AllocatePort(other, metadata=api.alice))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert await api.head() == head
    listed = await api.stub.ListPorts(pb.ListPortsRequest(), metadata=api.alice)
    assert [p.port_id for p in listed.ports] == [first.port_id]


async def test_update_network_and_port(api: Api) -> None:
    net = await vlan(api, api.alice, "before", metadata={"a": "1"})
    renamed = await api.stub.UpdateNetwork(
        pb.UpdateNetworkRequest(request_id=rid(), network_id=net.network_id, name="after"),
        metadata=api.alice,
    )
    assert (renamed.name, dict(renamed.metadata)) == ("after", {"a": "1"})
    cleared = await api.stub.UpdateNetwork(
        pb.UpdateNetworkRequest(
            request_id=rid(), network_id=net.network_id, update_mask=FieldMask(paths=["metadata"])
        ),
        metadata=api.alice,
    )
    assert (cleared.name, dict(cleared.metadata)) == ("after", {})
    p = await new_port(api, api.alice, net.network_id)
    bound = await api.stub.UpdatePort(
        pb.UpdatePortRequest(request_id=rid(), port_id=p.port_id, device_id="srv", name="eth0"),
        metadata=api.alice,
    )
    assert (bound.device_id, bound.name, bound.mac_address) == ("srv", "eth0", p.mac_address)
    assert bound == await api.stub.GetPort(pb.GetPortRequest(port_id=p.port_id), metadata=api.alice)


NET_ID = "00000000-0000-4000-8000-000000000000"
Call = Callable[[Api, str, str], Awaitable[Any]]


def _net(**kw: Any) -> Call:
    async def call(api: Api, network_id: str, subnet_id: str) -> Any:
        fields = {"request_id": rid(), "name": "n", "network_type": pb.NETWORK_TYPE_VXLAN, **kw}
        return await api.stub.AllocateNetwork(
            pb.AllocateNetworkRequest(**fields), metadata=api.alice
        )

    return call


def _sub(**kw: Any) -> Call:
    async def call(api: Api, network_id: str, subnet_id: str) -> Any:
        fields = {"request_id": rid(), "network_id": network_id, "cidr": "10.5.0.0/24", **kw}
        return await api.stub.AllocateSubnet(pb.AllocateSubnetRequest(**fields), metadata=api.alice)

    return call


def _port(**kw: Any) -> Call:
    async def call(api: Api, network_id: str, subnet_id: str) -> Any:
        fixed = kw.pop("fixed", None)
        fields: dict[str, Any] = {"request_id": rid(), "network_id": network_id, **kw}
        if fixed is not None:
            fields["fixed_ips"] = [pb.FixedIp(subnet_id=subnet_id, ip_address=fixed)]
        return await api.stub.AllocatePort(pb.AllocatePortRequest(**fields), metadata=api.alice)

    return call


@pytest.mark.parametrize(
    ("call", "fields"),
    [
        (_net(name=""), ["name"]),
        (_net(name="x" * 256), ["name"]),
        (_net(network_type=pb.NETWORK_TYPE_UNSPECIFIED), ["network_type"]),
        (_net(network_type=pb.NETWORK_TYPE_VLAN), ["physical_network"]),
        (
            _net(network_type=pb.NETWORK_TYPE_FLAT, physical_network="bad name"),
            ["physical_network"],
        ),
        (_net(physical_network="physnet1"), ["physical_network"]),
        (_net(request_id=""), ["request_id"]),
        (_net(name="", network_type=0), ["name", "network_type"]),
        (_sub(cidr="10.5.0.1/24"), ["cidr"]),
        (_sub(cidr="10.5.0.0/31"), ["cidr"]),
        (_sub(cidr="10.5.0.0/33"), ["cidr"]),
        (_sub(cidr="2001:db8::/127"), ["cidr"]),
        (_sub(gateway_ip="10.6.0.1"), ["gateway_ip"]),
        (
            _sub(allocation_pools=[pb.AllocationPool(start="10.5.0.10", end="10.5.1.9")]),
            ["allocation_pools[0]"],
        ),
        (
            _sub(
                allocation_pools=[
                    pb.AllocationPool(start="10.5.0.10", end="10.5.0.20"),
                    pb.AllocationPool(start="10.5.0.20", end="10.5.0.30"),
                ]
            ),
            ["allocation_pools[1]"],
        ),
        (_sub(network_id="not-a-uuid", name="\x00"), ["network_id", "name"]),
        (_port(mac_address="01:00:5e:00:00:01"), ["mac_address"]),
        (_port(mac_address="zz"), ["mac_address"]),
        (_port(fixed="10.9.9.9"), ["fixed_ips[0].ip_address"]),
        (_port(fixed="10.4.0.255"), ["fixed_ips[0].ip_address"]),
        (_port(fixed="not-an-ip"), ["fixed_ips[0].ip_address"]),
        (_port(name="y" * 256), ["name"]),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_fields(
    api: Api, call: Call, fields: list[str]
) -> None:
    net = await vlan(api, api.alice)
    sub = await subnet(api, api.alice, net.network_id, "10.4.0.0/24")
    head = await api.head()
    err = await status_of(call(api, net.network_id, sub.subnet_id))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert bad_fields(err) == fields
    assert await api.head() == head


async def test_overlapping_subnet_is_refused(api: Api) -> None:
    net = await vlan(api, api.alice)
    await subnet(api, api.alice, net.network_id, "10.4.0.0/24")
    err = await status_of(subnet(api, api.alice, net.network_id, "10.4.0.0/25"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    missing = await status_of(subnet(api, api.alice, NET_ID, "10.7.0.0/24"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND


async def test_network_and_port_quotas_are_enforced_and_released(api: Api) -> None:
    from vim._gen.vim.v1 import quotas_pb2, quotas_pb2_grpc

    async with grpc.aio.insecure_channel(api.node.address) as channel:
        quotas = quotas_pb2_grpc.QuotasStub(channel)
        limits = quotas_pb2.QuotaLimits(networks=1, ports=2)
        await quotas.CreateQuota(
            quotas_pb2.CreateQuotaRequest(request_id=rid(), tenant_id="tenant-a", limits=limits),
            metadata=api.admin,
        )
        net = await vlan(api, api.alice)
        err = await status_of(vlan(api, api.alice, name="second"))
        assert err.code() is grpc.StatusCode.FAILED_PRECONDITION
        await subnet(api, api.alice, net.network_id, "10.9.0.0/24")
        results = await asyncio.gather(
            *(new_port(api, api.alice, net.network_id) for _ in range(6)),
            return_exceptions=True,
        )
        made = [r for r in results if isinstance(r, pb.Port)]
        assert len(made) == 2
        assert all(
            isinstance(r, grpc.aio.AioRpcError) and r.code() is grpc.StatusCode.FAILED_PRECONDITION
            for r in results
            if not isinstance(r, pb.Port)
        )
        await api.stub.TerminatePort(
            pb.TerminatePortRequest(request_id=rid(), port_id=made[0].port_id), metadata=api.alice
        )
        await new_port(api, api.alice, net.network_id)
        got = await quotas.GetQuota(
            quotas_pb2.GetQuotaRequest(tenant_id="tenant-a"), metadata=api.alice
        )
        assert (got.used.networks, got.used.ports) == (1, 2)
