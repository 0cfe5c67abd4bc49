"""`vimctl server ...` and `vimctl affinity-group ...`."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from vim._gen.vim.v1 import compute_pb2, compute_pb2_grpc
from vim.cli.failures import OperationFailed
from vim.cli.output import as_dict, emit_one, stderr
from vim.cli.resources import Resource, add_common_verbs, enum_prefix, enum_value, get_one
from vim.cli.runtime import confirm, request_id, run
from vim.cli.settings import Output, Settings
from vim.client import VimClient

servers = typer.Typer(help="Servers (virtual machines): create, operate, migrate, delete.")
groups = typer.Typer(help="Affinity and anti-affinity groups.")

SERVERS = Resource(
    noun="server",
    stub=compute_pb2_grpc.ComputeStub,
    id_field="server_id",
    list_rpc="ListServers",
    list_request=compute_pb2.ListServersRequest,
    items_field="servers",
    get_rpc="GetServer",
    get_request=compute_pb2.GetServerRequest,
    columns=[
        ("ID", "server_id"),
        ("NAME", "name"),
        ("STATE", "state"),
        ("TASK", "task"),
        ("HOST", "host"),
        ("ZONE", "zone"),
        ("FLAVOUR", "flavour.name"),
        ("PRIO", "priority"),
    ],
    list_filters={
        "name": "name",
        "state": "state",
        "host": "host",
        "group": "affinity_group_id",
    },
)
GROUPS = Resource(
    noun="affinity group",
    stub=compute_pb2_grpc.ComputeStub,
    id_field="group_id",
    list_rpc="ListAffinityGroups",
    list_request=compute_pb2.ListAffinityGroupsRequest,
    items_field="groups",
    get_rpc="GetAffinityGroup",
    get_request=compute_pb2.GetAffinityGroupRequest,
    columns=[
        ("ID", "group_id"),
        ("NAME", "name"),
        ("POLICY", "policy"),
        ("SCOPE", "scope"),
        ("MEMBERS", "member_ids"),
    ],
    delete_rpc="DeleteAffinityGroup",
    delete_request=compute_pb2.DeleteAffinityGroupRequest,
)
add_common_verbs(servers, SERVERS)
add_common_verbs(groups, GROUPS)

_SETTLED = {compute_pb2.SERVER_STATE_ERROR, compute_pb2.SERVER_STATE_DELETED}
_STATE = compute_pb2.ServerState


def _pairs(items: list[str] | None, option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint=option)
        out[key] = value
    return out


async def wait_for_server(
    vim: VimClient,
    server_id: str,
    done: Any,
    settings: Settings,
    what: str,
    timeout_s: float,
) -> compute_pb2.Server:
    """Poll the server until `done(server)`, with a live progress bar on a terminal.

    A server in ERROR ends the wait with exit 8 and its fault reason."""
    deadline = time.monotonic() + timeout_s
    show = settings.output is Output.TABLE and stderr.is_terminal
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=stderr,
        disable=not show,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=100, state="")
        while True:
            server = await get_one(vim, SERVERS, server_id)
            assert isinstance(server, compute_pb2.Server)
            state = _STATE.Name(server.state).removeprefix("SERVER_STATE_")
            bar.update(task, completed=server.progress, state=f"{state} {server.task}".strip())
            if done(server):
                return server
            if server.state in _SETTLED:
                raise OperationFailed(
                    f"server {server_id} is {state}: {server.fault_reason or 'no reason given'}"
                )
            if time.monotonic() > deadline:
                raise OperationFailed(f"server {server_id} still {state} after {timeout_s:.0f} s")
            await asyncio.sleep(0.2)


@servers.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    flavour: Annotated[str, typer.Option(help="Flavour id.")],
    image: Annotated[str, typer.Option(help="Image id.")],
    network: Annotated[list[str] | None, typer.Option(help="Network id (repeatable).")] = None,
    port: Annotated[list[str] | None, typer.Option(help="Existing port id (repeatable).")] = None,
    group: Annotated[str, typer.Option(help="Affinity group id.")] = "",
    zone: Annotated[str, typer.Option()] = "",
    meta: Annotated[list[str] | None, typer.Option(help="KEY=VALUE (repeatable).")] = None,
    priority: Annotated[int, typer.Option(min=0)] = 0,
    watchdog: Annotated[str, typer.Option(help="none, reset, poweroff or pause.")] = "none",
    no_live_migration: Annotated[
        bool, typer.Option("--no-live-migration", help="Forbid live migration.")
    ] = False,
    max_interruption_ms: Annotated[int, typer.Option(min=0)] = 0,
    wait: Annotated[bool, typer.Option(help="Wait until ACTIVE (exit 8 on ERROR).")] = False,
    wait_timeout: Annotated[float, typer.Option()] = 120.0,
) -> None:
    """Allocate a server; it starts BUILDING and the scheduler places it."""
    nics = [compute_pb2.NicRequest(network_id=n) for n in network or []]
    nics += [compute_pb2.NicRequest(port_id=p) for p in port or []]
    request = compute_pb2.AllocateComputeRequest(
        request_id=request_id(),
        name=name,
        flavour_id=flavour,
        image_id=image,
        networks=nics,
        affinity_group_id=group,
        zone=zone,
        metadata=_pairs(meta, "--meta"),
        priority=priority,
        watchdog=enum_value(
            compute_pb2.WatchdogPolicy.DESCRIPTOR, "WATCHDOG_POLICY_", watchdog, "--watchdog"
        ),
        migration=compute_pb2.MigrationConstraints(
            live_migration_allowed=not no_live_migration, max_interruption_ms=max_interruption_ms
        ),
    )

    async def work(vim: VimClient, s: Settings) -> None:
        server = await vim.unary(compute_pb2_grpc.ComputeStub, "AllocateCompute", request)
        if wait:
            server = await wait_for_server(
                vim,
                server.server_id,
                lambda x: x.state == compute_pb2.SERVER_STATE_ACTIVE,
                s,
                f"building {name}",
                wait_timeout,
            )
        emit_one(s.output, as_dict(server))

    run(ctx, work)


@servers.command("delete")
def delete(
    ctx: typer.Context,
    server_id: Annotated[str, typer.Argument(metavar="ID")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Terminate a server (its owned ports are released with it)."""
    confirm(yes, f"delete server {server_id}")

    async def work(vim: VimClient, s: Settings) -> None:
        request = compute_pb2.TerminateComputeRequest(request_id=request_id(), server_id=server_id)
        await vim.unary(compute_pb2_grpc.ComputeStub, "TerminateCompute", request)
        emit_one(s.output, {"server_id": server_id, "deleted": True})

    run(ctx, work)


