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


@cluster.command("status")
def cluster_status(ctx: typer.Context) -> None:
    """Every configured API node with its health, log head and read-model lag."""

    async def work(_vim: VimClient, s: Settings) -> int:
        rows = await asyncio.gather(*(_probe(s, e) for e in s.endpoints))
        emit_list(
            s.output,
            list(rows),
            [
                ("MEMBER", "member"),
                ("ENDPOINT", "endpoint"),
                ("HEALTH", "health"),
                ("LOG HEAD", "log_head"),
                ("READ MODEL", "read_model_position"),
                ("MS", "latency_ms"),
            ],
        )
        return sum(1 for r in rows if r["health"] != "SERVING")

    unhealthy = run(ctx, work)
    if unhealthy:
        raise typer.Exit(int(Exit.UNAVAILABLE))
