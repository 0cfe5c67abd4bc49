"""The `vim.v1.Agents` service: what compute agents read and report.

Authorization (`vim.api.auth`): only the role "agent" may call, and the token's
subject names the caller's host (`agent_hostname`). Every request names a
hostname, which must be the caller's; server reports must be about a server
placed on the caller's host (`vim.app.agents.own_server`). Anything else is
PERMISSION_DENIED, checked after the request's fields are validated (bad input
is INVALID_ARGUMENT first, naming every bad field).

Reads are level-triggered snapshots of the read model: `GetHostDesiredState`
answers the whole desired state of the host, `WatchHostDesiredState` sends it,
then a new whole snapshot each time its fingerprint changes, and the unchanged
one at least every heartbeat, so the agent can tell a quiet stream from a dead
one. Writes go through the command runner like every other mutating RPC
(request ids, idempotent repeats).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

import grpc

from vim._gen.vim.v1 import agents_pb2 as pb
from vim._gen.vim.v1 import agents_pb2_grpc, compute_pb2, hosts_pb2
from vim.api import validation as v
from vim.api.auth import AGENT, agent_hostname
from vim.api.errors import abort_for, refuse, rpc
from vim.api.hosts import _spec as host_spec
from vim.api.hosts import label
from vim.api.hosts import view as host_view
from vim.api.node import Ctx, Node, view_to
from vim.app import agents as app
from vim.app.commands import Change, Decision, Principal
from vim.domain import faults, host, netplan, server
from vim.errors import FieldViolation, PermissionDenied, Unavailable, VimError
from vim.projections.readmodel import ReadModel, register_kind

log = logging.getLogger(__name__)

SERVICE_NAME = "vim.v1.Agents"
register_kind(netplan.KIND, netplan.evolve)

DEFAULT_HEARTBEAT_MS = 5000
MIN_HEARTBEAT_MS = 100
MAX_HEARTBEAT_MS = 60_000
REPORTABLE_POWER = {
    compute_pb2.POWER_STATE_RUNNING: server.PowerState.RUNNING,
    compute_pb2.POWER_STATE_SHUTDOWN: server.PowerState.SHUTDOWN,
    compute_pb2.POWER_STATE_PAUSED: server.PowerState.PAUSED,
    compute_pb2.POWER_STATE_SUSPENDED: server.PowerState.SUSPENDED,
    compute_pb2.POWER_STATE_CRASHED: server.PowerState.CRASHED,
}
_SERVICES = {s.value: s for s in faults.HostService}


class AgentsServicer(agents_pb2_grpc.AgentsServicer):
    def __init__(self, node: Node) -> None:
        self._node = node
        self._draining = asyncio.Event()
        self._placements: tuple[int, dict[str, tuple[server.Server, ...]]] = (-1, {})

    def _placed(self) -> dict[str, tuple[server.Server, ...]]:
        """Servers by host at the model's position: one scan per position, shared by
        every open watch (each log event wakes them all)."""
        model = self._node.model
        position, placed = self._placements
        if position != model.position:
            placed = app.placements(model)
            self._placements = (model.position, placed)
        return placed

    async def drain(self) -> None:
        """End every open watch with UNAVAILABLE (the agent reconnects to another node)."""
        self._draining.set()

    async def _agent(
        self, context: Ctx, method: str, hostname: str, bad: list[FieldViolation]
    ) -> tuple[Principal, str]:
        """The calling agent and its host; validates `hostname` and refuses another host."""
        principal = await self._node.caller(context, AGENT, method)
        label("hostname", hostname, bad)
        refuse(bad)
        me = agent_hostname(principal)
        if hostname != me:
            raise PermissionDenied(f"the agent of {me} may not speak for host {hostname}")
        _certificate_names(context, me)
        return principal, me

    @rpc
    async def RegisterAgentHost(
        self, request: pb.RegisterAgentHostRequest, context: Ctx
    ) -> hosts_pb2.Host:
        registration = hosts_pb2.RegisterHostRequest()
        registration.CopyFrom(request.host)
        registration.request_id = ""
        principal, me = await self._agent(context, "RegisterAgentHost", registration.hostname, [])
        spec = host_spec(registration)
        ctx = self._node.command(principal, request, "RegisterAgentHost", context)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            sid = host.stream(me)
            entry = model.get(sid)
            state: host.Host | None = entry.state if entry else None
            mine = spec if state is None else _keep_operator_fields(registration, spec, state.spec)
            events = host.register(state, me, mine, at)
            after = state
            for e in events:
                after = host.evolve(after, e)
            assert after is not None
            changes = [Change(sid, model.version(sid), events)] if events else []
            return Decision(changes, host_view(after))

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        msg = hosts_pb2.Host()
        view_to(msg, dict(out.response))
        return msg

    @rpc
    async def GetHostDesiredState(
        self, request: pb.GetHostDesiredStateRequest, context: Ctx
    ) -> pb.HostDesiredState:
        _, me = await self._agent(context, "GetHostDesiredState", request.hostname, [])
        self._node.answered(context)
        return desired_msg(app.desired(self._node.model, me, self._placed()))

    async def WatchHostDesiredState(
        self, request: pb.WatchHostDesiredStateRequest, context: Ctx
    ) -> AsyncIterator[pb.HostDesiredState]:
        try:
            bad: list[FieldViolation] = []
            heartbeat_ms = request.heartbeat_ms or DEFAULT_HEARTBEAT_MS
            v.in_range("heartbeat_ms", heartbeat_ms, MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS, bad)
            _, me = await self._agent(context, "WatchHostDesiredState", request.hostname, bad)
        except VimError as exc:
            await abort_for(context, exc)
        model = self._node.model
        heartbeat_s = heartbeat_ms / 1000
        last = ""
        drained = asyncio.ensure_future(self._draining.wait())
        try:
            while not self._draining.is_set():
                snapshot = app.desired(model, me, self._placed())
                fingerprint = snapshot.fingerprint()
                if fingerprint != last:
                    last = fingerprint
                    yield desired_msg(snapshot)
                # From the snapshot's position, not the model's: the model may have moved
                # while the message was being sent, and that change must wake us at once.
                moved = asyncio.ensure_future(model.wait_for(snapshot.position + 1, heartbeat_s))
                await asyncio.wait({moved, drained}, return_when=asyncio.FIRST_COMPLETED)
                if not moved.done():
                    moved.cancel()
                elif isinstance(moved.exception(), Unavailable):
                    yield desired_msg(snapshot)  # nothing new within the heartbeat: say so
        finally:
            drained.cancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "this API node is shutting down")

    @rpc
    async def ReportServerState(
        self, request: pb.ReportServerStateRequest, context: Ctx
    ) -> pb.ReportAck:
        bad: list[FieldViolation] = []
        v.resource_id("server_id", request.server_id, bad)
        v.enum("power_state", request.power_state, list(REPORTABLE_POWER), bad)
        v.name("fault_reason", request.fault_reason, bad, required=False)
        principal, me = await self._agent(context, "ReportServerState", request.hostname, bad)
        power = REPORTABLE_POWER[request.power_state]
        ctx = self._node.command(principal, request, "ReportServerState", context)
        at = v.now()
        released_at = _released_at(self._node.model, me, request.server_id)
        out = await self._node.runner.run(
            ctx,
            lambda m: app.report_state(m, me, request.server_id, power, request.fault_reason, at),
        )
        if released_at and out.response.get("recorded"):
            log.info(
                "migration of %s done: %s on %s %.0f ms after the source released it",
                request.server_id,
                power.value,
                me,
                _ms_between(released_at, at),
            )
        return self._ack(context, out.response, out.position)

    @rpc
    async def ReportMigrationSourceReleased(
        self, request: pb.ReportMigrationSourceReleasedRequest, context: Ctx
    ) -> pb.ReportAck:
        bad: list[FieldViolation] = []
        v.resource_id("server_id", request.server_id, bad)
        principal, me = await self._agent(
            context, "ReportMigrationSourceReleased", request.hostname, bad
        )
        ctx = self._node.command(principal, request, "ReportMigrationSourceReleased", context)
        at = v.now()
        out = await self._node.runner.run(
            ctx, lambda m: app.release_source(m, me, request.server_id, at)
        )
        if out.response.get("recorded"):
            log.info("migration of %s: source %s released it at %s", request.server_id, me, at)
        return self._ack(context, out.response, out.position)

    @rpc
    async def ReportServerFault(
        self, request: pb.ReportServerFaultRequest, context: Ctx
    ) -> pb.ReportAck:
        bad: list[FieldViolation] = []
        v.resource_id("server_id", request.server_id, bad)
        v.enum("kind", request.kind, pb.ServerFaultKind.values()[1:], bad)
        v.name("detail", request.detail, bad, required=False)
        principal, me = await self._agent(context, "ReportServerFault", request.hostname, bad)
        ctx = self._node.command(principal, request, "ReportServerFault", context)
        at = v.now()
        watchdog = request.kind == pb.SERVER_FAULT_KIND_WATCHDOG
        out = await self._node.runner.run(
            ctx,
            lambda m: app.server_fault(m, me, request.server_id, watchdog, request.detail, at),
        )
        return self._ack(context, out.response, out.position)

    @rpc
    async def ReportHostFault(
        self, request: pb.ReportHostFaultRequest, context: Ctx
    ) -> pb.ReportAck:
        bad: list[FieldViolation] = []
        if request.service not in _SERVICES:
            bad.append(FieldViolation("service", f"one of {sorted(_SERVICES)} expected"))
        v.enum("kind", request.kind, pb.HostFaultKind.values()[1:], bad)
        v.name("detail", request.detail, bad, required=False)
        v.in_range("restarts", request.restarts, 0, 1_000_000, bad)
        principal, me = await self._agent(context, "ReportHostFault", request.hostname, bad)
        ctx = self._node.command(principal, request, "ReportHostFault", context)
        at = v.now()
        recovered = request.kind == pb.HOST_FAULT_KIND_SERVICE_RECOVERED
        service = _SERVICES[request.service]
        out = await self._node.runner.run(
            ctx,
            lambda m: app.host_fault(
                m, me, service, recovered, request.detail, request.restarts, at
            ),
        )
        return self._ack(context, out.response, out.position)

    @rpc
    async def ReportSelfFence(
        self, request: pb.ReportSelfFenceRequest, context: Ctx
    ) -> pb.ReportAck:
        bad: list[FieldViolation] = []
        v.in_range("domains_destroyed", request.domains_destroyed, 0, 1_000_000, bad)
        _timestamp("lease_lost_at", request.lease_lost_at, bad)
        _timestamp("fenced_at", request.fenced_at, bad)
        principal, me = await self._agent(context, "ReportSelfFence", request.hostname, bad)
        ctx = self._node.command(principal, request, "ReportSelfFence", context)
        at = v.now()
        out = await self._node.runner.run(
            ctx,
            lambda m: app.self_fenced(
                m, me, request.domains_destroyed, request.lease_lost_at, request.fenced_at, at
            ),
        )
        return self._ack(context, out.response, out.position)

    def _ack(self, context: Ctx, response: Mapping[str, Any], position: int) -> pb.ReportAck:
        self._node.answered(context, position)
        return pb.ReportAck(recorded=bool(response.get("recorded")), position=max(position, 0))


def _certificate_names(context: Ctx, hostname: str) -> None:
    """With mutual TLS, the client certificate must name the token's host too.

    The names are the certificate's common name and subject alternative names, as
    verified by the TLS handshake; a plaintext or server-only TLS call has none,
    and then the token alone speaks for the host.
    """
    auth = context.auth_context() or {}
    names = {
        v.decode() if isinstance(v, bytes) else str(v)
        for key in ("x509_common_name", "x509_subject_alternative_name")
        for v in auth.get(key, ())
    }
    if names and hostname not in names:
        raise PermissionDenied(
            f"the client certificate names {sorted(names)}, not the agent's host {hostname}"
        )


def _released_at(model: ReadModel, hostname: str, server_id: str) -> str:
    """When the source released `server_id`, if `hostname` is the target of that hand-off."""
    entry = model.get(server.stream(server_id))
    s: server.Server | None = entry.state if entry else None
    if s is None or not s.migration_released or app.migration_role(s, hostname) != "TARGET":
        return ""
    return s.migration_released_at


def _ms_between(start: str, end: str) -> float:
    try:
        a = datetime.fromisoformat(start.replace("Z", "+00:00"))
        b = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return -1.0
    return (b - a).total_seconds() * 1000


def _timestamp(field: str, value: str, out: list[FieldViolation]) -> None:
    """An RFC 3339 time (what `datetime.fromisoformat` reads, with a zone)."""
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        out.append(FieldViolation(field, f"{value[:40]!r} is not an RFC 3339 time"))
        return
    if parsed.tzinfo is None:
        out.append(FieldViolation(field, "needs a time zone (e.g. Z)"))


# Messages.


def desired_msg(d: app.HostDesired) -> pb.HostDesiredState:
    msg = pb.HostDesiredState(
        hostname=d.hostname,
        host_state=(
            hosts_pb2.HostState.Value(f"HOST_STATE_{d.host_state.value}")
            if d.host_state
            else hosts_pb2.HOST_STATE_UNSPECIFIED
        ),
        servers=[_server_msg(s, d.hostname) for s in d.servers],
        network_plan=_plan_msg(d.plan),
        position=max(d.position, 0),
        fingerprint=d.fingerprint(),
    )
    for s in msg.servers:  # the request that last touched each server (for the agent's logs)
        s.correlation_id = d.correlations.get(s.server_id, "")
    return msg


_ROLES = {
    "": pb.MIGRATION_ROLE_UNSPECIFIED,
    "SOURCE": pb.MIGRATION_ROLE_SOURCE,
    "TARGET": pb.MIGRATION_ROLE_TARGET,
}


def _server_msg(s: server.Server, hostname: str) -> pb.DesiredServer:
    f = s.flavor
    return pb.DesiredServer(
        server_id=s.server_id,
        name=s.name,
        tenant_id=s.tenant_id,
        flavour=compute_pb2.ServerFlavour(
            flavour_id=f.flavor_id, name=f.name, vcpus=f.vcpus, ram_mb=f.ram_mb, disk_gb=f.disk_gb
        ),
        image_id=s.image_id,
        nics=[
            pb.DesiredNic(
                port_id=n.port_id,
                network_id=n.network_id,
                mac_address=n.mac_address,
                ip_addresses=list(n.ip_addresses),
            )
            for n in s.nics
        ],
        watchdog=compute_pb2.WatchdogPolicy.Value(f"WATCHDOG_POLICY_{s.watchdog.value}"),
        desired_power_state=compute_pb2.PowerState.Value(
            f"POWER_STATE_{s.desired_power_state.value}"
        ),
        state=compute_pb2.ServerState.Value(f"SERVER_STATE_{s.state.value}"),
        power_state=compute_pb2.PowerState.Value(f"POWER_STATE_{s.power_state.value}"),
        task=s.task,
        metadata=dict(s.metadata),
        migration_role=_ROLES[app.migration_role(s, hostname)],
        may_start=app.may_start(s, hostname),
    )


def _plan_msg(plan: netplan.HostPlan | None) -> pb.NetworkPlan:
    if plan is None:
        return pb.NetworkPlan(present=False)
    return pb.NetworkPlan(
        present=True,
        local_ip=plan.tunnel_ip,
        networks=[
            pb.PlannedNetwork(
                network_id=n.network_id,
                network_type=n.network_type,
                segmentation_id=n.segmentation_id,
                local_vlan=n.local_vlan,
                physical_network=n.physical_network,
            )
            for n in plan.networks
        ],
        tunnels=[
            pb.PlannedTunnel(remote_host=t.remote_host, remote_ip=t.remote_ip) for t in plan.tunnels
        ],
        ports=[
            pb.PlannedPort(
                port_id=p.port_id,
                server_id=p.server_id,
                network_id=p.network_id,
                mac_address=p.mac_address,
                vlan_tag=p.local_vlan,
            )
            for p in plan.ports
        ],
    )


def _keep_operator_fields(
    r: hosts_pb2.RegisterHostRequest, spec: host.HostSpec, stored: host.HostSpec
) -> host.HostSpec:
    """An agent's re-registration keeps what the operator set and the agent does not say.

    The agent knows the hardware (vCPUs, RAM, disk, addresses, zone); the BMC
    endpoint, the allocation ratios and the instance limit are usually set by an
    operator (Hosts.RegisterHost). An agent restarting with none of them set must
    not reset them to the defaults: a lost BMC endpoint would turn a fenced
    failover into a wait for the self-fence timeout.
    """
    return replace(
        spec,
        bmc_endpoint=r.bmc_endpoint or stored.bmc_endpoint,
        cpu_allocation_ratio=(
            spec.cpu_allocation_ratio
            if r.HasField("cpu_allocation_ratio")
            else stored.cpu_allocation_ratio
        ),
        ram_allocation_ratio=(
            spec.ram_allocation_ratio
            if r.HasField("ram_allocation_ratio")
            else stored.ram_allocation_ratio
        ),
        disk_allocation_ratio=(
            spec.disk_allocation_ratio
            if r.HasField("disk_allocation_ratio")
            else stored.disk_allocation_ratio
        ),
        max_instances=spec.max_instances if r.max_instances else stored.max_instances,
    )
