"""Planning port changes against the read model, for the Networks API and for compute.

Every function here reads the read model and returns `Change`s (stream, expected
version, events) for the caller's `Decision`; none appends. The expected
versions are those the decision was made against: the port stream at 0 for a
new port, and the network's IPAM stream at its current version, so concurrent
allocations on one network serialise through the log (the loser's append
conflicts, `CommandRunner` waits and decides again) and an address or MAC is
never held twice.

Tenancy: a non-admin principal sees its own tenant's ports and networks, plus
shared networks (to read and to attach to). Anything else is NOT_FOUND, exactly
as if it did not exist. Changing a visible shared network it does not own is
PERMISSION_DENIED.

Used by the compute service (servers create, bind and release their ports):
`plan_port`, `find_port`, `bind_port`, `unbind_port`, `plan_release`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vim.app.commands import Change, Principal
from vim.domain import ipam, network, port
from vim.errors import FieldViolation, InvalidInput, NotFound, PermissionDenied
from vim.projections.readmodel import ReadModel

NAME_MAX = 255


def find_network(model: ReadModel, principal: Principal, network_id: str) -> network.Network:
    """A live network the principal may see (own, shared, or any for an admin)."""
    entry = model.get(network.stream(network_id))
    state: network.Network | None = entry.state if entry else None
    if state is None or state.terminated:
        raise NotFound(f"network {network_id} not found")
    if not state.visible_to(principal.tenant, principal.is_admin):
        raise NotFound(f"network {network_id} not found")
    return state


def owned_network(model: ReadModel, principal: Principal, network_id: str) -> network.Network:
    """A live network the principal may change: its own (or any, for an admin)."""
    state = find_network(model, principal, network_id)
    if not principal.is_admin and state.tenant_id != principal.tenant:
        raise PermissionDenied(f"network {network_id} is shared but owned by another tenant")
    return state


def find_subnet(model: ReadModel, principal: Principal, subnet_id: str) -> network.Subnet:
    """A live subnet the principal may see (own, of a shared network, or any for an admin)."""
    entry = model.get(network.subnet_stream(subnet_id))
    state: network.Subnet | None = entry.state if entry else None
    if state is None or state.terminated:
        raise NotFound(f"subnet {subnet_id} not found")
    if not (principal.is_admin or state.tenant_id == principal.tenant):
        net = model.get(network.stream(state.network_id))
        if net is None or not net.state.shared:
            raise NotFound(f"subnet {subnet_id} not found")
    return state


def ipam_state(model: ReadModel, network_id: str) -> tuple[ipam.Ipam, int]:
    """The network's IPAM state and the version it is at (0 before its first event)."""
    sid = ipam.stream(network_id)
    entry = model.get(sid)
    state: ipam.Ipam = entry.state if entry else ipam.empty(network_id)
    return state, model.version(sid)


def find_port(model: ReadModel, principal: Principal, port_id: str) -> port.Port:
    """A live port of the principal's tenant (any tenant's for an admin), or NotFound.

    The state has port_id, network_id, tenant_id, mac_address, fixed_ips
    ([{"subnet_id", "ip_address"}]), device_id, name, metadata.
    """
    state = _port(model, port_id)
    if not (principal.is_admin or state.tenant_id == principal.tenant):
        raise NotFound(f"port {port_id} not found")
    return state


def plan_port(
    model: ReadModel,
    principal: Principal,
    network_id: str,
    port_id: str,
    device_id: str,
    now: str,
    *,
    name: str = "",
    mac: str | None = None,
    fixed_ips: Sequence[tuple[str, str | None]] = (),
    metadata: Mapping[str, str] | None = None,
) -> tuple[list[Change], dict[str, Any]]:
    """A new port with its addresses: (changes, the port's view).

    Raises NotFound (network not visible), InvalidInput (bad MAC or fixed IP),
    AlreadyExists (MAC or IP taken) and PoolExhausted, a DomainError (no free
    address). `fixed_ips` are (subnet_id, ip or None for "pick one") pairs;
    empty gives one address of each IP version the network has subnets of.
    """
    net = find_network(model, principal, network_id)
    bad: list[FieldViolation] = []
    if len(name) > NAME_MAX:
        bad.append(FieldViolation("name", f"at most {NAME_MAX} characters"))
    wanted_mac = ipam.parse_mac("mac_address", mac, bad) if mac else None
    if bad:
        raise InvalidInput("invalid port: " + "; ".join(v.description for v in bad), bad)
    state, version = ipam_state(model, net.network_id)
    held = ipam.allocate(state, port_id, fixed_ips, wanted_mac)
    created = port.allocate(
        port_id,
        net.network_id,
        principal.tenant,
        name,
        held.mac_address,
        held.fixed_ips,
        device_id,
        metadata or {},
        now,
    )
    changes = [
        Change(port.stream(port_id), 0, [created]),
        Change(ipam.stream(net.network_id), version, [held]),
    ]
    return changes, port.evolve(None, created).view()


def plan_release(model: ReadModel, port_id: str, now: str) -> list[Change]:
    """Terminate a port (bound or not) and release its addresses; [] if already gone."""
    entry = model.get(port.stream(port_id))
    if entry is None:
        raise NotFound(f"port {port_id} not found")
    state: port.Port = entry.state
    if state.terminated:
        return []
    changes = [
        Change(
            port.stream(port_id),
            entry.version,
            [port.terminate(state, now, force=True)],
        )
    ]
    pool, version = ipam_state(model, state.network_id)
    released = ipam.release(pool, port_id)
    if released is not None:
        changes.append(Change(ipam.stream(state.network_id), version, [released]))
    return changes


def bind_port(model: ReadModel, port_id: str, device_id: str, now: str) -> list[Change]:
    """Attach an existing port to a device; [] if it is already bound to it."""
    state = _port(model, port_id)
    return _change(model, port_id, port.bind(state, device_id, now))


def unbind_port(model: ReadModel, port_id: str, now: str) -> list[Change]:
    """Detach a port from its device (it keeps its addresses); [] if not bound."""
    state = _port(model, port_id)
    return _change(model, port_id, port.unbind(state, now))


def _port(model: ReadModel, port_id: str) -> port.Port:
    entry = model.get(port.stream(port_id))
    return port.live(entry.state if entry else None, port_id)


def _change(model: ReadModel, port_id: str, events: Sequence[Any]) -> list[Change]:
    if not events:
        return []
    sid = port.stream(port_id)
    return [Change(sid, model.version(sid), list(events))]
