"""The Compute service over real gRPC against an in-process node, with flavours, images,
networks and quotas served by the same node.

The compute agent and the scheduler are later issues: where a test needs a placed,
running server, it appends their events (`ServerScheduled`, `ServerStateReported`)
through the node's command runner, exactly as they will.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from vim._gen.vim.v1 import (
    compute_pb2,
    compute_pb2_grpc,
    flavours_pb2,
    flavours_pb2_grpc,
    hosts_pb2,
    hosts_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    networks_pb2,
    networks_pb2_grpc,
    quotas_pb2,
    quotas_pb2_grpc,
)
from vim.api.auth import Authenticator
from vim.api.server import ApiConfig, ApiNode
from vim.app import quotas
from vim.app.commands import Change, CommandContext, Decision, Principal
from vim.domain import host, server
from vim.projections.readmodel import ReadModel

SECRET = b"x" * 32
AUTH = Authenticator(SECRET)
Code = grpc.StatusCode
Req = compute_pb2.AllocateComputeRequest


def md(tenant: str = "t1", *roles: str) -> tuple[tuple[str, str], ...]:
    token = AUTH.mint("alice", tenant, list(roles or ("member",)))
    return (("authorization", "Bearer " + token),)


ADMIN = md("ops", "admin")


def uid() -> str:
    return str(uuid.uuid4())


@dataclass
class World:
    node: ApiNode
    channel: grpc.aio.Channel
    compute: compute_pb2_grpc.ComputeStub
    networks: networks_pb2_grpc.NetworksStub
    quotas: quotas_pb2_grpc.QuotasStub
    flavour_id: str = ""
    image_id: str = ""
    network_id: str = ""

    def allocate(self, rid: str, name: str = "vm", **kw: Any) -> Req:
        refs = {"flavour_id": self.flavour_id, "image_id": self.image_id}
        return Req(request_id=rid, name=name, **(refs | kw))

    def used(self, tenant: str = "t1") -> dict[str, int]:
        """The tenant's quota usage, as this node's read model has it."""
        assert self.node.node is not None
        q = quotas.quota_of(self.node.node.model, tenant)
        return dict(q.used) if q else {}

    async def agent(self, server_id: str, *events: Any) -> None:
        """Append what the scheduler and the host's agent will report (later issues)."""
        assert self.node.node is not None
        ctx = CommandContext(Principal("agent", "ops", frozenset({"admin"})), uid(), "agent")

        def decide(model: ReadModel) -> Decision:
            sid = server.stream(server_id)
            return Decision([Change(sid, model.version(sid), list(events))])

        await self.node.node.runner.run(ctx, decide)

    async def running(self, server_id: str, host: str = "cmp-1") -> None:
        await self.agent(
            server_id,
            server.ServerScheduled(server_id, host, "z1"),
            server.ServerStateReported(server_id, host, "ACTIVE", "RUNNING"),
        )


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    node = ApiNode(
        ApiConfig(
            listen="127.0.0.1:0",
            eventlog_url=f"sqlite:///{tmp_path}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
        )
    )
    await node.start()
    try:
        async with grpc.aio.insecure_channel(node.address) as ch:
            w = World(
                node,
                ch,
                compute_pb2_grpc.ComputeStub(ch),
                networks_pb2_grpc.NetworksStub(ch),
                quotas_pb2_grpc.QuotasStub(ch),
            )
            await _populate(w, ch)
            yield w
    finally:
        await node.stop()