def _operate(op: str, settled: Any) -> Any:
    def command(
        ctx: typer.Context,
        server_id: Annotated[str, typer.Argument(metavar="ID")],
        wait: Annotated[bool, typer.Option(help="Wait until the operation is done.")] = False,
        wait_timeout: Annotated[float, typer.Option()] = 120.0,
    ) -> None:
        operation = enum_value(
            compute_pb2.ComputeOperation.DESCRIPTOR, "COMPUTE_OPERATION_", op, "operation"
        )

        async def work(vim: VimClient, s: Settings) -> None:
            request = compute_pb2.OperateComputeRequest(
                request_id=request_id(),
                server_id=server_id,
                operation=operation,
            )
            server = await vim.unary(compute_pb2_grpc.ComputeStub, "OperateCompute", request)
            if wait:
                server = await wait_for_server(
                    vim, server_id, settled, s, f"{op} {server_id}", wait_timeout
                )
            emit_one(s.output, as_dict(server))

        run(ctx, work)

    command.__doc__ = f"{op.capitalize()} a server."
    return command


def _idle_in(state: int) -> Any:
    return lambda s: s.state == state and not s.task


servers.command("start")(_operate("start", _idle_in(compute_pb2.SERVER_STATE_ACTIVE)))
servers.command("stop")(_operate("stop", _idle_in(compute_pb2.SERVER_STATE_STOPPED)))
servers.command("reboot")(_operate("reboot", _idle_in(compute_pb2.SERVER_STATE_ACTIVE)))
servers.command("pause")(_operate("pause", _idle_in(compute_pb2.SERVER_STATE_PAUSED)))
servers.command("unpause")(_operate("unpause", _idle_in(compute_pb2.SERVER_STATE_ACTIVE)))
servers.command("suspend")(_operate("suspend", _idle_in(compute_pb2.SERVER_STATE_SUSPENDED)))
servers.command("resume")(_operate("resume", _idle_in(compute_pb2.SERVER_STATE_ACTIVE)))


@servers.command("migrate")
def migrate(
    ctx: typer.Context,
    server_id: Annotated[str, typer.Argument(metavar="ID")],
    live: Annotated[
        bool, typer.Option("--live/--offline", help="Live (default) or offline.")
    ] = True,
    target: Annotated[str, typer.Option(help="Target host (default: the scheduler picks).")] = "",
    wait: Annotated[bool, typer.Option(help="Wait until the server is on another host.")] = False,
    wait_timeout: Annotated[float, typer.Option()] = 300.0,
) -> None:
    """Move a server to another host."""

    async def work(vim: VimClient, s: Settings) -> None:
        before = await get_one(vim, SERVERS, server_id)
        assert isinstance(before, compute_pb2.Server)
        request = compute_pb2.MigrateComputeRequest(
            request_id=request_id(),
            server_id=server_id,
            type=compute_pb2.MIGRATION_TYPE_LIVE if live else compute_pb2.MIGRATION_TYPE_OFFLINE,
            target_host=target,
        )
        server = await vim.unary(compute_pb2_grpc.ComputeStub, "MigrateCompute", request)
        if wait:
            server = await wait_for_server(
                vim,
                server_id,
                lambda x: x.host and x.host != before.host and not x.task,
                s,
                f"migrating {server_id}",
                wait_timeout,
            )
        emit_one(s.output, as_dict(server))

    run(ctx, work)


@groups.command("create")
def create_group(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    policy: Annotated[str, typer.Option(help="affinity or anti-affinity.")] = "anti-affinity",
    scope: Annotated[str, typer.Option(help="host or zone.")] = "host",
) -> None:
    """Create an affinity group (one VNF's servers, usually)."""
    request = compute_pb2.CreateAffinityGroupRequest(
        request_id=request_id(),
        name=name,
        policy=enum_value(
            compute_pb2.AffinityPolicy.DESCRIPTOR,
            enum_prefix(compute_pb2.AffinityPolicy.DESCRIPTOR),
            policy,
            "--policy",
        ),
        scope=enum_value(
            compute_pb2.AffinityScope.DESCRIPTOR,
            enum_prefix(compute_pb2.AffinityScope.DESCRIPTOR),
            scope,
            "--scope",
        ),
    )

    async def work(vim: VimClient, s: Settings) -> None:
        group = await vim.unary(compute_pb2_grpc.ComputeStub, "CreateAffinityGroup", request)
        emit_one(s.output, as_dict(group))

    run(ctx, work)
