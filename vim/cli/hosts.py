"""`vimctl host ...`: hosts, zones, capacity, maintenance and evacuation."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

from vim._gen.vim.v1 import compute_pb2, hosts_pb2, hosts_pb2_grpc
from vim.cli.compute import SERVERS
from vim.cli.failures import OperationFailed
from vim.cli.output import as_dict, emit_list, emit_one, stderr
from vim.cli.resources import Resource, add_common_verbs, get_one, list_all
from vim.cli.runtime import confirm, request_id, run
from vim.cli.settings import Output, Settings
from vim.client import VimClient

hosts = typer.Typer(help="Compute hosts: state, health, capacity, maintenance, evacuation.")
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


_SETTLED = ("HOST_STATE_FAILED", "HOST_STATE_FENCED")


def _outcome(server: dict[str, Any], hostname: str) -> str:
    """Where an evacuated server stands: MOVED, FAILED (no host took it), GONE, or PENDING."""
    state, on = server.get("state"), server.get("host", "")
    if state == "SERVER_STATE_DELETED":
        return "GONE"
    if state == "SERVER_STATE_ERROR" and not on:
        return "FAILED"
    if on and on != hostname:
        return "MOVED"
    return "PENDING"


async def _servers_now(vim: VimClient, ids: list[str], hostname: str) -> list[dict[str, Any]]:
    found = await asyncio.gather(*(get_one(vim, SERVERS, sid) for sid in ids))
    rows = []
    for message in found:
        d = as_dict(message)
        rows.append(
            {
                "server_id": d.get("server_id", ""),
                "name": d.get("name", ""),
                "host": d.get("host", ""),
                "state": d.get("state", ""),
                "outcome": _outcome(d, hostname),
                "fault_reason": d.get("fault_reason", ""),
            }
        )
    return rows


async def wait_evacuated(
    vim: VimClient, hostname: str, ids: list[str], settings: Settings, timeout_s: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Follow an evacuation with a live progress bar: the host fenced, then each of `ids`
    placed on another host (or failed); the host and the servers at the end."""
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
        task = bar.add_task(f"fencing {hostname}", total=max(len(ids), 1))
        while True:
            h = as_dict(await get_one(vim, HOSTS, hostname))
            rows = await _servers_now(vim, ids, hostname)
            pending = [r for r in rows if r["outcome"] == "PENDING"]
            fenced = h.get("state") == "HOST_STATE_FENCED"
            word = "evacuating" if fenced else "fencing"
            bar.update(
                task,
                description=f"{word} {hostname}",
                completed=len(rows) - len(pending) if ids else int(fenced),
            )
            requested = bool(h.get("evacuation_requested"))
            if not pending and not requested:
                return h, rows
            stuck = [r for r in pending if r["host"] == hostname]
            if stuck and not requested and h.get("state") not in _SETTLED:
                raise OperationFailed(
                    f"the fault manager declined to evacuate {hostname}: its agent is alive "
                    f"(state {h.get('state', '?').removeprefix('HOST_STATE_')}); nothing moved"
                )
            if time.monotonic() > deadline:
                state = h.get("state", "?").removeprefix("HOST_STATE_")
                hint = "" if fenced else " (not fenced yet: see `vimctl alarm list`)"
                raise OperationFailed(
                    f"{len(pending)} server(s) of {hostname} not placed elsewhere after "
                    f"{timeout_s:.0f} s; host {state}{hint}"
                )
            await asyncio.sleep(0.3)


@hosts.command("evacuate")
def evacuate(
    ctx: typer.Context,
    hostname: Annotated[str, typer.Argument()],
    reason: Annotated[str, typer.Option(help="Why (kept in the event log).")] = "",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow it until every server moved.")
    ] = True,
    wait_timeout: Annotated[float, typer.Option()] = 600.0,
) -> None:
    """Fence a failed host and rebuild its servers elsewhere, whatever the zone's policy.

    For a host whose agent is gone (FAILED, FENCED, or not renewing its lease). A
    running host is refused: a planned move is `host maintenance enable`.
    """
    confirm(yes, f"evacuate host {hostname} (fence it: power off; rebuild its servers elsewhere)")

    async def work(vim: VimClient, s: Settings) -> None:
        ids = [str(x["server_id"]) for x in await servers_on(vim, hostname)] if hostname else []
        request = hosts_pb2.EvacuateHostRequest(
            request_id=request_id(), hostname=hostname, reason=reason
        )
        out = as_dict(await vim.unary(_STUB, "EvacuateHost", request))
        if not wait:
            out["servers"] = ids
            emit_one(s.output, out)
            return
        out, rows = await wait_evacuated(vim, hostname, ids, s, wait_timeout)
        failed = [r for r in rows if r["outcome"] == "FAILED"]
        out |= {
            "servers": rows,
            "servers_moved": sum(r["outcome"] == "MOVED" for r in rows),
            "servers_failed": len(failed),
            "done": True,
        }
        if s.output is Output.TABLE:
            emit_list(s.output, rows, _EVACUATED, title=f"evacuated from {hostname}")
        else:
            emit_one(s.output, out)
        if failed:
            raise OperationFailed(
                f"{len(failed)} server(s) could not be placed: "
                + "; ".join(f"{r['server_id']}: {r['fault_reason']}" for r in failed)
            )

    run(ctx, work)


_EVACUATED = [
    ("ID", "server_id"),
    ("NAME", "name"),
    ("OUTCOME", "outcome"),
    ("HOST", "host"),
    ("STATE", "state"),
]


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
