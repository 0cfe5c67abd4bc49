"""The agent's only way to the control plane: the `vim.v1.Agents` API, as its own host.

`AgentApi` wraps `vim.client.VimClient` (several endpoints, retries on another
node, request ids, read-your-writes) with the agent's token, and converts
between the API's messages and the agent's own types (`vim.agent.reconcile`,
`vim.agent.drivers`), so nothing else in the agent speaks protobuf.

Read-your-writes matters here: after `report_self_fence`, the next
`desired()` is answered by a node that has applied the fence record (the client
sends the highest position it has seen), so the decision to restart servers
after a self-fence is always made on a snapshot that includes the fence.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

from vim._gen.vim.v1 import agents_pb2 as pb
from vim._gen.vim.v1 import agents_pb2_grpc, compute_pb2, hosts_pb2
from vim.agent import reconcile as rc
from vim.agent.drivers import (
    DomainPower,
    DomainSpec,
    NetworkPlanEntry,
    NicSpec,
    PortBinding,
    TunnelSpec,
    WatchdogAction,
)
from vim.agent.fencing import FenceRecord
from vim.client.client import VimClient

_POWER_OUT = {
    DomainPower.RUNNING: compute_pb2.POWER_STATE_RUNNING,
    DomainPower.SHUTDOWN: compute_pb2.POWER_STATE_SHUTDOWN,
    DomainPower.PAUSED: compute_pb2.POWER_STATE_PAUSED,
    DomainPower.SUSPENDED: compute_pb2.POWER_STATE_SUSPENDED,
    DomainPower.CRASHED: compute_pb2.POWER_STATE_CRASHED,
}
_POWER_IN = {v: k for k, v in _POWER_OUT.items()}
_ROLES = {
    pb.MIGRATION_ROLE_SOURCE: rc.MigrationRole.SOURCE,
    pb.MIGRATION_ROLE_TARGET: rc.MigrationRole.TARGET,
}
_RUNNING_HOST_STATES = (hosts_pb2.HOST_STATE_UP, hosts_pb2.HOST_STATE_MAINTENANCE)


class AgentApi:
    """Calls the Agents service for one host (the one its token names)."""

    def __init__(
        self,
        endpoints: Sequence[str],
        hostname: str,
        token: str,
        *,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        image_dir: Path | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self.hostname = hostname
        self.client = VimClient(
            endpoints,
            token=token,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            timeout_s=timeout_s,
        )
        self._stub = self.client.stub(agents_pb2_grpc.AgentsStub)
        self._image_dir = image_dir

    async def close(self) -> None:
        await self.client.close()

    async def register(
        self,
        *,
        zone: str,
        vcpus: int,
        ram_mb: int,
        disk_gb: int,
        management_address: str,
        hypervisor_type: int,
    ) -> str:
        """Register (or update) this host; returns its state name (e.g. HOST_STATE_UP)."""
        host = await self._stub.RegisterAgentHost(
            pb.RegisterAgentHostRequest(
                host=hosts_pb2.RegisterHostRequest(
                    hostname=self.hostname,
                    zone=zone,
                    vcpus=vcpus,
                    ram_mb=ram_mb,
                    disk_gb=disk_gb,
                    management_address=management_address,
                    hypervisor_type=hypervisor_type,  # type: ignore[arg-type]
                )
            )
        )
        return hosts_pb2.HostState.Name(host.state)

    async def desired(self) -> rc.Desired:
        """The full desired state of this host, now."""
        msg = await self._stub.GetHostDesiredState(
            pb.GetHostDesiredStateRequest(hostname=self.hostname)
        )
        return self.convert(msg)

    async def watch(self, heartbeat_ms: int = 2000) -> AsyncGenerator[rc.Desired, None]:
        """Snapshots as they change (and heartbeats); ends or raises when the stream breaks."""
        stream = self._stub.WatchHostDesiredState(
            pb.WatchHostDesiredStateRequest(hostname=self.hostname, heartbeat_ms=heartbeat_ms)
        )
        try:
            async for msg in stream:
                self.client.observe(int(msg.position))
                yield self.convert(msg)
        finally:
            stream.cancel()

    async def report_state(self, server_id: str, power: DomainPower, fault_reason: str) -> None:
        await self._stub.ReportServerState(
            pb.ReportServerStateRequest(
                hostname=self.hostname,
                server_id=server_id,
                power_state=_POWER_OUT[power],
                fault_reason=fault_reason[: rc.MAX_REASON],
            )
        )

    async def release_source(self, server_id: str) -> bool:
        """This host, a migration's source, removed its copy; True if it was news."""
        ack = await self._stub.ReportMigrationSourceReleased(
            pb.ReportMigrationSourceReleasedRequest(hostname=self.hostname, server_id=server_id)
        )
        return bool(ack.recorded)

    async def report_server_fault(self, server_id: str, watchdog: bool, detail: str) -> bool:
        ack = await self._stub.ReportServerFault(
            pb.ReportServerFaultRequest(
                hostname=self.hostname,
                server_id=server_id,
                kind=pb.SERVER_FAULT_KIND_WATCHDOG if watchdog else pb.SERVER_FAULT_KIND_CRASHED,
                detail=detail[: rc.MAX_REASON],
            )
        )
        return bool(ack.recorded)

    async def report_service(
        self, service: str, recovered: bool, detail: str, restarts: int
    ) -> None:
        kind = (
            pb.HOST_FAULT_KIND_SERVICE_RECOVERED if recovered else pb.HOST_FAULT_KIND_SERVICE_FAILED
        )
        await self._stub.ReportHostFault(
            pb.ReportHostFaultRequest(
                hostname=self.hostname,
                service=service,
                kind=kind,
                detail=detail[: rc.MAX_REASON],
                restarts=restarts,
            )
        )

    async def report_self_fence(self, record: FenceRecord) -> None:
        await self._stub.ReportSelfFence(
            pb.ReportSelfFenceRequest(
                hostname=self.hostname,
                domains_destroyed=record.domains_destroyed,
                lease_lost_at=record.lease_lost_at,
                fenced_at=record.fenced_at,
            )
        )

    # -- conversion ------------------------------------------------------------------------

    def image_path(self, image_id: str) -> str:
        """The base image of `image_id` on this host (`<image_dir>/<id>.qcow2`), if present."""
        if self._image_dir is None or not image_id:
            return ""
        path = self._image_dir / f"{image_id}.qcow2"
        return str(path) if path.is_file() else ""

    def convert(self, msg: pb.HostDesiredState) -> rc.Desired:
        return rc.Desired(
            hostname=msg.hostname,
            servers=tuple(self._server(s) for s in msg.servers),
            plan=_plan(msg.network_plan),
            host_up=msg.host_state in _RUNNING_HOST_STATES,
            position=int(msg.position),
        )

    def _server(self, s: pb.DesiredServer) -> rc.DesiredServer:
        spec = DomainSpec(
            server_id=s.server_id,
            name=rc.domain_name(s.server_id),
            vcpus=int(s.flavour.vcpus),
            ram_mb=int(s.flavour.ram_mb),
            disk_gb=int(s.flavour.disk_gb),
            image_path=self.image_path(s.image_id),
            nics=tuple(
                NicSpec(n.port_id, n.network_id, n.mac_address.lower(), tuple(n.ip_addresses))
                for n in s.nics
            ),
            watchdog=_watchdog(s.watchdog),
            metadata={"tenant_id": s.tenant_id, "image_id": s.image_id},
        )
        state = compute_pb2.ServerState.Name(s.state).removeprefix("SERVER_STATE_")
        return rc.DesiredServer(
            spec=spec,
            power=_POWER_IN.get(s.desired_power_state, DomainPower.RUNNING),
            task=s.task,
            known_state=rc.ApiState(state)
            if state in rc.ApiState.__members__
            else rc.ApiState.UNKNOWN,
            known_power=_POWER_IN.get(s.power_state),
            migration_role=_ROLES.get(s.migration_role, rc.MigrationRole.NONE),
            may_start=bool(s.may_start),
            correlation_id=s.correlation_id,
        )


def _watchdog(policy: int) -> WatchdogAction:
    name = compute_pb2.WatchdogPolicy.Name(policy).removeprefix("WATCHDOG_POLICY_")  # type: ignore[arg-type]
    return WatchdogAction(name) if name in WatchdogAction.__members__ else WatchdogAction.NONE


def _plan(p: pb.NetworkPlan) -> rc.NetworkPlan | None:
    if not p.present:
        return None
    return rc.NetworkPlan(
        local_ip=p.local_ip,
        networks=tuple(
            NetworkPlanEntry(
                n.network_id,
                n.network_type,
                int(n.segmentation_id),
                int(n.local_vlan),
                n.physical_network,
            )
            for n in p.networks
        ),
        tunnels=tuple(TunnelSpec(t.remote_host, t.remote_ip) for t in p.tunnels),
        ports=tuple(
            PortBinding(
                x.port_id, x.server_id, x.network_id, x.mac_address.lower(), int(x.vlan_tag)
            )
            for x in p.ports
        ),
    )
