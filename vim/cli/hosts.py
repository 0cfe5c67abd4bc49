"""`vimctl host ...`: hosts, zones, capacity and maintenance."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from vim._gen.vim.v1 import compute_pb2, hosts_pb2, hosts_pb2_grpc
from vim.cli.compute import SERVERS
from vim.cli.failures import OperationFailed
from vim.cli.output import as_dict, emit_list, emit_one, stderr
from vim.cli.resources import Resource, add_common_verbs, list_all
from vim.cli.runtime import request_id, run
from vim.cli.settings import Output, Settings
from vim.client import VimClient

hosts = typer.Typer(help="Compute hosts: state, health, capacity, maintenance.")
maintenance = typer.Typer(help="Take a host out of service and back.")
hosts.add_typer(maintenance, name="maintenance")

_STUB = hosts_pb2_grpc.HostsStub

HOSTS = Resource(
    noun="host",
    stub=_STUB,
    id_field="hostname",
    list_rpc="ListHosts",
    list_request=hosts_pb2.ListHostsRequest,
    items_field="hosts",
    get_rpc="GetHost",
    get_request=hosts_pb2.GetHostRequest,
    columns=[
        ("HOST", "hostname"),
        ("ZONE", "zone"),
        ("STATE", "state"),
        ("HEALTH", "health"),
        ("MAINT", "maintenance"),
        ("VCPUS", "capacity.total.vcpus"),
        ("USED", "capacity.used.vcpus"),
        ("INSTANCES", "capacity.used.instances"),
    ],
    list_filters={"zone": "zone", "state": "state"},
)
add_common_verbs(hosts, HOSTS)

_LIVE = {
    compute_pb2.SERVER_STATE_BUILDING,
    compute_pb2.SERVER_STATE_ACTIVE,
    compute_pb2.SERVER_STATE_STOPPED,
    compute_pb2.SERVER_STATE_PAUSED,
    compute_pb2.SERVER_STATE_SUSPENDED,
    compute_pb2.SERVER_STATE_ERROR,
}


async def servers_on(vim: VimClient, hostname: str) -> list[dict[str, object]]:
    servers = await list_all(vim, SERVERS, 0, host=hostname)
    live = {compute_pb2.ServerState.Name(s) for s in _LIVE}
    return [s for s in servers if s.get("state") in live]


async def wait_until_empty(
    vim: VimClient, hostname: str, settings: Settings, what: str, timeout_s: float
) -> int:
    """Wait, with a live progress bar, until no server is on the host; how many moved."""
    first = len(await servers_on(vim, hostname))
    deadline = time.monotonic() + timeout_s
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=stderr,
        disable=not (settings.output is Output.TABLE and stderr.is_terminal),
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=max(first, 1))
        while True:
            left = len(await servers_on(vim, hostname))
            bar.update(task, completed=max(first - left, 0) if first else 1)
            if left == 0:
                return first
            if time.monotonic() > deadline:
                raise OperationFailed(
                    f"{left} server(s) still on {hostname} after {timeout_s:.0f} s"
                )
            await asyncio.sleep(0.3)


@maintenance.command("enable")
def enable(
    ctx: typer.Context,
    hostname: Annotated[str, typer.Argument()],
    reason: Annotated[str, typer.Option()] = "",
    wait: Annotated[bool, typer.Option(help="Wait until the host is empty.")] = False,
    wait_timeout: Annotated[float, typer.Option()] = 600.0,
) -> None:
    """Stop new placements on the host; its servers are moved off by the fault manager."""

    async def work(vim: VimClient, s: Settings) -> None:
        request = hosts_pb2.EnableMaintenanceRequest(
            request_id=request_id(), hostname=hostname, reason=reason
        )
        host = await vim.unary(_STUB, "EnableMaintenance", request)
        out = as_dict(host)
        if wait:
            out["servers_moved"] = await wait_until_empty(
                vim, hostname, s, f"emptying {hostname}", wait_timeout
            )
            out["empty"] = True
        emit_one(s.output, out)

    run(ctx, work)


@maintenance.command("disable")
def disable(ctx: typer.Context, hostname: Annotated[str, typer.Argument()]) -> None:
    """Return the host to service."""

    async def work(vim: VimClient, s: Settings) -> None:
        request = hosts_pb2.DisableMaintenanceRequest(request_id=request_id(), hostname=hostname)
        emit_one(s.output, as_dict(await vim.unary(_STUB, "DisableMaintenance", request)))

    run(ctx, work)


@hosts.command("servers")
def servers(ctx: typer.Context, hostname: Annotated[str, typer.Argument()]) -> None:
    """The servers placed on a host."""

    async def work(vim: VimClient, s: Settings) -> None:
        emit_list(s.output, await servers_on(vim, hostname), SERVERS.columns)

    run(ctx, work)


@hosts.command("zones")
def zones(ctx: typer.Context) -> None:
    """Availability zones with their host counts and capacity."""

    async def work(vim: VimClient, s: Settings) -> None:
        response = await vim.unary(_STUB, "ListZones", hosts_pb2.ListZonesRequest())
        emit_list(
            s.output,
            [as_dict(z) for z in response.zones],
            [
                ("ZONE", "name"),
                ("HOSTS", "host_count"),
                ("SCHEDULABLE", "schedulable_hosts"),
                ("VCPUS", "capacity.total.vcpus"),
                ("AVAILABLE", "capacity.available.vcpus"),
            ],
        )

    run(ctx, work)


@hosts.command("capacity")
def capacity(
    ctx: typer.Context, zone: Annotated[str, typer.Option(help="Only this zone.")] = ""
) -> None:
    """Capacity per zone and per host: total, used, reserved, available."""

    async def work(vim: VimClient, s: Settings) -> None:
        report = await vim.unary(_STUB, "GetCapacity", hosts_pb2.GetCapacityRequest(zone=zone))
        data = as_dict(report)
        if s.output is not Output.TABLE:
            emit_one(s.output, data)
            return
        cols = [
            ("NAME", "name"),
            ("HOST", "hostname"),
            ("TOTAL VCPUS", "capacity.total.vcpus"),
            ("USED", "capacity.used.vcpus"),
            ("RESERVED", "capacity.reserved.vcpus"),
            ("AVAILABLE", "capacity.available.vcpus"),
            ("AVAILABLE RAM MB", "capacity.available.ram_mb"),
        ]
        emit_list(s.output, data.get("zones", []), cols, title="zones")
        emit_list(s.output, data.get("hosts", []), cols, title="hosts")

    run(ctx, work)
