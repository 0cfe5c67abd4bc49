"""Hosts, zones and capacity over real gRPC against an in-process API node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from vim._gen.vim.v1 import hosts_pb2 as pb
from vim._gen.vim.v1 import hosts_pb2_grpc
from vim.api.auth import Authenticator
from vim.api.server import ApiConfig, ApiNode

SECRET = b"x" * 32
AUTH = Authenticator(SECRET)
Md = tuple[tuple[str, str], ...]


def md(*roles: str, tenant: str = "ops") -> Md:
    token = AUTH.mint("alice", tenant, list(roles or ("admin",)))
    return (("authorization", "Bearer " + token),)


ADMIN = md("admin")
READER = md("reader", tenant="t1")


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[ApiNode]:
    n = ApiNode(
        ApiConfig(
            listen="127.0.0.1:0",
            eventlog_url=f"sqlite:///{tmp_path}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
        )
    )
    await n.start()
    yield n
    await n.stop()


@pytest.fixture
async def hosts(node: ApiNode) -> AsyncIterator[hosts_pb2_grpc.HostsStub]:
    async with grpc.aio.insecure_channel(node.address) as ch:
        yield hosts_pb2_grpc.HostsStub(ch)


def reg(hostname: str = "cmp-01", rid: str | None = None, **kw: Any) -> pb.RegisterHostRequest:
    fields: dict[str, Any] = {
        "zone": "zone-a",
        "vcpus": 8,
        "ram_mb": 32768,
        "disk_gb": 500,
        "management_address": "10.0.0.11",
        "hypervisor_type": pb.HYPERVISOR_TYPE_KVM,
    } | kw
    return pb.RegisterHostRequest(request_id=rid or f"reg-{hostname}", hostname=hostname, **fields)


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def _three_hosts(hosts: hosts_pb2_grpc.HostsStub) -> None:
    await hosts.RegisterHost(reg("cmp-01"), metadata=ADMIN)
    await hosts.RegisterHost(
        reg("cmp-02", ram_allocation_ratio=1.5, bmc_endpoint="redfish+https://10.1.0.12"),
        metadata=ADMIN,
    )
    await hosts.RegisterHost(
        reg("cmp-03", zone="zone-b", vcpus=16, cpu_allocation_ratio=2.0), metadata=ADMIN
    )


def amounts(a: pb.CapacityAmounts) -> tuple[int, int, int, int]:
    return (a.vcpus, a.ram_mb, a.disk_gb, a.instances)


async def test_register_get_list(hosts: hosts_pb2_grpc.HostsStub) -> None:
    made = await hosts.RegisterHost(reg("cmp-01", zone=""), metadata=ADMIN)
    assert (made.hostname, made.zone, made.state, made.health) == (
        "cmp-01",
        "default",
        pb.HOST_STATE_UP,
        pb.HOST_HEALTH_OK,
    )
    assert (made.allocation_ratios.cpu, made.allocation_ratios.ram) == (4.0, 1.0)
    assert amounts(made.capacity.total) == (32, 32768, 500, 256)
    assert amounts(made.capacity.used) == (0, 0, 0, 0)
    got = await hosts.GetHost(pb.GetHostRequest(hostname="cmp-01"), metadata=ADMIN)
    assert got == made
    await hosts.RegisterHost(reg("cmp-02"), metadata=ADMIN)
    await hosts.RegisterHost(reg("cmp-03", zone="zone-b"), metadata=ADMIN)
    page = await hosts.ListHosts(pb.ListHostsRequest(), metadata=ADMIN)
    assert [h.hostname for h in page.hosts] == ["cmp-01", "cmp-02", "cmp-03"]
    only_b = await hosts.ListHosts(pb.ListHostsRequest(zone="zone-b"), metadata=ADMIN)
    assert [h.hostname for h in only_b.hosts] == ["cmp-03"]
    first = await hosts.ListHosts(pb.ListHostsRequest(page={"page_size": 2}), metadata=ADMIN)
    rest = await hosts.ListHosts(
        pb.ListHostsRequest(page={"page_size": 2, "page_token": first.page.next_page_token}),
        metadata=ADMIN,
    )
    assert [h.hostname for h in [*first.hosts, *rest.hosts]] == ["cmp-01", "cmp-02", "cmp-03"]
    assert rest.page.next_page_token == ""


async def test_zones_and_capacity(hosts: hosts_pb2_grpc.HostsStub) -> None:
    await _three_hosts(hosts)
    zones = await hosts.ListZones(pb.ListZonesRequest(), metadata=READER)
    assert [(z.name, z.host_count) for z in zones.zones] == [("zone-a", 2), ("zone-b", 1)]
    # zone-a: 2 * (8 vcpus * 4.0); ram 32768 + 32768 * 1.5; disk 500 + 500
    assert amounts(zones.zones[0].capacity.total) == (64, 81920, 1000, 512)
    report = await hosts.GetCapacity(pb.GetCapacityRequest(), metadata=READER)
    assert [z.name for z in report.zones] == ["zone-a", "zone-b"]
    per_host = {h.hostname: h for h in report.hosts}
    assert amounts(per_host["cmp-03"].capacity.total) == (32, 32768, 500, 256)
    assert amounts(per_host["cmp-02"].capacity.available) == (32, 49152, 500, 256)
    only_b = await hosts.GetCapacity(pb.GetCapacityRequest(zone="zone-b"), metadata=READER)
    assert [z.name for z in only_b.zones] == ["zone-b"]
    assert [h.hostname for h in only_b.hosts] == ["cmp-03"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await hosts.GetCapacity(pb.GetCapacityRequest(zone="zone-z"), metadata=READER)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


async def test_maintenance_on_and_off(hosts: hosts_pb2_grpc.HostsStub) -> None:
    await _three_hosts(hosts)
    on = await hosts.EnableMaintenance(
        pb.EnableMaintenanceRequest(request_id="m-1", hostname="cmp-01", reason="firmware"),
        metadata=ADMIN,
    )
    assert (on.state, on.maintenance, on.maintenance_reason) == (
        pb.HOST_STATE_MAINTENANCE,
        True,
        "firmware",
    )
    assert amounts(on.capacity.available) == (0, 0, 0, 0)
    in_maint = await hosts.ListHosts(
        pb.ListHostsRequest(state=pb.HOST_STATE_MAINTENANCE), metadata=ADMIN
    )
    assert [h.hostname for h in in_maint.hosts] == ["cmp-01"]
    zones = await hosts.ListZones(pb.ListZonesRequest(), metadata=READER)
    assert (zones.zones[0].host_count, zones.zones[0].schedulable_hosts) == (2, 1)
    again = await hosts.EnableMaintenance(
        pb.EnableMaintenanceRequest(request_id="m-2", hostname="cmp-01"), metadata=ADMIN
    )
    assert again.maintenance_reason == "firmware"  # already in maintenance: nothing changed
    off = await hosts.DisableMaintenance(
        pb.DisableMaintenanceRequest(request_id="m-3", hostname="cmp-01"), metadata=ADMIN
    )
    assert (off.state, off.maintenance) == (pb.HOST_STATE_UP, False)
    got = await hosts.GetHost(pb.GetHostRequest(hostname="cmp-01"), metadata=ADMIN)
    assert got.state == pb.HOST_STATE_UP


async def test_roles(hosts: hosts_pb2_grpc.HostsStub) -> None:
    member = md("member", tenant="t1")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await hosts.RegisterHost(reg(), metadata=member)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    for call, request in [
        (hosts.GetHost, pb.GetHostRequest(hostname="cmp-01")),
        (hosts.ListHosts, pb.ListHostsRequest()),
        (
            hosts.EnableMaintenance,
            pb.EnableMaintenanceRequest(request_id="m", hostname="cmp-01"),
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request, metadata=READER)  # type: ignore[operator]
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await hosts.GetCapacity(pb.GetCapacityRequest())
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
    await hosts.ListZones(pb.ListZonesRequest(), metadata=member)


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"vcpus": -1}, ["vcpus"]),
        ({"vcpus": 0, "ram_mb": 0, "disk_gb": 0}, ["vcpus", "ram_mb", "disk_gb"]),
        ({"ram_mb": 2**62, "disk_gb": 2**40}, ["ram_mb", "disk_gb"]),
        ({"vcpus": 2**31}, ["vcpus"]),
        ({"hostname": "Bad_Host"}, ["hostname"]),
        ({"hostname": "-cmp"}, ["hostname"]),
        ({"hostname": "a" * 64}, ["hostname"]),
        ({"hostname": ""}, ["hostname"]),
        ({"zone": "zone a"}, ["zone"]),
        ({"cpu_allocation_ratio": 0.0}, ["cpu_allocation_ratio"]),
        ({"ram_allocation_ratio": -1.0}, ["ram_allocation_ratio"]),
        ({"disk_allocation_ratio": 64.5}, ["disk_allocation_ratio"]),
        ({"cpu_allocation_ratio": float("nan")}, ["cpu_allocation_ratio"]),
        ({"management_address": ""}, ["management_address"]),
        ({"management_address": "not an address"}, ["management_address"]),
        ({"bmc_endpoint": "http://10.0.0.1"}, ["bmc_endpoint"]),
        ({"bmc_endpoint": "ipmi://root:calvin@10.0.0.1"}, ["bmc_endpoint"]),
        ({"hypervisor_type": 99}, ["hypervisor_type"]),
        ({"max_instances": 5000}, ["max_instances"]),
        ({"request_id": ""}, ["request_id"]),
    ],
)
async def test_bad_registrations(
    hosts: hosts_pb2_grpc.HostsStub, change: dict[str, Any], fields: list[str]
) -> None:
    request = reg()
    for key, value in change.items():
        setattr(request, key, value)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await hosts.RegisterHost(request, metadata=ADMIN)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == fields


async def test_unknown_host_is_not_found(hosts: hosts_pb2_grpc.HostsStub) -> None:
    for call, request in [
        (hosts.GetHost, pb.GetHostRequest(hostname="nope")),
        (hosts.EnableMaintenance, pb.EnableMaintenanceRequest(request_id="m", hostname="nope")),
        (hosts.DisableMaintenance, pb.DisableMaintenanceRequest(request_id="d", hostname="nope")),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(request, metadata=ADMIN)  # type: ignore[operator]
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await hosts.GetHost(pb.GetHostRequest(hostname="NOPE"), metadata=ADMIN)
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_register_is_idempotent(node: ApiNode, hosts: hosts_pb2_grpc.HostsStub) -> None:
    assert node.node is not None
    log = node.node.log
    first = await hosts.RegisterHost(reg(rid="r-1"), metadata=ADMIN)
    head = await log.head()
    assert await hosts.RegisterHost(reg(rid="r-1"), metadata=ADMIN) == first
    assert await log.head() == head
    # the same values under a new request id change nothing either
    assert (await hosts.RegisterHost(reg(rid="r-2"), metadata=ADMIN)).hostname == "cmp-01"
    assert await log.head() == head
    # the same request id with another body is refused
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await hosts.RegisterHost(reg(rid="r-1", vcpus=16), metadata=ADMIN)
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    # re-registering with new capacity updates the host in place, keeping its state
    await hosts.EnableMaintenance(
        pb.EnableMaintenanceRequest(request_id="m-1", hostname="cmp-01"), metadata=ADMIN
    )
    bigger = await hosts.RegisterHost(reg(rid="r-3", vcpus=16), metadata=ADMIN)
    assert bigger.capacity.total.vcpus == 64
    assert bigger.state == pb.HOST_STATE_MAINTENANCE
    assert bigger.registered_at == first.registered_at
    assert await log.head() == head + 3  # maintenance flag + state change + reconfigured
