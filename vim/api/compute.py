"""The `vim.v1.Compute` service: servers and affinity groups (IFA005/IFA006 virtualised compute).

Follows the pattern of `vim.api.flavours`. AllocateCompute is the one complex
decision: in a single `Decision`, hence one atomic append, it writes the server
stream (at version 0), the tenant's quota charge (`quotas.plan_consume`), every
NIC's port (a new port with its addresses via `ports.plan_port`, or the binding
of an existing port via `ports.bind_port`) and the affinity group membership.
Each change carries the version it was decided against, so a concurrent
allocation against the same quota, IPAM pool, port or group conflicts, and
`CommandRunner` decides again on the newer state: quotas never overshoot and
an address, a port or a group deletion is never raced past. TerminateCompute
mirrors it: tombstone, quota release, ports released (ports the server made)
or unbound (ports it was given), group membership ended.

Ids made by a command (server id, new port ids) are drawn before `decide`, so a
retried decision reuses them. Tenancy: a non-admin caller sees only its own
tenant's servers and groups; anything else is NOT_FOUND, as if absent.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from vim._gen.vim.v1 import compute_pb2 as pb
from vim._gen.vim.v1 import compute_pb2_grpc
from vim.api import flavours, images
from vim.api import validation as v
from vim.api.auth import READ, WRITE
from vim.api.errors import refuse, rpc
from vim.api.node import Ctx, Node, view_to
from vim.app import ports, quotas
from vim.app.commands import Change, Decision, Principal
from vim.domain import affinity, host, image, server
from vim.errors import DomainError, FieldViolation, NotFound
from vim.projections.readmodel import ReadModel, register_kind
from vim.scheduler.planner import Failure, Placement, Planner, Snapshot, request_of

SERVICE_NAME = "vim.v1.Compute"
register_kind(server.KIND, server.evolve)
register_kind(affinity.KIND, affinity.evolve)

MAX_NICS = 16
MAX_METADATA_BYTES = 16 * 1024
ZONE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
HOST_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
UPDATABLE = frozenset({"name", "metadata"})

STATES: dict[int, server.ServerState] = {
    pb.ServerState.Value(f"SERVER_STATE_{s.value}"): s for s in server.ServerState
}
OPERATIONS: dict[int, server.Operation] = {
    pb.ComputeOperation.Value(f"COMPUTE_OPERATION_{o.value}"): o for o in server.Operation
}
WATCHDOGS: dict[int, server.Watchdog] = {
    pb.WATCHDOG_POLICY_UNSPECIFIED: server.Watchdog.NONE,
    **{pb.WatchdogPolicy.Value(f"WATCHDOG_POLICY_{w.value}"): w for w in server.Watchdog},
}
MIGRATIONS: dict[int, server.MigrationType] = {
    pb.MigrationType.Value(f"MIGRATION_TYPE_{m.value}"): m for m in server.MigrationType
}
POLICIES: dict[int, affinity.Policy] = {
    pb.AffinityPolicy.Value(f"AFFINITY_POLICY_{p.value}"): p for p in affinity.Policy
}
SCOPES: dict[int, affinity.Scope] = {
    pb.AFFINITY_SCOPE_UNSPECIFIED: affinity.Scope.HOST,
    **{pb.AffinityScope.Value(f"AFFINITY_SCOPE_{s.value}"): s for s in affinity.Scope},
}


# --- reading the model --------------------------------------------------------------------


def find_server(
    model: ReadModel, principal: Principal, server_id: str
) -> tuple[server.Server, int]:
    """A server the caller may see (DELETED tombstones included) and its version, or NotFound."""
    entry = model.get(server.stream(server_id))
    if entry is None or not (principal.is_admin or entry.state.tenant_id == principal.tenant):
        raise NotFound(f"server {server_id} not found")
    state: server.Server = entry.state
    return state, entry.version


def find_group(model: ReadModel, principal: Principal, group_id: str) -> affinity.AffinityGroup:
    """A live affinity group the caller may see, or NotFound."""
    entry = model.get(affinity.stream(group_id))
    state: affinity.AffinityGroup | None = entry.state if entry else None
    if state is None or state.deleted:
        raise NotFound(f"affinity group {group_id} not found")
    if not (principal.is_admin or state.tenant_id == principal.tenant):
        raise NotFound(f"affinity group {group_id} not found")
    return state


def servers(model: ReadModel, principal: Principal) -> list[server.Server]:
    """Every server the caller may see, tombstones included, by name then id."""
    found = [
        e.state
        for _, e in model.of_kind(server.KIND)
        if principal.is_admin or e.state.tenant_id == principal.tenant
    ]
    return sorted(found, key=lambda s: (s.name, s.server_id))


def _flavour_for(model: ReadModel, principal: Principal, flavour_id: str) -> server.FlavorCopy:
    found = flavours.find(model, flavour_id)
    if not (found.is_public or principal.is_admin):
        raise NotFound(f"flavour {flavour_id} not found")
    return server.FlavorCopy(found.flavor_id, found.name, found.vcpus, found.ram_mb, found.disk_gb)


def _check_image(
    model: ReadModel, principal: Principal, image_id: str, fl: server.FlavorCopy
) -> None:
    img = images.find_image(model, principal, image_id)
    if img.status != image.ACTIVE:
        raise DomainError(f"image {image_id} is {img.status}, not ACTIVE")
    if fl.disk_gb and img.min_disk_gb > fl.disk_gb:
        raise DomainError(
            f"image {image_id} needs a {img.min_disk_gb} GiB disk; "
            f"flavour {fl.name} has {fl.disk_gb}"
        )
    if img.min_ram_mb > fl.ram_mb:
        raise DomainError(
            f"image {image_id} needs {img.min_ram_mb} MiB of RAM; flavour {fl.name} has {fl.ram_mb}"
        )


# --- planning the changes of one decision -------------------------------------------------


def _merge(changes: Sequence[Change]) -> list[Change]:
    """One change per stream (the append takes each stream once); drops empty changes.

    Two planners may touch one stream (say, a quota) against the same version;
    their events are independent deltas, so they are concatenated in order.
    """
    merged: dict[str, Change] = {}
    for c in changes:
        if not c.events:
            continue
        prev = merged.get(c.stream_id)
        if prev is None:
            merged[c.stream_id] = c
            continue
        if prev.expected_version != c.expected_version:
            raise AssertionError(f"two versions of {c.stream_id} in one decision")
        merged[c.stream_id] = Change(c.stream_id, c.expected_version, [*prev.events, *c.events])
    return list(merged.values())


def _plan_nic(
    model: ReadModel,
    principal: Principal,
    req: pb.NicRequest,
    new_port_id: str,
    server_id: str,
    at: str,
) -> tuple[list[Change], server.Nic]:
    """The changes for one NIC (a new port on a network, or an existing port bound) and the NIC."""
    if req.WhichOneof("target") == "network_id":
        changes, view = ports.plan_port(
            model, principal, req.network_id, new_port_id, server_id, at
        )
        ips = tuple(str(ip.get("ipAddress", "")) for ip in view.get("fixedIps", []))
        return changes, server.Nic(new_port_id, req.network_id, str(view["macAddress"]), ips)
    found = ports.find_port(model, principal, req.port_id)
    changes = ports.bind_port(model, req.port_id, server_id, at)
    ips = tuple(str(ip["ip_address"]) for ip in found.fixed_ips)
    nic = server.Nic(found.port_id, found.network_id, found.mac_address, ips, owned=False)
    return changes, nic


def _release_nic(model: ReadModel, nic: server.Nic, at: str) -> list[Change]:
    """A port the server made is released (addresses freed); one it was given is unbound."""
    try:
        if nic.owned:
            return ports.plan_release(model, nic.port_id, at)
        return ports.unbind_port(model, nic.port_id, at)
    except NotFound:
        return []  # already gone: nothing left to release


def _join(model: ReadModel, principal: Principal, group_id: str, server_id: str) -> Change:
    sid = affinity.stream(group_id)
    entry = model.get(sid)
    joined = affinity.join(entry.state if entry else None, group_id, principal.tenant, server_id)
    return Change(sid, model.version(sid), [joined])


def _leave(model: ReadModel, s: server.Server) -> list[Change]:
    if not s.affinity_group_id:
        return []
    sid = affinity.stream(s.affinity_group_id)
    entry = model.get(sid)
    left = affinity.leave(entry.state if entry else None, s.affinity_group_id, s.server_id)
    return [Change(sid, model.version(sid), left)]


def plan_allocate(
    model: ReadModel,
    principal: Principal,
    request: pb.AllocateComputeRequest,
    server_id: str,
    port_ids: Sequence[str],
    at: str,
) -> Decision:
    """Every change of a server's allocation, for one atomic append (see the module docstring)."""
    fl = _flavour_for(model, principal, request.flavour_id)
    _check_image(model, principal, request.image_id, fl)
    changes: list[Change] = []
    nics: list[server.Nic] = []
    for req, port_id in zip(request.networks, port_ids, strict=True):
        planned, nic = _plan_nic(model, principal, req, port_id, server_id, at)
        changes += planned
        nics.append(nic)
    if request.affinity_group_id:
        changes.append(_join(model, principal, request.affinity_group_id, server_id))
    mig = request.migration if request.HasField("migration") else None
    event = server.allocate(
        server_id,
        principal.tenant,
        request.name,
        fl,
        request.image_id,
        nics,
        now=at,
        affinity_group_id=request.affinity_group_id,
        zone=request.zone,
        metadata=dict(request.metadata),
        priority=request.priority,
        watchdog=WATCHDOGS[request.watchdog],
        live_migration_allowed=mig.live_migration_allowed if mig else True,
        max_interruption_ms=mig.max_interruption_ms if mig else 0,
    )
    state = server.evolve(None, event)
    reason = f"server {server_id}"
    changes.append(quotas.plan_consume(model, principal.tenant, state.quota_amounts(), reason))
    changes.append(Change(server.stream(server_id), 0, [event]))
    return Decision(_merge(changes), state.view())


