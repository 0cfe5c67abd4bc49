"""`vimctl projections ...` and `vimctl cluster ...`."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import typer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from vim._gen.vim.v1 import admin_pb2, admin_pb2_grpc, events_pb2, events_pb2_grpc
from vim.cli.failures import Exit, OperationFailed
from vim.cli.output import as_dict, emit_list, emit_one, stderr
from vim.cli.runtime import client_for, run
from vim.cli.settings import Output, Settings
from vim.client import VimClient

projections = typer.Typer(help="Read models (projections of the event log).")
cluster = typer.Typer(help="The control plane's members and their health.")


@projections.command("status")
def status(ctx: typer.Context) -> None:
    """The read model's position, digest and stream count on the node answering."""

    async def work(vim: VimClient, s: Settings) -> None:
        model = await vim.unary(
            admin_pb2_grpc.AdminStub, "GetReadModel", admin_pb2.GetReadModelRequest()
        )
        emit_one(s.output, as_dict(model))

    run(ctx, work)


@projections.command("rebuild")
def rebuild(ctx: typer.Context) -> None:
    """Drop and rebuild the read model from the log; says whether the result is identical."""

    async def work(vim: VimClient, s: Settings) -> None:
        show = s.output is Output.TABLE and stderr.is_terminal
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=stderr,
            disable=not show,
            transient=True,
        ) as bar:
            bar.add_task("replaying the event log", total=None)
            result = await vim.unary(
                admin_pb2_grpc.AdminStub,
                "RebuildReadModel",
                admin_pb2.RebuildReadModelRequest(),
                timeout_s=max(s.timeout_s, 600.0),
            )
        emit_one(s.output, as_dict(result))
        if not result.identical:
            raise OperationFailed("the rebuilt read model differs from the live one")

    run(ctx, work)


async def _probe(settings: Settings, endpoint: str) -> dict[str, Any]:
    """One API node, asked on its own (no failover to another endpoint)."""
    row: dict[str, Any] = {"member": "api", "endpoint": endpoint}
    started = time.monotonic()
    try:
        single = client_for(_single(settings, endpoint), retries=0)
        async with single as vim:
            answer = await vim.unary(
                health_pb2_grpc.HealthStub,
                "Check",
                health_pb2.HealthCheckRequest(),
                timeout_s=min(settings.timeout_s, 3.0),
            )
            head = await vim.unary(
                events_pb2_grpc.EventLogStub,
                "GetHead",
                events_pb2.GetHeadRequest(),
                timeout_s=min(settings.timeout_s, 3.0),
            )
            model = await vim.unary(
                admin_pb2_grpc.AdminStub,
                "GetReadModel",
                admin_pb2.GetReadModelRequest(),
                timeout_s=min(settings.timeout_s, 3.0),
            )
        row["health"] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        row["log_head"] = int(head.head.position)
        row["read_model_position"] = int(model.position)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        row["health"] = f"UNREACHABLE ({code.name if code else 'error'})"
    row["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
    return row


def _single(settings: Settings, endpoint: str) -> Settings:
    from dataclasses import replace

    return replace(settings, endpoints=(endpoint,))


async def _control_plane(vim: VimClient) -> admin_pb2.ClusterStatus:
    status: admin_pb2.ClusterStatus = await vim.unary(
        admin_pb2_grpc.AdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
    )
    return status


def _member_rows(status: admin_pb2.ClusterStatus) -> list[dict[str, Any]]:
    log = status.event_log
    rows: list[dict[str, Any]] = [
        {
            "member": "eventlog",
            "endpoint": log.backend,
            "health": "OK" if log.reachable else "UNREACHABLE",
            "log_head": int(log.head),
            "detail": log.error,
        }
    ]
    rows += [
        {
            "member": "etcd",
            "endpoint": m.endpoint,
            "health": "OK" if m.healthy else "UNREACHABLE",
            "detail": ("leader " if m.is_leader else "") + (m.version or m.error),
        }
        for m in status.etcd
    ]
    rows += [
        {
            "member": "agent",
            "endpoint": a.hostname,
            "health": "ALIVE" if a.alive else "DEAD",
            "detail": f"host {a.host_state}" + (f", pid {a.pid}" if a.pid else ""),
        }
        for a in status.agents
    ]
    return rows


_HEALTHY = {"SERVING", "OK", "ALIVE"}


@cluster.command("status")
def cluster_status(ctx: typer.Context) -> None:
    """API nodes, event log, etcd members and agents, with health (exit 7 if any is not)."""

    async def work(vim: VimClient, s: Settings) -> int:
        rows = list(await asyncio.gather(*(_probe(s, e) for e in s.endpoints)))
        if any(r["health"] == "SERVING" for r in rows):
            rows += _member_rows(await _control_plane(vim))
        emit_list(
            s.output,
            rows,
            [
                ("MEMBER", "member"),
                ("ENDPOINT", "endpoint"),
                ("HEALTH", "health"),
                ("LOG HEAD", "log_head"),
                ("DETAIL", "detail"),
                ("MS", "latency_ms"),
            ],
        )
        return sum(1 for r in rows if r["health"] not in _HEALTHY)

    unhealthy = run(ctx, work)
    if unhealthy:
        raise typer.Exit(int(Exit.UNAVAILABLE))


def leaders(ctx: typer.Context) -> None:
    """Who leads the scheduler, fault manager and SDN controller: holder, term, since."""

    async def work(vim: VimClient, s: Settings) -> None:
        status = await _control_plane(vim)
        items = [as_dict(x) | {"coordination": status.coordination} for x in status.leaders]
        emit_list(
            s.output,
            items,
            [
                ("ROLE", "role"),
                ("HOLDER", "holder"),
                ("TERM", "term"),
                ("SINCE", "since"),
                ("NEWEST TOKEN IN LOG", "newest_token_in_log"),
                ("ERROR", "error"),
            ],
        )

    run(ctx, work)
