"""The `vim.v1.Networks` service: networks, subnets, ports and their addresses.

Follows the Flavours pattern (`vim/api/flavours.py`): authenticate and authorise,
validate every field into violations and `refuse`, build the command envelope,
decide against the read model, and answer with the stored view (what a repeat
of the request id gets back).

What must stay unique under concurrency is decided against one stream that is
appended at its expected version in the same append as the resource itself:
segmentation ids against their pool stream (`segments-<pool>`), addresses, MACs,
subnet layouts and a network's termination against its IPAM stream
(`ipam-<network_id>`). A lost race is a version conflict, after which
`CommandRunner` decides again on the newer state. Tenancy rules are those of
`vim.app.ports` (NOT_FOUND for another tenant's resources).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message

from vim._gen.vim.v1 import networks_pb2 as pb
from vim._gen.vim.v1 import networks_pb2_grpc
from vim.api import validation as v
from vim.api.auth import READ, WRITE
from vim.api.errors import refuse, rpc
from vim.api.node import Ctx, Node, view_to
from vim.app import ports, quotas
from vim.app.commands import Change, Decision, Principal
from vim.domain import ipam, network, port
from vim.domain.base import DomainEvent
from vim.errors import FieldViolation, PermissionDenied
from vim.projections.readmodel import ReadModel, register_kind

SERVICE_NAME = "vim.v1.Networks"
register_kind(network.KIND, network.evolve)
register_kind(network.SUBNET_KIND, network.evolve_subnet)
register_kind(network.SEGMENTS_KIND, network.evolve_pool)
register_kind(ipam.KIND, ipam.evolve)
register_kind(port.KIND, port.evolve)

_TYPES = {
    pb.NETWORK_TYPE_FLAT: network.NetworkType.FLAT,
    pb.NETWORK_TYPE_VLAN: network.NetworkType.VLAN,
    pb.NETWORK_TYPE_VXLAN: network.NetworkType.VXLAN,
}
M = TypeVar("M", bound=Message)
S = TypeVar("S")


class NetworksServicer(networks_pb2_grpc.NetworksServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def _run(
        self,
        principal: Principal,
        request: Message,
        method: str,
        context: Ctx,
        decide: Callable[[ReadModel], Decision],
    ) -> Mapping[str, Any]:
        ctx = self._node.command(principal, request, method, context)
        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return out.response

    # -- networks ------------------------------------------------------------------------

    @rpc
    async def AllocateNetwork(self, request: pb.AllocateNetworkRequest, context: Ctx) -> pb.Network:
        principal = await self._node.caller(context, WRITE, "AllocateNetwork")
        bad: list[FieldViolation] = []
        v.name("name", request.name, bad)
        v.enum("network_type", request.network_type, list(_TYPES), bad)
        kind = _TYPES.get(request.network_type)
        physnet = request.physical_network
        if kind is network.NetworkType.VXLAN and physnet:
            bad.append(FieldViolation("physical_network", "must be empty for VXLAN"))
        elif kind not in (None, network.NetworkType.VXLAN) and not network.PHYSNET_RE.match(
            physnet
        ):
            bad.append(FieldViolation("physical_network", "required: 1-64 letters, digits, . _ -"))
        v.string_map("metadata", request.metadata, bad)
        refuse(bad)
        assert kind is not None
        if request.shared and not principal.is_admin:
            raise PermissionDenied("only an admin may allocate a shared network")
        network_id, at = v.new_id(), v.now()

        def decide(model: ReadModel) -> Decision:
            pool_sid = network.pool_stream(network.pool_id(kind, physnet))
            pool = model.get(pool_sid)
            created, seg = network.allocate(
                network_id,
                principal.tenant,
                request.name,
                kind,
                physnet,
                request.shared,
                dict(request.metadata),
                pool.state if pool else None,
                at,
            )
            changes = [
                Change(network.stream(network_id), 0, [created]),
                Change(pool_sid, model.version(pool_sid), [seg]),
                quotas.plan_consume(
                    model, principal.tenant, {"networks": 1}, f"network {network_id}"
                ),
            ]
            return Decision(changes, network.evolve(None, created).view())

        response = await self._run(principal, request, "AllocateNetwork", context, decide)
        return _to(pb.Network(), response)

    @rpc
    async def GetNetwork(self, request: pb.GetNetworkRequest, context: Ctx) -> pb.Network:
        principal = await self._node.caller(context, READ, "GetNetwork")
        _ids(("network_id", request.network_id))
        found = ports.find_network(self._node.model, principal, request.network_id)
        self._node.answered(context)
        return _to(pb.Network(), found.view())

    @rpc
    async def ListNetworks(
        self, request: pb.ListNetworksRequest, context: Ctx
    ) -> pb.ListNetworksResponse:
        principal = await self._node.caller(context, READ, "ListNetworks")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        refuse(bad)
        items = sorted(
            (
                n
                for n in _states(self._node.model, network.KIND, network.Network)
                if not n.terminated and n.visible_to(principal.tenant, principal.is_admin)
            ),
            key=lambda n: (n.name, n.network_id),
        )
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.ListNetworksResponse(
            networks=[_to(pb.Network(), n.view()) for n in chunk], page=page
        )

    @rpc
    async def UpdateNetwork(self, request: pb.UpdateNetworkRequest, context: Ctx) -> pb.Network:
        principal = await self._node.caller(context, WRITE, "UpdateNetwork")
        bad: list[FieldViolation] = []
        v.resource_id("network_id", request.network_id, bad)
        fields = _mask(
            request.update_mask,
            {"name": bool(request.name), "metadata": bool(request.metadata)},
            bad,
        )
        if "name" in fields:
            v.name("name", request.name, bad)
        v.string_map("metadata", request.metadata, bad)
        refuse(bad)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            state = ports.owned_network(model, principal, request.network_id)
            events = network.update(
                state,
                request.name if "name" in fields else None,
                dict(request.metadata) if "metadata" in fields else None,
                at,
            )
            sid = network.stream(request.network_id)
            changes = [Change(sid, model.version(sid), events)] if events else []
            return Decision(changes, _fold(network.evolve, state, events).view())

        response = await self._run(principal, request, "UpdateNetwork", context, decide)
        return _to(pb.Network(), response)

    @rpc
    async def TerminateNetwork(
        self, request: pb.TerminateNetworkRequest, context: Ctx
    ) -> pb.TerminateNetworkResponse:
        principal = await self._node.caller(context, WRITE, "TerminateNetwork")
        _ids(("network_id", request.network_id))
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            state = ports.owned_network(model, principal, request.network_id)
            addresses, ipam_version = ports.ipam_state(model, state.network_id)
            closed = ipam.close(addresses)  # refused while ports hold addresses
            terminated, released = network.terminate(state, at)
            pool_sid = network.pool_stream(released.pool)
            changes = [
                Change(
                    network.stream(state.network_id),
                    model.version(network.stream(state.network_id)),
                    [terminated],
                ),
                Change(ipam.stream(state.network_id), ipam_version, [closed]),
                Change(pool_sid, model.version(pool_sid), [released]),
                quotas.plan_release(
                    model, state.tenant_id, {"networks": 1}, f"network {state.network_id} ended"
                ),
            ]
            # Its subnets go with it; a subnet not yet in this model conflicts and retries.
            for subnet_id in addresses.subnets:
                sid = network.subnet_stream(subnet_id)
                ended = network.SubnetTerminated(subnet_id, state.network_id, at)
                changes.append(Change(sid, model.version(sid), [ended]))
            return Decision(changes, {"networkId": state.network_id})

        response = await self._run(principal, request, "TerminateNetwork", context, decide)
        return pb.TerminateNetworkResponse(network_id=str(response["networkId"]))

    # -- subnets -------------------------------------------------------------------------

    @rpc
    async def AllocateSubnet(self, request: pb.AllocateSubnetRequest, context: Ctx) -> pb.Subnet:
        principal = await self._node.caller(context, WRITE, "AllocateSubnet")
        bad: list[FieldViolation] = []
        v.resource_id("network_id", request.network_id, bad)
        v.name("name", request.name, bad, required=False)
        pools = [(p.start, p.end) for p in request.allocation_pools]
        layout = ipam.layout(request.cidr, request.gateway_ip, pools, bad)
        refuse(bad)
        assert layout is not None
        subnet_id, at = v.new_id(), v.now()

        def decide(model: ReadModel) -> Decision:
            net = ports.owned_network(model, principal, request.network_id)
            addresses, ipam_version = ports.ipam_state(model, net.network_id)
            added = ipam.add_subnet(addresses, subnet_id, layout)
            created = network.allocate_subnet(
                subnet_id,
                net,
                principal.tenant,
                request.name,
                layout.cidr,
                layout.version,
                layout.gateway_ip,
                layout.pools,
                at,
            )
            changes = [
                Change(network.subnet_stream(subnet_id), 0, [created]),
                Change(ipam.stream(net.network_id), ipam_version, [added]),
            ]
            return Decision(changes, network.evolve_subnet(None, created).view())

        response = await self._run(principal, request, "AllocateSubnet", context, decide)
        return _to(pb.Subnet(), response)

    @rpc
    async def GetSubnet(self, request: pb.GetSubnetRequest, context: Ctx) -> pb.Subnet:
        principal = await self._node.caller(context, READ, "GetSubnet")
        _ids(("subnet_id", request.subnet_id))
        found = ports.find_subnet(self._node.model, principal, request.subnet_id)
        self._node.answered(context)
        return _to(pb.Subnet(), found.view())

    @rpc
    async def ListSubnets(
        self, request: pb.ListSubnetsRequest, context: Ctx
    ) -> pb.ListSubnetsResponse:
        principal = await self._node.caller(context, READ, "ListSubnets")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        if request.network_id:
            v.resource_id("network_id", request.network_id, bad)
        refuse(bad)
        model = self._node.model
        shared = {
            n.network_id
            for n in _states(model, network.KIND, network.Network)
            if n.shared and not n.terminated
        }
        items = sorted(
            (
                s
                for s in _states(model, network.SUBNET_KIND, network.Subnet)
                if not s.terminated
                and (not request.network_id or s.network_id == request.network_id)
                and (
                    principal.is_admin or s.tenant_id == principal.tenant or s.network_id in shared
                )
            ),
            key=lambda s: (s.network_id, s.cidr, s.subnet_id),
        )
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.ListSubnetsResponse(
            subnets=[_to(pb.Subnet(), s.view()) for s in chunk], page=page
        )

    @rpc
    async def TerminateSubnet(
        self, request: pb.TerminateSubnetRequest, context: Ctx
    ) -> pb.TerminateSubnetResponse:
        principal = await self._node.caller(context, WRITE, "TerminateSubnet")
        _ids(("subnet_id", request.subnet_id))
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            state = ports.find_subnet(model, principal, request.subnet_id)
            if not principal.is_admin and state.tenant_id != principal.tenant:
                raise PermissionDenied(f"subnet {state.subnet_id} is owned by another tenant")
            addresses, ipam_version = ports.ipam_state(model, state.network_id)
            removed = ipam.remove_subnet(addresses, state.subnet_id)  # refused while in use
            ended = network.terminate_subnet(state, state.subnet_id, at)
            sid = network.subnet_stream(state.subnet_id)
            changes = [
                Change(sid, model.version(sid), [ended]),
                Change(ipam.stream(state.network_id), ipam_version, [removed]),
            ]
            return Decision(changes, {"subnetId": state.subnet_id})

        response = await self._run(principal, request, "TerminateSubnet", context, decide)
        return pb.TerminateSubnetResponse(subnet_id=str(response["subnetId"]))

    # -- ports ---------------------------------------------------------------------------

    @rpc
    async def AllocatePort(self, request: pb.AllocatePortRequest, context: Ctx) -> pb.Port:
        principal = await self._node.caller(context, WRITE, "AllocatePort")
        bad: list[FieldViolation] = []
        v.resource_id("network_id", request.network_id, bad)
        v.name("name", request.name, bad, required=False)
        v.name("device_id", request.device_id, bad, required=False)
        v.string_map("metadata", request.metadata, bad)
        if request.mac_address:
            ipam.parse_mac("mac_address", request.mac_address, bad)
        _fixed_ips(request.fixed_ips, bad)
        refuse(bad)
        port_id, at = v.new_id(), v.now()
        wanted = [(f.subnet_id, f.ip_address or None) for f in request.fixed_ips]

        def decide(model: ReadModel) -> Decision:
            changes, view = ports.plan_port(
                model,
                principal,
                request.network_id,
                port_id,
                request.device_id,
                at,
                name=request.name,
                mac=request.mac_address or None,
                fixed_ips=wanted,
                metadata=dict(request.metadata),
            )
            charge = quotas.plan_consume(model, principal.tenant, {"ports": 1}, f"port {port_id}")
            return Decision([*changes, charge], view)

        response = await self._run(principal, request, "AllocatePort", context, decide)
        return _to(pb.Port(), response)

    @rpc
    async def GetPort(self, request: pb.GetPortRequest, context: Ctx) -> pb.Port:
        principal = await self._node.caller(context, READ, "GetPort")
        _ids(("port_id", request.port_id))
        found = ports.find_port(self._node.model, principal, request.port_id)
        self._node.answered(context)
        return _to(pb.Port(), found.view())

    @rpc
    async def ListPorts(self, request: pb.ListPortsRequest, context: Ctx) -> pb.ListPortsResponse:
        principal = await self._node.caller(context, READ, "ListPorts")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        if request.network_id:
            v.resource_id("network_id", request.network_id, bad)
        refuse(bad)
        items = sorted(
            (
                p
                for p in _states(self._node.model, port.KIND, port.Port)
                if not p.terminated
                and (principal.is_admin or p.tenant_id == principal.tenant)
                and (not request.network_id or p.network_id == request.network_id)
                and (not request.device_id or p.device_id == request.device_id)
            ),
            key=lambda p: (p.network_id, p.name, p.port_id),
        )
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.ListPortsResponse(ports=[_to(pb.Port(), p.view()) for p in chunk], page=page)

    @rpc
    async def UpdatePort(self, request: pb.UpdatePortRequest, context: Ctx) -> pb.Port:
        principal = await self._node.caller(context, WRITE, "UpdatePort")
        bad: list[FieldViolation] = []
        v.resource_id("port_id", request.port_id, bad)
        present = {
            "name": bool(request.name),
            "metadata": bool(request.metadata),
            "device_id": bool(request.device_id),
        }
        fields = _mask(request.update_mask, present, bad)
        v.name("name", request.name, bad, required=False)
        v.name("device_id", request.device_id, bad, required=False)
        v.string_map("metadata", request.metadata, bad)
        refuse(bad)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            state = ports.find_port(model, principal, request.port_id)
            events = port.update(
                state,
                request.name if "name" in fields else None,
                dict(request.metadata) if "metadata" in fields else None,
                at,
            )
            if "device_id" in fields:
                events += port.set_device(state, request.device_id, at)
            sid = port.stream(state.port_id)
            changes = [Change(sid, model.version(sid), events)] if events else []
            return Decision(changes, _fold(port.evolve, state, events).view())

        response = await self._run(principal, request, "UpdatePort", context, decide)
        return _to(pb.Port(), response)

    @rpc
    async def TerminatePort(
        self, request: pb.TerminatePortRequest, context: Ctx
    ) -> pb.TerminatePortResponse:
        principal = await self._node.caller(context, WRITE, "TerminatePort")
        _ids(("port_id", request.port_id))
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            state = ports.find_port(model, principal, request.port_id)
            ended = port.terminate(state, at)  # refused while bound
            sid = port.stream(state.port_id)
            changes = [Change(sid, model.version(sid), [ended])]
            addresses, ipam_version = ports.ipam_state(model, state.network_id)
            released = ipam.release(addresses, state.port_id)
            if released is not None:
                changes.append(Change(ipam.stream(state.network_id), ipam_version, [released]))
            changes.append(
                quotas.plan_release(
                    model, state.tenant_id, {"ports": 1}, f"port {state.port_id} ended"
                )
            )
            return Decision(changes, {"portId": state.port_id})

        response = await self._run(principal, request, "TerminatePort", context, decide)
        return pb.TerminatePortResponse(port_id=str(response["portId"]))


# -- helpers -------------------------------------------------------------------------------


def _to(message: M, view: Mapping[str, Any]) -> M:
    view_to(message, dict(view))
    return message


def _ids(*pairs: tuple[str, str]) -> None:
    bad: list[FieldViolation] = []
    for fld, value in pairs:
        v.resource_id(fld, value, bad)
    refuse(bad)


def _states(model: ReadModel, kind: str, cls: type[S]) -> list[S]:
    return [e.state for _, e in model.of_kind(kind) if isinstance(e.state, cls)]


def _fold(evolve: Callable[[Any, DomainEvent], S], state: S, events: list[Any]) -> S:
    return functools.reduce(evolve, events, state)


def _mask(mask: FieldMask, present: dict[str, bool], bad: list[FieldViolation]) -> set[str]:
    """The fields an update changes: those named by the mask, else those set (AIP-134)."""
    if mask.paths:
        unknown = [p for p in mask.paths if p not in present]
        if unknown:
            bad.append(
                FieldViolation(
                    "update_mask", f"unknown fields {unknown}; allowed: {sorted(present)}"
                )
            )
        return set(mask.paths)
    chosen = {f for f, is_set in present.items() if is_set}
    if not chosen:
        bad.append(FieldViolation("update_mask", "nothing to update"))
    return chosen


def _fixed_ips(fixed_ips: Any, bad: list[FieldViolation]) -> None:
    if len(fixed_ips) > ipam.MAX_FIXED_IPS:
        bad.append(FieldViolation("fixed_ips", f"at most {ipam.MAX_FIXED_IPS} entries"))
    for i, f in enumerate(fixed_ips):
        v.resource_id(f"fixed_ips[{i}].subnet_id", f.subnet_id, bad)
        if f.ip_address:
            ipam.parse_ip(f"fixed_ips[{i}].ip_address", f.ip_address, bad)