def plan_terminate(model: ReadModel, principal: Principal, server_id: str, at: str) -> Decision:
    """Tombstone the server and give back everything it held, in one append."""
    s, version = find_server(model, principal, server_id)
    changes = [Change(server.stream(server_id), version, [server.terminate(s, at)])]
    for nic in s.nics:
        changes += _release_nic(model, nic, at)
    changes += _leave(model, s)
    reason = f"server {server_id} terminated"
    changes.append(quotas.plan_release(model, s.tenant_id, s.quota_amounts(), reason))
    return Decision(_merge(changes), {"serverId": server_id})


# --- validation ---------------------------------------------------------------------------


def _metadata(field: str, value: Mapping[str, str], bad: list[FieldViolation]) -> None:
    v.string_map(field, value, bad)
    size = sum(len(k.encode()) + len(x.encode()) for k, x in value.items())
    if size > MAX_METADATA_BYTES:
        bad.append(FieldViolation(field, f"at most {MAX_METADATA_BYTES} bytes in all, got {size}"))


def _optional_id(field: str, value: str, bad: list[FieldViolation]) -> None:
    if value:
        v.resource_id(field, value, bad)


def _nics(reqs: Sequence[pb.NicRequest], bad: list[FieldViolation]) -> None:
    if len(reqs) > MAX_NICS:
        bad.append(FieldViolation("networks", f"at most {MAX_NICS} NICs, got {len(reqs)}"))
        return
    seen: set[str] = set()
    for i, req in enumerate(reqs):
        which = req.WhichOneof("target")
        if which is None:
            bad.append(FieldViolation(f"networks[{i}]", "set network_id or port_id"))
            continue
        value = getattr(req, which)
        v.resource_id(f"networks[{i}].{which}", value, bad)
        if value in seen:
            bad.append(FieldViolation(f"networks[{i}].{which}", "each network or port once"))
        seen.add(value)


