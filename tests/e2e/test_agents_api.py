"""The Agents service over real gRPC against an in-process node: an agent speaks only for itself.

Servers are placed by appending `ServerScheduled` through the node's command
runner (what the scheduler does); everything an agent does goes through the API
with an agent token (`Authenticator.mint_agent`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from vim._gen.vim.v1 import (
    agents_pb2,
    agents_pb2_grpc,
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
)
from vim.agent.apiclient import AgentApi
from vim.api.auth import Authenticator
from vim.api.server import ApiConfig, ApiNode
from vim.app.commands import Change, CommandContext, Decision, Principal
from vim.domain import server
from vim.projections.readmodel import ReadModel
from vim.security import certs

SECRET = b"a" * 32
AUTH = Authenticator(SECRET)
Code = grpc.StatusCode
Md = tuple[tuple[str, str], ...]


def bearer(token: str) -> Md:
    return (("authorization", "Bearer " + token),)


def agent(hostname: str) -> Md:
    return bearer(AUTH.mint_agent(hostname))


ADMIN = bearer(AUTH.mint("ops", "ops", ["admin"]))
MEMBER = bearer(AUTH.mint("alice", "t1", ["member"]))


def uid() -> str:
    return str(uuid.uuid4())


def registration(hostname: str, vcpus: int = 16) -> hosts_pb2.RegisterHostRequest:
    return hosts_pb2.RegisterHostRequest(
        hostname=hostname,
        zone="z1",
        vcpus=vcpus,
        ram_mb=65536,
        disk_gb=500,
        hypervisor_type=hosts_pb2.HYPERVISOR_TYPE_TEST,
        management_address="127.0.0.1",
    )


@dataclass
class Catalogue:
    """What a server needs: a flavour, an image and a network with a subnet."""

    flavour_id: str
    image_id: str
    network_id: str


async def populate(ch: grpc.aio.Channel, network_type: int = 0) -> Catalogue:
    """Create a flavour, an image, a network and a subnet (admin and member t1)."""
    flavour = await flavours_pb2_grpc.FlavoursStub(ch).CreateFlavour(
        flavours_pb2.CreateFlavourRequest(
            request_id=uid(), name="m1.tiny", vcpus=1, ram_mb=256, disk_gb=1, is_public=True
        ),
        metadata=ADMIN,
    )
    image = await images_pb2_grpc.ImagesStub(ch).AddImage(
        images_pb2.AddImageRequest(
            request_id=uid(),
            name="cirros",
            disk_format=images_pb2.DISK_FORMAT_QCOW2,
            size_bytes=1024,
            checksum="a" * 64,
            visibility=images_pb2.VISIBILITY_PUBLIC,
        ),
        metadata=ADMIN,
    )
    nets = networks_pb2_grpc.NetworksStub(ch)
    net = await nets.AllocateNetwork(
        networks_pb2.AllocateNetworkRequest(
            request_id=uid(),
            name="net",
            network_type=network_type or networks_pb2.NETWORK_TYPE_VXLAN,
        ),
        metadata=MEMBER,
    )
    await nets.AllocateSubnet(
        networks_pb2.AllocateSubnetRequest(
            request_id=uid(), network_id=net.network_id, cidr="10.0.0.0/24"
        ),
        metadata=MEMBER,
    )
    return Catalogue(flavour.flavour_id, image.image_id, net.network_id)


def allocation(c: Catalogue, name: str = "vm") -> compute_pb2.AllocateComputeRequest:
    return compute_pb2.AllocateComputeRequest(
        request_id=uid(),
        name=name,
        flavour_id=c.flavour_id,
        image_id=c.image_id,
        networks=[compute_pb2.NicRequest(network_id=c.network_id)],
    )


@dataclass
class World:
    node: ApiNode
    ch: grpc.aio.Channel
    agents: agents_pb2_grpc.AgentsStub
    compute: compute_pb2_grpc.ComputeStub
    catalogue: Catalogue

    async def place(self, server_id: str, host: str) -> None:
        """What the scheduler appends."""
        assert self.node.node is not None
        ctx = CommandContext(Principal("scheduler", "ops", frozenset({"admin"})), uid(), "s")

        def decide(model: ReadModel) -> Decision:
            sid = server.stream(server_id)
            ev = server.ServerScheduled(server_id, host, "z1")
            return Decision([Change(sid, model.version(sid), [ev])])

        await self.node.node.runner.run(ctx, decide)

    async def server_on(self, host: str) -> str:
        made = await self.compute.AllocateCompute(allocation(self.catalogue), metadata=MEMBER)
        await self.place(made.server_id, host)
        return str(made.server_id)


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
            agents = agents_pb2_grpc.AgentsStub(ch)
            for h in ("cmp-1", "cmp-2"):
                await agents.RegisterAgentHost(
                    agents_pb2.RegisterAgentHostRequest(request_id=uid(), host=registration(h)),
                    metadata=agent(h),
                )
            yield World(node, ch, agents, compute_pb2_grpc.ComputeStub(ch), await populate(ch))
    finally:
        await node.stop()


async def fails(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() is code, err.value.details()
    return err.value


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def report(
    host: str, server_id: str, power: int, reason: str = ""
) -> agents_pb2.ReportServerStateRequest:
    return agents_pb2.ReportServerStateRequest(
        request_id=uid(), hostname=host, server_id=server_id, power_state=power, fault_reason=reason
    )


async def test_registration_is_for_the_own_host_only(world: World) -> None:
    host = await hosts_pb2_grpc.HostsStub(world.ch).GetHost(
        hosts_pb2.GetHostRequest(hostname="cmp-1"), metadata=ADMIN
    )
    assert host.state == hosts_pb2.HOST_STATE_UP and host.physical.vcpus == 16
    await fails(
        world.agents.RegisterAgentHost(
            agents_pb2.RegisterAgentHostRequest(request_id=uid(), host=registration("cmp-2")),
            metadata=agent("cmp-1"),
        ),
        Code.PERMISSION_DENIED,
    )
    err = await fails(
        world.agents.RegisterAgentHost(
            agents_pb2.RegisterAgentHostRequest(request_id=uid(), host=registration("cmp-1", 0)),
            metadata=agent("cmp-1"),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert violations(err) == ["vcpus"]


async def test_only_agents_call_agents_and_agents_call_nothing_else(world: World) -> None:
    for md in (MEMBER, ADMIN):
        await fails(
            world.agents.GetHostDesiredState(
                agents_pb2.GetHostDesiredStateRequest(hostname="cmp-1"), metadata=md
            ),
            Code.PERMISSION_DENIED,
        )
    await fails(
        world.compute.ListServers(compute_pb2.ListServersRequest(), metadata=agent("cmp-1")),
        Code.PERMISSION_DENIED,
    )
    await fails(
        world.agents.GetHostDesiredState(agents_pb2.GetHostDesiredStateRequest(hostname="cmp-1")),
        Code.UNAUTHENTICATED,
    )
    # A token whose role is agent but whose subject names no host is refused too.
    hostless = bearer(AUTH.mint("someone", "t1", ["agent"]))
    await fails(
        world.agents.GetHostDesiredState(
            agents_pb2.GetHostDesiredStateRequest(hostname="cmp-1"), metadata=hostless
        ),
        Code.PERMISSION_DENIED,
    )


async def test_desired_state_is_the_hosts_own(world: World) -> None:
    sid = await world.server_on("cmp-1")
    mine = await world.agents.GetHostDesiredState(
        agents_pb2.GetHostDesiredStateRequest(hostname="cmp-1"), metadata=agent("cmp-1")
    )
    assert [s.server_id for s in mine.servers] == [sid]
    s = mine.servers[0]
    assert s.flavour.vcpus == 1 and s.flavour.ram_mb == 256
    assert s.desired_power_state == compute_pb2.POWER_STATE_RUNNING
    assert s.task == "SPAWNING" and s.state == compute_pb2.SERVER_STATE_BUILDING
    assert len(s.nics) == 1 and s.nics[0].network_id == world.catalogue.network_id
    assert s.nics[0].mac_address and s.nics[0].ip_addresses
    assert mine.host_state == hosts_pb2.HOST_STATE_UP and mine.fingerprint
    other = await world.agents.GetHostDesiredState(
        agents_pb2.GetHostDesiredStateRequest(hostname="cmp-2"), metadata=agent("cmp-2")
    )
    assert list(other.servers) == []
    await fails(
        world.agents.GetHostDesiredState(
            agents_pb2.GetHostDesiredStateRequest(hostname="cmp-2"), metadata=agent("cmp-1")
        ),
        Code.PERMISSION_DENIED,
    )


async def test_reports_about_own_servers_only(world: World) -> None:
    sid = await world.server_on("cmp-1")
    ack = await world.agents.ReportServerState(
        report("cmp-1", sid, compute_pb2.POWER_STATE_RUNNING), metadata=agent("cmp-1")
    )
    assert ack.recorded
    got = await world.compute.GetServer(
        compute_pb2.GetServerRequest(server_id=sid), metadata=MEMBER
    )
    assert got.state == compute_pb2.SERVER_STATE_ACTIVE and got.task == ""
    again = await world.agents.ReportServerState(
        report("cmp-1", sid, compute_pb2.POWER_STATE_RUNNING), metadata=agent("cmp-1")
    )
    assert not again.recorded  # nothing new: nothing appended
    # Another host's agent, about this server, as itself or pretending to be cmp-1.
    for host, md in (("cmp-2", agent("cmp-2")), ("cmp-1", agent("cmp-2"))):
        await fails(
            world.agents.ReportServerState(
                report(host, sid, compute_pb2.POWER_STATE_SHUTDOWN), metadata=md
            ),
            Code.PERMISSION_DENIED,
        )
    await fails(
        world.agents.ReportServerFault(
            agents_pb2.ReportServerFaultRequest(
                request_id=uid(),
                hostname="cmp-2",
                server_id=sid,
                kind=agents_pb2.SERVER_FAULT_KIND_CRASHED,
            ),
            metadata=agent("cmp-2"),
        ),
        Code.PERMISSION_DENIED,
    )
    # An unknown server is refused the same way (no existence leak).
    await fails(
        world.agents.ReportServerState(
            report("cmp-1", uid(), compute_pb2.POWER_STATE_RUNNING), metadata=agent("cmp-1")
        ),
        Code.PERMISSION_DENIED,
    )
    crashed = await world.agents.ReportServerState(
        report("cmp-1", sid, compute_pb2.POWER_STATE_CRASHED, "killed"), metadata=agent("cmp-1")
    )
    assert crashed.recorded
    got = await world.compute.GetServer(
        compute_pb2.GetServerRequest(server_id=sid), metadata=MEMBER
    )
    assert got.state == compute_pb2.SERVER_STATE_ERROR and got.fault_reason == "killed"


async def test_bad_reports_are_invalid_argument(world: World) -> None:
    bad = agents_pb2.ReportServerStateRequest(
        request_id=uid(), hostname="CMP_1", server_id="nope", power_state=0
    )
    err = await fails(
        world.agents.ReportServerState(bad, metadata=agent("cmp-1")), Code.INVALID_ARGUMENT
    )
    assert sorted(violations(err)) == ["hostname", "power_state", "server_id"]
    err = await fails(
        world.agents.ReportHostFault(
            agents_pb2.ReportHostFaultRequest(request_id=uid(), hostname="cmp-1", service="sshd"),
            metadata=agent("cmp-1"),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert sorted(violations(err)) == ["kind", "service"]
    err = await fails(
        world.agents.ReportSelfFence(
            agents_pb2.ReportSelfFenceRequest(
                request_id=uid(), hostname="cmp-1", lease_lost_at="yesterday", fenced_at=""
            ),
            metadata=agent("cmp-1"),
        ),
        Code.INVALID_ARGUMENT,
    )
    assert sorted(violations(err)) == ["fenced_at", "lease_lost_at"]
    err = await fails(
        world.agents.ReportServerState(
            agents_pb2.ReportServerStateRequest(hostname="cmp-1"), metadata=agent("cmp-1")
        ),
        Code.INVALID_ARGUMENT,
    )


async def test_host_faults_and_self_fence_are_recorded(world: World) -> None:
    md = agent("cmp-1")
    for kind, restarts in (
        (agents_pb2.HOST_FAULT_KIND_SERVICE_FAILED, 0),
        (agents_pb2.HOST_FAULT_KIND_SERVICE_RECOVERED, 1),
    ):
        ack = await world.agents.ReportHostFault(
            agents_pb2.ReportHostFaultRequest(
                request_id=uid(),
                hostname="cmp-1",
                service="ovs-vswitchd",
                kind=kind,
                detail="process 42 is gone",
                restarts=restarts,
            ),
            metadata=md,
        )
        assert ack.recorded
    await world.agents.ReportSelfFence(
        agents_pb2.ReportSelfFenceRequest(
            request_id=uid(),
            hostname="cmp-1",
            domains_destroyed=2,
            lease_lost_at="2026-11-22T08:00:00.000Z",
            fenced_at="2026-11-22T08:00:02.000Z",
        ),
        metadata=md,
    )
    assert world.node.node is not None
    events = await world.node.node.log.read_stream("host-cmp-1")
    types = [e.type for e in events]
    assert types[-3:] == ["HostServiceFailed", "HostServiceRecovered", "HostSelfFenced"]
    assert events[-1].data["domains_destroyed"] == 2
    assert events[-2].data["restarts"] == 1


async def test_watch_sends_a_snapshot_then_changes(world: World) -> None:
    stream = world.agents.WatchHostDesiredState(
        agents_pb2.WatchHostDesiredStateRequest(hostname="cmp-1", heartbeat_ms=200),
        metadata=agent("cmp-1"),
    )
    try:
        first = await asyncio.wait_for(stream.read(), 10)
        assert list(first.servers) == []
        sid = await world.server_on("cmp-1")
        async with asyncio.timeout(10):
            while True:
                snap = await stream.read()
                if snap.servers:
                    break
        assert [s.server_id for s in snap.servers] == [sid]
        assert snap.fingerprint != first.fingerprint
        # Quiet: the unchanged snapshot comes again within the heartbeat.
        beat = await asyncio.wait_for(stream.read(), 10)
        assert beat.fingerprint == snap.fingerprint
    finally:
        stream.cancel()
    err = await fails(
        world.agents.WatchHostDesiredState(
            agents_pb2.WatchHostDesiredStateRequest(hostname="cmp-2"), metadata=agent("cmp-1")
        ).read(),
        Code.PERMISSION_DENIED,
    )
    assert "cmp-2" in (err.details() or "")


async def test_a_stopping_node_ends_watches_with_unavailable(world: World) -> None:
    stream = world.agents.WatchHostDesiredState(
        agents_pb2.WatchHostDesiredStateRequest(hostname="cmp-1", heartbeat_ms=60_000),
        metadata=agent("cmp-1"),
    )
    await asyncio.wait_for(stream.read(), 10)
    stopping = asyncio.create_task(world.node.stop())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(stream.read(), 10)
    assert err.value.code() is Code.UNAVAILABLE  # drained, not cut at the end of the grace
    await stopping


async def test_with_mutual_tls_the_certificate_must_name_the_host(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    certs.make_ca(pki)
    certs.issue(pki, "server", ["127.0.0.1", "localhost"])
    certs.issue(pki, "cmp-1", ["cmp-1"], client=True)
    node = ApiNode(
        ApiConfig(
            listen="127.0.0.1:0",
            eventlog_url=f"sqlite:///{tmp_path}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
            tls_cert=pki / "server.pem",
            tls_key=pki / "server.key",
            tls_client_ca=pki / "ca.pem",
        )
    )
    await node.start()
    tls = {"tls_ca": pki / "ca.pem", "tls_cert": pki / "cmp-1.pem", "tls_key": pki / "cmp-1.key"}
    own = AgentApi([node.address], "cmp-1", AUTH.mint_agent("cmp-1"), **tls)
    # cmp-2's token over cmp-1's certificate: the certificate does not name cmp-2.
    stolen = AgentApi([node.address], "cmp-2", AUTH.mint_agent("cmp-2"), **tls)
    try:
        state = await own.register(
            zone="z1",
            vcpus=4,
            ram_mb=4096,
            disk_gb=10,
            management_address="127.0.0.1",
            hypervisor_type=hosts_pb2.HYPERVISOR_TYPE_TEST,
        )
        assert state == "HOST_STATE_UP"
        assert (await own.desired()).hostname == "cmp-1"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stolen.desired()
        assert err.value.code() is Code.PERMISSION_DENIED
        assert "certificate" in (err.value.details() or "")
    finally:
        await own.close()
        await stolen.close()
        await node.stop()


async def test_an_agent_restart_keeps_what_the_operator_set(world: World) -> None:
    hosts = hosts_pb2_grpc.HostsStub(world.ch)
    operator = registration("cmp-1")
    operator.request_id = uid()
    operator.bmc_endpoint = "redfish+https://10.9.0.1/redfish/v1/Systems/1"
    operator.cpu_allocation_ratio = 2.0
    operator.max_instances = 12
    await hosts.RegisterHost(operator, metadata=ADMIN)
    # The agent restarts and registers with only what it knows (more RAM now).
    again = registration("cmp-1")
    again.ram_mb = 131072
    await world.agents.RegisterAgentHost(
        agents_pb2.RegisterAgentHostRequest(request_id=uid(), host=again), metadata=agent("cmp-1")
    )
    got = await hosts.GetHost(hosts_pb2.GetHostRequest(hostname="cmp-1"), metadata=ADMIN)
    assert got.physical.ram_mb == 131072
    assert got.bmc_endpoint == operator.bmc_endpoint
    assert got.physical.instances == 12
    assert got.allocation_ratios.cpu == 2.0