async def _populate(w: World, ch: grpc.aio.Channel) -> None:
    flavour = await flavours_pb2_grpc.FlavoursStub(ch).CreateFlavour(
        flavours_pb2.CreateFlavourRequest(
            request_id="f", name="m1.small", vcpus=2, ram_mb=2048, disk_gb=20, is_public=True
        ),
        metadata=ADMIN,
    )
    image = await images_pb2_grpc.ImagesStub(ch).AddImage(
        images_pb2.AddImageRequest(
            request_id="i",
            name="cirros",
            disk_format=images_pb2.DISK_FORMAT_QCOW2,
            size_bytes=1024,
            checksum="a" * 64,
            visibility=images_pb2.VISIBILITY_PUBLIC,
        ),
        metadata=ADMIN,
    )
    net = await w.networks.AllocateNetwork(
        networks_pb2.AllocateNetworkRequest(
            request_id="n", name="net", network_type=networks_pb2.NETWORK_TYPE_VXLAN
        ),
        metadata=md(),
    )
    await w.networks.AllocateSubnet(
        networks_pb2.AllocateSubnetRequest(
            request_id="s", network_id=net.network_id, cidr="10.0.0.0/24"
        ),
        metadata=md(),
    )
    w.flavour_id, w.image_id, w.network_id = flavour.flavour_id, image.image_id, net.network_id


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def fails(call: Any, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() is code, err.value.details()
    return err.value


def nic(network_id: str = "", port_id: str = "") -> compute_pb2.NicRequest:
    if port_id:
        return compute_pb2.NicRequest(port_id=port_id)
    return compute_pb2.NicRequest(network_id=network_id)


async def test_server_lifecycle(world: World) -> None:
    c = world.compute
    made = await c.AllocateCompute(
        world.allocate(
            "a1",
            networks=[nic(world.network_id)],
            metadata={"role": "db"},
            priority=900,
            watchdog=compute_pb2.WATCHDOG_POLICY_RESET,
            migration=compute_pb2.MigrationConstraints(
                live_migration_allowed=False, max_interruption_ms=200
            ),
        ),
        metadata=md(),
    )
    assert made.state == compute_pb2.SERVER_STATE_BUILDING and made.task == "SCHEDULING"
    assert (made.tenant_id, made.flavour.vcpus, made.flavour.ram_mb) == ("t1", 2, 2048)
    assert (made.priority, made.watchdog) == (900, compute_pb2.WATCHDOG_POLICY_RESET)
    assert not made.migration.live_migration_allowed
    [n] = made.nics
    assert (
        n.network_id == world.network_id
        and n.mac_address
        and n.ip_addresses[0].startswith("10.0.0.")
    )
    port = await world.networks.GetPort(
        networks_pb2.GetPortRequest(port_id=n.port_id), metadata=md()
    )
    assert port.device_id == made.server_id

    got = await c.GetServer(
        compute_pb2.GetServerRequest(server_id=made.server_id), metadata=md("t1", "reader")
    )
    assert got == made
    await c.AllocateCompute(world.allocate("a2", "other"), metadata=md())
    page = await c.ListServers(compute_pb2.ListServersRequest(), metadata=md())
    assert [s.name for s in page.servers] == ["other", "vm"]
    page = await c.ListServers(compute_pb2.ListServersRequest(name="vm"), metadata=md())
    assert [s.server_id for s in page.servers] == [made.server_id]
    used = world.used()
    assert (used["instances"], used["cores"], used["ram_mb"]) == (2, 4, 4096)

    updated = await c.UpdateCompute(
        compute_pb2.UpdateComputeRequest(
            request_id="u1",
            server_id=made.server_id,
            update_mask=field_mask_pb2.FieldMask(paths=["name", "metadata"]),
            name="vm-renamed",
            metadata={"role": "web"},
        ),
        metadata=md(),
    )
    assert (updated.name, dict(updated.metadata)) == ("vm-renamed", {"role": "web"})

    await c.TerminateCompute(
        compute_pb2.TerminateComputeRequest(request_id="t1", server_id=made.server_id),
        metadata=md(),
    )
    tomb = await c.GetServer(compute_pb2.GetServerRequest(server_id=made.server_id), metadata=md())
    assert tomb.state == compute_pb2.SERVER_STATE_DELETED and tomb.nics == made.nics
    page = await c.ListServers(compute_pb2.ListServersRequest(), metadata=md())
    assert [s.name for s in page.servers] == ["other"]
    page = await c.ListServers(
        compute_pb2.ListServersRequest(state=compute_pb2.SERVER_STATE_DELETED), metadata=md()
    )
    assert [s.name for s in page.servers] == ["vm-renamed"]
    await fails(
        world.networks.GetPort(networks_pb2.GetPortRequest(port_id=n.port_id), metadata=md()),
        Code.NOT_FOUND,
    )
    assert (world.used()["instances"], world.used()["cores"]) == (1, 2)
    await fails(
        c.TerminateCompute(
            compute_pb2.TerminateComputeRequest(request_id="t2", server_id=made.server_id),
            metadata=md(),
        ),
        Code.FAILED_PRECONDITION,
    )


async def test_a_given_port_is_bound_and_then_unbound(world: World) -> None:
    port = await world.networks.AllocatePort(
        networks_pb2.AllocatePortRequest(request_id="p", network_id=world.network_id),
        metadata=md(),
    )
    made = await world.compute.AllocateCompute(
        world.allocate("a", networks=[nic(port_id=port.port_id)]), metadata=md()
    )
    assert made.nics[0].mac_address == port.mac_address
    assert list(made.nics[0].ip_addresses) == [ip.ip_address for ip in port.fixed_ips]
    await fails(
        world.compute.AllocateCompute(
            world.allocate("b", networks=[nic(port_id=port.port_id)]), metadata=md()
        ),
        Code.FAILED_PRECONDITION,
    )
    await world.compute.TerminateCompute(
        compute_pb2.TerminateComputeRequest(request_id="t", server_id=made.server_id),
        metadata=md(),
    )
    after = await world.networks.GetPort(
        networks_pb2.GetPortRequest(port_id=port.port_id), metadata=md()
    )
    assert after.device_id == "" and after.mac_address == port.mac_address


async def test_operations_follow_the_state_machine(world: World) -> None:
    c = world.compute
    made = await c.AllocateCompute(world.allocate("a"), metadata=md())
    sid = made.server_id

    def op(rid: str, o: int) -> Any:
        return c.OperateCompute(
            compute_pb2.OperateComputeRequest(request_id=rid, server_id=sid, operation=o),
            metadata=md(),
        )

    await fails(op("o1", compute_pb2.COMPUTE_OPERATION_START), Code.FAILED_PRECONDITION)
    await world.running(sid)
    got = await c.GetServer(compute_pb2.GetServerRequest(server_id=sid), metadata=md())
    assert (got.state, got.host, got.power_state) == (
        compute_pb2.SERVER_STATE_ACTIVE,
        "cmp-1",
        compute_pb2.POWER_STATE_RUNNING,
    )
    await fails(op("o2", compute_pb2.COMPUTE_OPERATION_START), Code.FAILED_PRECONDITION)
    stopping = await op("o3", compute_pb2.COMPUTE_OPERATION_STOP)
    assert (stopping.state, stopping.task, stopping.desired_power_state) == (
        compute_pb2.SERVER_STATE_ACTIVE,
        "STOPPING",
        compute_pb2.POWER_STATE_SHUTDOWN,
    )
    err = await fails(op("o4", compute_pb2.COMPUTE_OPERATION_REBOOT), Code.FAILED_PRECONDITION)
    assert "busy" in (err.details() or "")
    await world.agent(sid, server.ServerStateReported(sid, "cmp-1", "STOPPED", "SHUTDOWN"))
    started = await op("o5", compute_pb2.COMPUTE_OPERATION_START)
    assert started.task == "STARTING"
    await world.agent(sid, server.ServerSchedulingFailed(sid, "ignored: not building"))
    page = await c.ListServers(compute_pb2.ListServersRequest(host="cmp-1"), metadata=md())
    assert [s.server_id for s in page.servers] == [sid]


async def test_scheduling_failure_puts_the_server_in_error(world: World) -> None:
    made = await world.compute.AllocateCompute(world.allocate("a"), metadata=md())
    await world.agent(made.server_id, server.ServerSchedulingFailed(made.server_id, "no host"))
    got = await world.compute.GetServer(
        compute_pb2.GetServerRequest(server_id=made.server_id), metadata=md()
    )
    assert (got.state, got.fault_reason) == (compute_pb2.SERVER_STATE_ERROR, "no host")


async def test_migration_honours_the_constraints(world: World) -> None:
    c = world.compute
    pinned = await c.AllocateCompute(
        world.allocate("a", migration=compute_pb2.MigrationConstraints()), metadata=md()
    )
    free = await c.AllocateCompute(world.allocate("b"), metadata=md())
    assert free.migration.live_migration_allowed
    for s in (pinned, free):
        await world.running(s.server_id)

    def migrate(rid: str, sid: str, kind: int, target: str = "") -> Any:
        return c.MigrateCompute(
            compute_pb2.MigrateComputeRequest(
                request_id=rid, server_id=sid, type=kind, target_host=target
            ),
            metadata=md(),
        )

    await fails(
        migrate("m1", pinned.server_id, compute_pb2.MIGRATION_TYPE_LIVE), Code.FAILED_PRECONDITION
    )
    await fails(
        migrate("m2", pinned.server_id, compute_pb2.MIGRATION_TYPE_OFFLINE, "nohost"),
        Code.NOT_FOUND,
    )
    # No host registered yet: nowhere to go, said with the filters' reason.
    err = await fails(
        migrate("m3", pinned.server_id, compute_pb2.MIGRATION_TYPE_OFFLINE),
        Code.FAILED_PRECONDITION,
    )
    assert "no host can take" in (err.details() or "")
    hosts = hosts_pb2_grpc.HostsStub(world.channel)
    for name, vcpus in (("cmp-1", 8), ("cmp-2", 8), ("cmp-3", 1)):
        await hosts.RegisterHost(
            hosts_pb2.RegisterHostRequest(
                request_id=f"reg-{name}",
                hostname=name,
                zone="z1",
                vcpus=vcpus,
                ram_mb=16384,
                disk_gb=200,
                cpu_allocation_ratio=1.0,
                management_address="127.0.0.1",
            ),
            metadata=ADMIN,
        )
    await fails(
        migrate("m4", pinned.server_id, compute_pb2.MIGRATION_TYPE_OFFLINE, "cmp-1"),
        Code.FAILED_PRECONDITION,  # where it already runs
    )
    err = await fails(
        migrate("m5", pinned.server_id, compute_pb2.MIGRATION_TYPE_OFFLINE, "cmp-3"),
        Code.FAILED_PRECONDITION,  # 1 vCPU cannot take 2
    )
    assert "capacity" in (err.details() or "")
    moving = await migrate("m6", pinned.server_id, compute_pb2.MIGRATION_TYPE_OFFLINE)
    assert moving.task == "MIGRATING" and moving.migration_target == "cmp-2"
    live = await migrate("m7", free.server_id, compute_pb2.MIGRATION_TYPE_LIVE, "cmp-2")
    assert live.task == "MIGRATING"
    assert world.node.node is not None
    model = world.node.node.model
    # The scheduler's planner chose cmp-2 (the only other host that fits) and claimed it.
    for sid in (pinned.server_id, free.server_id):
        entry = model.get(server.stream(sid))
        assert entry is not None and entry.state.migration_target == "cmp-2"
    target = model.get(host.stream("cmp-2"))
    assert target is not None
    assert set(target.state.claims) == {pinned.server_id, free.server_id}


async def test_affinity_group_lifecycle(world: World) -> None:
    c = world.compute
    group = await c.CreateAffinityGroup(
        compute_pb2.CreateAffinityGroupRequest(
            request_id="g", name="db", policy=compute_pb2.AFFINITY_POLICY_ANTI_AFFINITY
        ),
        metadata=md(),
    )
    assert group.scope == compute_pb2.AFFINITY_SCOPE_HOST and not group.member_ids
    made = await c.AllocateCompute(
        world.allocate("a", affinity_group_id=group.group_id), metadata=md()
    )
    got = await c.GetAffinityGroup(
        compute_pb2.GetAffinityGroupRequest(group_id=group.group_id), metadata=md()
    )
    assert list(got.member_ids) == [made.server_id]
    page = await c.ListServers(
        compute_pb2.ListServersRequest(affinity_group_id=group.group_id), metadata=md()
    )
    assert [s.server_id for s in page.servers] == [made.server_id]

    def delete(rid: str) -> Any:
        return c.DeleteAffinityGroup(
            compute_pb2.DeleteAffinityGroupRequest(request_id=rid, group_id=group.group_id),
            metadata=md(),
        )

    err = await fails(delete("d1"), Code.FAILED_PRECONDITION)
    assert made.server_id in (err.details() or "")
    await c.TerminateCompute(
        compute_pb2.TerminateComputeRequest(request_id="t", server_id=made.server_id),
        metadata=md(),
    )
    await delete("d2")
    await fails(
        c.GetAffinityGroup(
            compute_pb2.GetAffinityGroupRequest(group_id=group.group_id), metadata=md()
        ),
        Code.NOT_FOUND,
    )
    await fails(
        c.AllocateCompute(world.allocate("b", affinity_group_id=group.group_id), metadata=md()),
        Code.NOT_FOUND,
    )
    listed = await c.ListAffinityGroups(compute_pb2.ListAffinityGroupsRequest(), metadata=md())
    assert not listed.groups


async def test_tenants_see_only_their_own(world: World) -> None:
    c = world.compute
    made = await c.AllocateCompute(world.allocate("a"), metadata=md())
    group = await c.CreateAffinityGroup(
        compute_pb2.CreateAffinityGroupRequest(
            request_id="g", name="g", policy=compute_pb2.AFFINITY_POLICY_AFFINITY
        ),
        metadata=md(),
    )
    other = md("t2")
    sid, gid = made.server_id, group.group_id
    for call in (
        c.GetServer(compute_pb2.GetServerRequest(server_id=sid), metadata=other),
        c.OperateCompute(
            compute_pb2.OperateComputeRequest(
                request_id="o", server_id=sid, operation=compute_pb2.COMPUTE_OPERATION_STOP
            ),
            metadata=other,
        ),
        c.TerminateCompute(
            compute_pb2.TerminateComputeRequest(request_id="t", server_id=sid), metadata=other
        ),
        c.GetAffinityGroup(compute_pb2.GetAffinityGroupRequest(group_id=gid), metadata=other),
        c.DeleteAffinityGroup(
            compute_pb2.DeleteAffinityGroupRequest(request_id="d", group_id=gid), metadata=other
        ),
        c.AllocateCompute(world.allocate("x", affinity_group_id=gid), metadata=other),
        c.AllocateCompute(world.allocate("y", networks=[nic(world.network_id)]), metadata=other),
    ):
        await fails(call, Code.NOT_FOUND)
    assert not (await c.ListServers(compute_pb2.ListServersRequest(), metadata=other)).servers
    assert not (
        await c.ListAffinityGroups(compute_pb2.ListAffinityGroupsRequest(), metadata=other)
    ).groups
    seen = await c.ListServers(compute_pb2.ListServersRequest(), metadata=ADMIN)
    assert [s.server_id for s in seen.servers] == [sid]
    await c.GetAffinityGroup(compute_pb2.GetAffinityGroupRequest(group_id=gid), metadata=ADMIN)
    await fails(
        c.AllocateCompute(world.allocate("r"), metadata=md("t1", "reader")), Code.PERMISSION_DENIED
    )
    await fails(c.ListServers(compute_pb2.ListServersRequest()), Code.UNAUTHENTICATED)


def _allocate_bad(**kw: Any) -> Req:
    base: dict[str, Any] = {"request_id": "r", "name": "vm", "flavour_id": uid(), "image_id": uid()}
    return Req(**(base | kw))


NET = str(uuid.UUID(int=1))
BAD_ALLOCATE = [
    (_allocate_bad(name=""), ["name"]),
    (_allocate_bad(name="x" * 256), ["name"]),
    (_allocate_bad(flavour_id="nope", image_id=""), ["flavour_id", "image_id"]),
    (_allocate_bad(request_id=""), ["request_id"]),
    (_allocate_bad(networks=[nic(NET)] * 17), ["networks"]),
    (_allocate_bad(networks=[compute_pb2.NicRequest()]), ["networks[0]"]),
    (_allocate_bad(networks=[nic("bad")]), ["networks[0].network_id"]),
    (_allocate_bad(networks=[nic(port_id="bad")]), ["networks[0].port_id"]),
    (_allocate_bad(networks=[nic(NET), nic(NET)]), ["networks[1].network_id"]),
    (_allocate_bad(priority=1001), ["priority"]),
    (_allocate_bad(watchdog=99), ["watchdog"]),
    (_allocate_bad(zone="bad zone"), ["zone"]),
    (_allocate_bad(affinity_group_id="g1"), ["affinity_group_id"]),
    (_allocate_bad(metadata={f"k{i}": "v" for i in range(129)}), ["metadata"]),
    (_allocate_bad(metadata={f"k{i}": "v" * 4000 for i in range(5)}), ["metadata"]),
    (_allocate_bad(metadata={"k": "v" * 5000}), ["metadata[k]"]),
]


@pytest.mark.parametrize(("request_", "fields"), BAD_ALLOCATE)
async def test_bad_allocations_are_invalid_argument(
    world: World, request_: Req, fields: list[str]
) -> None:
    err = await fails(world.compute.AllocateCompute(request_, metadata=md()), Code.INVALID_ARGUMENT)
    assert violations(err) == fields


async def test_other_bad_requests_name_their_fields(world: World) -> None:
    c, sid = world.compute, uid()
    cases: list[tuple[Any, list[str]]] = [
        (c.GetServer(compute_pb2.GetServerRequest(server_id="x"), metadata=md()), ["server_id"]),
        (c.ListServers(compute_pb2.ListServersRequest(state=42), metadata=md()), ["state"]),
        (
            c.OperateCompute(
                compute_pb2.OperateComputeRequest(request_id="o", server_id=sid), metadata=md()
            ),
            ["operation"],
        ),
        (
            c.MigrateCompute(
                compute_pb2.MigrateComputeRequest(
                    request_id="m", server_id=sid, type=9, target_host="Bad_Host"
                ),
                metadata=md(),
            ),
            ["type", "target_host"],
        ),
        (
            c.UpdateCompute(
                compute_pb2.UpdateComputeRequest(request_id="u", server_id=sid), metadata=md()
            ),
            ["update_mask"],
        ),
        (
            c.UpdateCompute(
                compute_pb2.UpdateComputeRequest(
                    request_id="u",
                    server_id=sid,
                    update_mask=field_mask_pb2.FieldMask(paths=["name", "host"]),
                ),
                metadata=md(),
            ),
            ["update_mask", "name"],
        ),
        (
            c.CreateAffinityGroup(
                compute_pb2.CreateAffinityGroupRequest(request_id="g", name="g", scope=7),
                metadata=md(),
            ),
            ["policy", "scope"],
        ),
    ]
    for call, fields in cases:
        assert violations(await fails(call, Code.INVALID_ARGUMENT)) == fields


async def test_unknown_references_are_not_found(world: World) -> None:
    c = world.compute
    await fails(
        c.AllocateCompute(world.allocate("a", image_id=uid()), metadata=md()), Code.NOT_FOUND
    )
    await fails(
        c.AllocateCompute(world.allocate("b", networks=[nic(uid())]), metadata=md()),
        Code.NOT_FOUND,
    )
    await fails(
        c.GetServer(compute_pb2.GetServerRequest(server_id=uid()), metadata=md()), Code.NOT_FOUND
    )
    # nothing of a refused allocation was recorded
    assert world.used().get("instances", 0) == 0


async def test_a_repeated_request_gets_the_first_answer(world: World) -> None:
    c = world.compute
    req = world.allocate("same", networks=[nic(world.network_id)])
    first = await c.AllocateCompute(req, metadata=md())
    assert world.node.node is not None
    head = await world.node.node.log.head()
    again = await c.AllocateCompute(req, metadata=md())
    assert again == first
    assert await world.node.node.log.head() == head
    err = await fails(
        c.AllocateCompute(world.allocate("same", "different"), metadata=md()),
        Code.FAILED_PRECONDITION,
    )
    assert "different request" in (err.details() or "")


async def test_concurrent_allocations_never_overshoot_the_quota(world: World) -> None:
    await world.quotas.CreateQuota(
        quotas_pb2.CreateQuotaRequest(
            request_id="q", tenant_id="t1", limits=quotas_pb2.QuotaLimits(instances=5)
        ),
        metadata=ADMIN,
    )
    results = await asyncio.gather(
        *(
            world.compute.AllocateCompute(world.allocate(f"c{i}", f"vm{i}"), metadata=md())
            for i in range(20)
        ),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, compute_pb2.Server)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 5 and len(failed) == 15
    assert {e.code() for e in failed} == {Code.FAILED_PRECONDITION}
    assert all("quota" in (e.details() or "") for e in failed)
    quota = await world.quotas.GetQuota(quotas_pb2.GetQuotaRequest(), metadata=md())
    assert quota.used.instances == 5
    page = await world.compute.ListServers(compute_pb2.ListServersRequest(), metadata=md())
    assert len(page.servers) == 5


async def test_concurrent_allocations_on_one_network_get_distinct_addresses(world: World) -> None:
    made = await asyncio.gather(
        *(
            world.compute.AllocateCompute(
                world.allocate(f"n{i}", networks=[nic(world.network_id)]), metadata=md()
            )
            for i in range(8)
        )
    )
    ips = {s.nics[0].ip_addresses[0] for s in made}
    macs = {s.nics[0].mac_address for s in made}
    assert len(ips) == len(macs) == 8