def validate_allocate(request: pb.AllocateComputeRequest) -> None:
    """Every violation of an AllocateCompute request, refused at once."""
    bad: list[FieldViolation] = []
    v.name("name", request.name, bad)
    v.resource_id("flavour_id", request.flavour_id, bad)
    v.resource_id("image_id", request.image_id, bad)
    _nics(request.networks, bad)
    _optional_id("affinity_group_id", request.affinity_group_id, bad)
    if request.zone and not ZONE_RE.match(request.zone):
        bad.append(FieldViolation("zone", "1-63 letters, digits, . _ -"))
    _metadata("metadata", request.metadata, bad)
    v.in_range("priority", request.priority, 0, server.MAX_PRIORITY, bad)
    v.enum("watchdog", request.watchdog, list(WATCHDOGS), bad)
    refuse(bad)


def validate_update(request: pb.UpdateComputeRequest) -> tuple[str | None, dict[str, str] | None]:
    """(new name or None, new metadata or None) of an UpdateCompute request."""
    bad: list[FieldViolation] = []
    v.resource_id("server_id", request.server_id, bad)
    paths = set(request.update_mask.paths)
    if not paths or not paths <= UPDATABLE:
        bad.append(FieldViolation("update_mask", f"name the fields to change: {sorted(UPDATABLE)}"))
    if "name" in paths:
        v.name("name", request.name, bad)
    if "metadata" in paths:
        _metadata("metadata", request.metadata, bad)
    refuse(bad)
    name = request.name if "name" in paths else None
    return name, dict(request.metadata) if "metadata" in paths else None


