"""`vimctl network|subnet|port ...`."""

from __future__ import annotations

from typing import Annotated

import typer

from vim._gen.vim.v1 import networks_pb2, networks_pb2_grpc
from vim.cli.output import as_dict, emit_one
from vim.cli.resources import Resource, add_common_verbs, enum_value
from vim.cli.runtime import request_id, run
from vim.cli.settings import Settings
from vim.client import VimClient

networks = typer.Typer(help="Virtual networks (flat, VLAN, VXLAN).")
subnets = typer.Typer(help="Subnets (IPv4 and IPv6) of a network.")
ports = typer.Typer(help="Ports: a MAC and fixed IPs on a network.")

_STUB = networks_pb2_grpc.NetworksStub

NETWORKS = Resource(
    noun="network",
    stub=_STUB,
    id_field="network_id",
    list_rpc="ListNetworks",
    list_request=networks_pb2.ListNetworksRequest,
    items_field="networks",
    get_rpc="GetNetwork",
    get_request=networks_pb2.GetNetworkRequest,
    columns=[
        ("ID", "network_id"),
        ("NAME", "name"),
        ("TYPE", "network_type"),
        ("SEGMENT", "segmentation_id"),
        ("PHYSNET", "physical_network"),
        ("SHARED", "shared"),
    ],
    delete_rpc="TerminateNetwork",
    delete_request=networks_pb2.TerminateNetworkRequest,
)
SUBNETS = Resource(
    noun="subnet",
    stub=_STUB,
    id_field="subnet_id",
    list_rpc="ListSubnets",
    list_request=networks_pb2.ListSubnetsRequest,
    items_field="subnets",
    get_rpc="GetSubnet",
    get_request=networks_pb2.GetSubnetRequest,
    columns=[
        ("ID", "subnet_id"),
        ("NAME", "name"),
        ("NETWORK", "network_id"),
        ("CIDR", "cidr"),
        ("GATEWAY", "gateway_ip"),
    ],
    delete_rpc="TerminateSubnet",
    delete_request=networks_pb2.TerminateSubnetRequest,
    list_filters={"network": "network_id"},
)
PORTS = Resource(
    noun="port",
    stub=_STUB,
    id_field="port_id",
    list_rpc="ListPorts",
    list_request=networks_pb2.ListPortsRequest,
    items_field="ports",
    get_rpc="GetPort",
    get_request=networks_pb2.GetPortRequest,
    columns=[
        ("ID", "port_id"),
        ("NAME", "name"),
        ("NETWORK", "network_id"),
        ("MAC", "mac_address"),
        ("IPS", "fixed_ips"),
        ("DEVICE", "device_id"),
    ],
    delete_rpc="TerminatePort",
    delete_request=networks_pb2.TerminatePortRequest,
    list_filters={"network": "network_id", "device": "device_id"},
)
for group, res in ((networks, NETWORKS), (subnets, SUBNETS), (ports, PORTS)):
    add_common_verbs(group, res)


@networks.command("create")
def create_network(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    type_: Annotated[str, typer.Option("--type", help="flat, vlan or vxlan.")] = "vxlan",
    physnet: Annotated[str, typer.Option(help="Physical network (flat and vlan).")] = "",
    shared: Annotated[bool, typer.Option(help="Visible to every tenant.")] = False,
) -> None:
    """Allocate a network; the VIM picks the segmentation id."""
    request = networks_pb2.AllocateNetworkRequest(
        request_id=request_id(),
        name=name,
        network_type=enum_value(
            networks_pb2.NetworkType.DESCRIPTOR, "NETWORK_TYPE_", type_, "--type"
        ),
        physical_network=physnet,
        shared=shared,
    )

    async def work(vim: VimClient, s: Settings) -> None:
        emit_one(s.output, as_dict(await vim.unary(_STUB, "AllocateNetwork", request)))

    run(ctx, work)


@subnets.command("create")
def create_subnet(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    network: Annotated[str, typer.Option(help="Network id.")],
    cidr: Annotated[str, typer.Option(help="For example 10.0.0.0/24 or 2001:db8::/64.")],
    gateway: Annotated[str, typer.Option(help="Gateway address (default: the first).")] = "",
    pool: Annotated[list[str] | None, typer.Option(help="START-END (repeatable).")] = None,
) -> None:
    """Allocate a subnet on a network."""
    pools = []
    for item in pool or []:
        start, sep, end = item.partition("-")
        if not sep:
            raise typer.BadParameter(f"{item!r}: expected START-END", param_hint="--pool")
        pools.append(networks_pb2.AllocationPool(start=start, end=end))
    request = networks_pb2.AllocateSubnetRequest(
        request_id=request_id(),
        network_id=network,
        name=name,
        cidr=cidr,
        gateway_ip=gateway,
        allocation_pools=pools,
    )

    async def work(vim: VimClient, s: Settings) -> None:
        emit_one(s.output, as_dict(await vim.unary(_STUB, "AllocateSubnet", request)))

    run(ctx, work)


@ports.command("create")
def create_port(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    network: Annotated[str, typer.Option(help="Network id.")],
    ip: Annotated[
        list[str] | None, typer.Option(help="SUBNET_ID[=ADDRESS] (repeatable; IPAM picks).")
    ] = None,
    mac: Annotated[str, typer.Option(help="MAC address (default: allocated).")] = "",
) -> None:
    """Allocate a port; MAC and fixed IPs come from IPAM unless given."""
    fixed = []
    for item in ip or []:
        subnet, _, address = item.partition("=")
        fixed.append(networks_pb2.FixedIp(subnet_id=subnet, ip_address=address))
    request = networks_pb2.AllocatePortRequest(
        request_id=request_id(), network_id=network, name=name, fixed_ips=fixed, mac_address=mac
    )

    async def work(vim: VimClient, s: Settings) -> None:
        emit_one(s.output, as_dict(await vim.unary(_STUB, "AllocatePort", request)))

    run(ctx, work)