# --- the servicer -------------------------------------------------------------------------


class ComputeServicer(compute_pb2_grpc.ComputeServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def _one_stream(
        self, principal: Principal, request: Any, method: str, context: Ctx, decide: Any
    ) -> pb.Server:
        """Run a decision whose response is a server view, and answer with it."""
        ctx = self._node.command(principal, request, method, context)
        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _server(out.response)

    @rpc
    async def AllocateCompute(self, request: pb.AllocateComputeRequest, context: Ctx) -> pb.Server:
        principal = await self._node.caller(context, WRITE, "AllocateCompute")
        validate_allocate(request)
        server_id, at = v.new_id(), v.now()
        port_ids = [v.new_id() for _ in request.networks]

        def decide(model: ReadModel) -> Decision:
            return plan_allocate(model, principal, request, server_id, port_ids, at)

        return await self._one_stream(principal, request, "AllocateCompute", context, decide)

    @rpc
    async def GetServer(self, request: pb.GetServerRequest, context: Ctx) -> pb.Server:
        principal = await self._node.caller(context, READ, "GetServer")
        bad: list[FieldViolation] = []
        v.resource_id("server_id", request.server_id, bad)
        refuse(bad)
        found, _ = find_server(self._node.model, principal, request.server_id)
        self._node.answered(context)
        return _server(found.view())

    @rpc
    async def ListServers(
        self, request: pb.ListServersRequest, context: Ctx
    ) -> pb.ListServersResponse:
        principal = await self._node.caller(context, READ, "ListServers")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        v.enum("state", request.state, [0, *STATES], bad)
        _optional_id("affinity_group_id", request.affinity_group_id, bad)
        refuse(bad)
        items = [s for s in servers(self._node.model, principal) if _matches(request, s)]
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.ListServersResponse(servers=[_server(s.view()) for s in chunk], page=page)

    @rpc
    async def UpdateCompute(self, request: pb.UpdateComputeRequest, context: Ctx) -> pb.Server:
        principal = await self._node.caller(context, WRITE, "UpdateCompute")
        name, metadata = validate_update(request)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            s, version = find_server(model, principal, request.server_id)
            events = server.update(s, name, metadata, at)
            after = s
            for e in events:
                after = server.evolve(after, e)
            return Decision(
                [Change(server.stream(s.server_id), version, events)] if events else [],
                after.view(),
            )

        return await self._one_stream(principal, request, "UpdateCompute", context, decide)

    @rpc
    async def TerminateCompute(
        self, request: pb.TerminateComputeRequest, context: Ctx
    ) -> pb.TerminateComputeResponse:
        principal = await self._node.caller(context, WRITE, "TerminateCompute")
        bad: list[FieldViolation] = []
        v.resource_id("server_id", request.server_id, bad)
        refuse(bad)
        ctx = self._node.command(principal, request, "TerminateCompute", context)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            return plan_terminate(model, principal, request.server_id, at)

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return pb.TerminateComputeResponse(server_id=str(out.response["serverId"]))

    @rpc
    async def OperateCompute(self, request: pb.OperateComputeRequest, context: Ctx) -> pb.Server:
        principal = await self._node.caller(context, WRITE, "OperateCompute")
        bad: list[FieldViolation] = []
        v.resource_id("server_id", request.server_id, bad)
        v.enum("operation", request.operation, list(OPERATIONS), bad)
        refuse(bad)
        op, at = OPERATIONS[request.operation], v.now()

        def decide(model: ReadModel) -> Decision:
            s, version = find_server(model, principal, request.server_id)
            event = server.operate(s, op, at)
            change = Change(server.stream(s.server_id), version, [event])
            return Decision([change], server.evolve(s, event).view())

        return await self._one_stream(principal, request, "OperateCompute", context, decide)

    @rpc
    async def MigrateCompute(self, request: pb.MigrateComputeRequest, context: Ctx) -> pb.Server:
        principal = await self._node.caller(context, WRITE, "MigrateCompute")
        bad: list[FieldViolation] = []
        v.resource_id("server_id", request.server_id, bad)
        v.enum("type", request.type, list(MIGRATIONS), bad)
        if request.target_host and not HOST_RE.match(request.target_host):
            bad.append(FieldViolation("target_host", "a lowercase DNS label (a hostname)"))
        refuse(bad)
        kind, target, at = MIGRATIONS[request.type], request.target_host, v.now()

        def decide(model: ReadModel) -> Decision:
            s, version = find_server(model, principal, request.server_id)
            if target and model.get(host.stream(target)) is None:
                raise NotFound(f"host {target} not found")
            if target == s.host:
                raise DomainError(f"server {s.server_id} already runs on host {target}")
            server.migrate(s, kind, target or "?", at)  # the server's own rules first
            placed = migration_destination(model, s, version, target)
            if isinstance(placed, Failure):
                raise DomainError(f"no host can take server {s.server_id}: {placed.reason}")
            event = server.migrate(s, kind, placed.hostname, at)
            changes = [
                Change(server.stream(s.server_id), version, [event]),
                Change(host.stream(placed.hostname), placed.host_version, [placed.claim]),
            ]
            if placed.group_id and placed.group_version is not None:
                member = affinity.AffinityMemberAdded(placed.group_id, s.server_id)
                changes.append(
                    Change(affinity.stream(placed.group_id), placed.group_version, [member])
                )
            return Decision(changes, server.evolve(s, event).view())

        return await self._one_stream(principal, request, "MigrateCompute", context, decide)

    @rpc
    async def CreateAffinityGroup(
        self, request: pb.CreateAffinityGroupRequest, context: Ctx
    ) -> pb.AffinityGroup:
        principal = await self._node.caller(context, WRITE, "CreateAffinityGroup")
        bad: list[FieldViolation] = []
        v.name("name", request.name, bad)
        v.enum("policy", request.policy, list(POLICIES), bad)
        v.enum("scope", request.scope, list(SCOPES), bad)
        refuse(bad)
        ctx = self._node.command(principal, request, "CreateAffinityGroup", context)
        group_id, at = v.new_id(), v.now()
        policy, scope = POLICIES[request.policy], SCOPES[request.scope]

        def decide(model: ReadModel) -> Decision:
            event = affinity.create(group_id, principal.tenant, request.name, policy, scope, at)
            change = Change(affinity.stream(group_id), 0, [event])
            return Decision([change], affinity.evolve(None, event).view())

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _group(out.response)

    @rpc
    async def GetAffinityGroup(
        self, request: pb.GetAffinityGroupRequest, context: Ctx
    ) -> pb.AffinityGroup:
        principal = await self._node.caller(context, READ, "GetAffinityGroup")
        bad: list[FieldViolation] = []
        v.resource_id("group_id", request.group_id, bad)
        refuse(bad)
        found = find_group(self._node.model, principal, request.group_id)
        self._node.answered(context)
        return _group(found.view())

    @rpc
    async def ListAffinityGroups(
        self, request: pb.ListAffinityGroupsRequest, context: Ctx
    ) -> pb.ListAffinityGroupsResponse:
        principal = await self._node.caller(context, READ, "ListAffinityGroups")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        refuse(bad)
        groups: list[affinity.AffinityGroup] = sorted(
            (e.state for _, e in self._node.model.of_kind(affinity.KIND)),
            key=lambda g: (g.name, g.group_id),
        )
        groups = [
            g
            for g in groups
            if not g.deleted and (principal.is_admin or g.tenant_id == principal.tenant)
        ]
        chunk, page = v.paginate(groups, offset, size)
        self._node.answered(context)
        return pb.ListAffinityGroupsResponse(groups=[_group(g.view()) for g in chunk], page=page)

    @rpc
    async def DeleteAffinityGroup(
        self, request: pb.DeleteAffinityGroupRequest, context: Ctx
    ) -> pb.DeleteAffinityGroupResponse:
        principal = await self._node.caller(context, WRITE, "DeleteAffinityGroup")
        bad: list[FieldViolation] = []
        v.resource_id("group_id", request.group_id, bad)
        refuse(bad)
        ctx = self._node.command(principal, request, "DeleteAffinityGroup", context)
        at = v.now()
        tenant = None if principal.is_admin else principal.tenant

        def decide(model: ReadModel) -> Decision:
            sid = affinity.stream(request.group_id)
            entry = model.get(sid)
            event = affinity.delete(entry.state if entry else None, request.group_id, tenant, at)
            change = Change(sid, model.version(sid), [event])
            return Decision([change], {"groupId": request.group_id})

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return pb.DeleteAffinityGroupResponse(group_id=str(out.response["groupId"]))


def _matches(request: pb.ListServersRequest, s: server.Server) -> bool:
    if request.state:
        if s.state is not STATES[request.state]:
            return False
    elif s.deleted:
        return False
    return (
        (not request.name or s.name == request.name)
        and (not request.host or s.host == request.host)
        and (not request.affinity_group_id or s.affinity_group_id == request.affinity_group_id)
    )


_SERVER_FIELDS = frozenset(
    {
        *("serverId", "name", "tenantId", "flavour", "imageId", "nics", "affinityGroupId"),
        *("zone", "host", "state", "task", "progress", "faultReason", "powerState"),
        *("desiredPowerState", "metadata", "priority", "watchdog", "migration"),
        *("createdAt", "updatedAt", "recovery", "evacuatedFrom", "migrationTarget"),
    }
)


def _server(view: Mapping[str, Any]) -> pb.Server:
    """A server view (`server.Server.view()`, or the stored response of a command) as
    its message, built field by field: the same message `json_format.ParseDict` gives
    for the view, at a tenth of its cost (this is on every allocation's path). A view
    that does not have the expected shape (say, one stored by an older node) goes
    through `json_format`, which ignores what it does not know."""
    try:
        return _server_fast(view)
    except (KeyError, TypeError, ValueError, AttributeError):
        msg = pb.Server()
        view_to(msg, dict(view))
        return msg


def _server_fast(view: Mapping[str, Any]) -> pb.Server:
    if not _SERVER_FIELDS.issuperset(view):
        raise KeyError("unexpected field in a server view")
    g = view.get
    msg = pb.Server(
        server_id=g("serverId", ""),
        name=g("name", ""),
        tenant_id=g("tenantId", ""),
        image_id=g("imageId", ""),
        affinity_group_id=g("affinityGroupId", ""),
        zone=g("zone", ""),
        host=g("host", ""),
        state=pb.ServerState.Value(g("state") or "SERVER_STATE_UNSPECIFIED"),
        task=g("task", ""),
        progress=int(g("progress") or 0),
        fault_reason=g("faultReason", ""),
        power_state=pb.PowerState.Value(g("powerState") or "POWER_STATE_UNSPECIFIED"),
        desired_power_state=pb.PowerState.Value(
            g("desiredPowerState") or "POWER_STATE_UNSPECIFIED"
        ),
        metadata=g("metadata") or {},
        priority=int(g("priority") or 0),
        watchdog=pb.WatchdogPolicy.Value(g("watchdog") or "WATCHDOG_POLICY_UNSPECIFIED"),
        created_at=g("createdAt", ""),
        updated_at=g("updatedAt", ""),
        recovery=g("recovery", ""),
        evacuated_from=g("evacuatedFrom", ""),
        migration_target=g("migrationTarget", ""),
    )
    f = g("flavour")
    if f is not None:
        msg.flavour.SetInParent()
        fm = msg.flavour
        fm.flavour_id = f.get("flavourId", "")
        fm.name = f.get("name", "")
        fm.vcpus = int(f.get("vcpus", 0))
        fm.ram_mb = int(f.get("ramMb", 0))
        fm.disk_gb = int(f.get("diskGb", 0))
    for n in g("nics") or ():
        msg.nics.add(
            port_id=n.get("portId", ""),
            network_id=n.get("networkId", ""),
            mac_address=n.get("macAddress", ""),
            ip_addresses=n.get("ipAddresses", ()),
        )
    m = g("migration")
    if m is not None:
        msg.migration.SetInParent()
        msg.migration.live_migration_allowed = bool(m.get("liveMigrationAllowed", False))
        msg.migration.max_interruption_ms = int(m.get("maxInterruptionMs", 0))
    return msg


def _group(view: Mapping[str, Any]) -> pb.AffinityGroup:
    msg = pb.AffinityGroup()
    view_to(msg, dict(view))
    return msg


def migration_destination(
    model: ReadModel, s: server.Server, version: int, target: str
) -> Placement | Failure:
    """Where a migration of `s` goes: the scheduler's own planner and filters (capacity,
    state, zone, affinity, reservations), never its current host; `target` narrows
    the choice to that host, which must pass the same filters."""
    snap = Snapshot.of(model, datetime.now(UTC))
    hosts = {
        name: entry
        for name, entry in snap.hosts.items()
        if name != s.host and (not target or name == target)
    }
    members = dict(snap.members)
    if s.affinity_group_id in members and s.host:
        others = list(members[s.affinity_group_id])
        zone = snap.hosts[s.host][0].spec.zone if s.host in snap.hosts else s.zone
        with contextlib.suppress(ValueError):
            others.remove((s.host, zone))  # the server itself is what moves
        members[s.affinity_group_id] = others
    snapshot = replace(snap, hosts=hosts, members=members, requests=[])
    return Planner(snapshot).place(request_of(s, version))
