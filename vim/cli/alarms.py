"""`vimctl alarm ...`: IFA005 alarms — list, show, acknowledge, watch live."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any

import typer

from vim._gen.vim.v1 import alarms_pb2, alarms_pb2_grpc
from vim.cli.output import as_dict, emit_line, emit_list, emit_one
from vim.cli.resources import enum_value
from vim.cli.runtime import request_id, run
from vim.cli.settings import Settings
from vim.client import VimClient

alarms = typer.Typer(help="Alarms: list, show, acknowledge, watch as a live stream.")

_STUB = alarms_pb2_grpc.AlarmsStub
COLUMNS = [
    ("ALARM", "alarm_id"),
    ("SEVERITY", "perceived_severity"),
    ("STATE", "state"),
    ("ACK", "ack_state"),
    ("OBJECT", "managed_object_id"),
    ("HOST", "hostname"),
    ("CAUSE", "probable_cause"),
    ("ROOT", "is_root_cause"),
    ("RAISED", "alarm_raised_time"),
]
_Severity = Annotated[
    list[str] | None,
    typer.Option("--severity", help="critical, major, minor, warning (repeatable)."),
]
_Resource = Annotated[str, typer.Option("--resource-type", help="host or server.")]


def _filter(
    severity: list[str] | None,
    resource_type: str,
    obj: str = "",
    state: str = "",
    ack: str = "",
    tenant: str = "",
) -> alarms_pb2.AlarmFilter:
    f = alarms_pb2.AlarmFilter(managed_object_id=obj, tenant_id=tenant)
    for s in severity or []:
        f.severities.append(
            enum_value(alarms_pb2.Severity.DESCRIPTOR, "SEVERITY_", s, "--severity")
        )
    if resource_type:
        f.resource_type = enum_value(
            alarms_pb2.ResourceType.DESCRIPTOR, "RESOURCE_TYPE_", resource_type, "--resource-type"
        )
    if state:
        f.state = enum_value(alarms_pb2.AlarmState.DESCRIPTOR, "ALARM_STATE_", state, "--state")
    if ack:
        f.ack_state = enum_value(alarms_pb2.AckState.DESCRIPTOR, "ACK_STATE_", ack, "--ack")
    return f


@alarms.command("list")
def list_(
    ctx: typer.Context,
    severity: _Severity = None,
    resource_type: _Resource = "",
    obj: Annotated[str, typer.Option("--object", help="Managed object id.")] = "",
    state: Annotated[str, typer.Option(help="fired, updated or cleared.")] = "",
    ack: Annotated[str, typer.Option(help="acknowledged or unacknowledged.")] = "",
    tenant: Annotated[str, typer.Option()] = "",
    history: Annotated[bool, typer.Option(help="Include archived (aged) alarms.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many (0: all).")] = 0,
) -> None:
    """Alarms, newest first as the API orders them."""
    alarm_filter = _filter(severity, resource_type, obj, state, ack, tenant)

    async def work(vim: VimClient, s: Settings) -> None:
        items: list[dict[str, Any]] = []
        token = ""
        while True:
            request = alarms_pb2.GetAlarmListRequest(filter=alarm_filter, include_history=history)
            request.page.page_size = 200
            request.page.page_token = token
            response = await vim.unary(_STUB, "GetAlarmList", request)
            items += [as_dict(a) for a in response.alarms]
            token = response.page.next_page_token
            if not token or (limit and len(items) >= limit):
                break
        emit_list(s.output, items[:limit] if limit else items, COLUMNS)

    run(ctx, work)


@alarms.command("show")
def show(ctx: typer.Context, alarm_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """One alarm with every IFA005 field, its root cause and correlated alarms."""

    async def work(vim: VimClient, s: Settings) -> None:
        alarm = await vim.unary(_STUB, "GetAlarm", alarms_pb2.GetAlarmRequest(alarm_id=alarm_id))
        emit_one(s.output, as_dict(alarm))

    run(ctx, work)


@alarms.command("ack")
def ack(
    ctx: typer.Context, alarm_id: Annotated[list[str], typer.Argument(metavar="ID...")]
) -> None:
    """Acknowledge alarms (a repeat changes nothing)."""

    async def work(vim: VimClient, s: Settings) -> None:
        done = []
        for one in alarm_id:
            request = alarms_pb2.AcknowledgeRequest(request_id=request_id(), alarm_id=one)
            done.append(as_dict(await vim.unary(_STUB, "Acknowledge", request)))
        if len(done) == 1:
            emit_one(s.output, done[0])
        else:
            emit_list(s.output, done, COLUMNS)

    run(ctx, work)


def _text(n: dict[str, Any]) -> str:
    a = n.get("alarm", {})
    change = str(n.get("change", "")).removeprefix("ALARM_CHANGE_")
    severity = str(a.get("perceived_severity", "")).removeprefix("SEVERITY_")
    root = "" if a.get("is_root_cause", True) else f" (caused by {a.get('correlated_alarm_ids')})"
    return (
        f"{n.get('recorded_at', '')} {change:<12} {severity:<9} {a.get('managed_object_id', '')} "
        f"{a.get('probable_cause', '')}{root}  [alarm {a.get('alarm_id', '')}, cursor "
        f"{n.get('cursor', '')}]"
    )


@alarms.command("watch")
def watch(
    ctx: typer.Context,
    severity: _Severity = None,
    resource_type: _Resource = "",
    tenant: Annotated[str, typer.Option()] = "",
    cursor: Annotated[
        str, typer.Option(help="Resume after this cursor (from a notification).")
    ] = "",
    heartbeat_ms: Annotated[
        int, typer.Option(min=0, help="Heartbeat interval (0: server default).")
    ] = 0,
    heartbeats: Annotated[bool, typer.Option(help="Print heartbeats too.")] = False,
    count: Annotated[int, typer.Option(min=0, help="Stop after this many notifications.")] = 0,
    seconds: Annotated[float, typer.Option(min=0.0, help="Stop after this long.")] = 0.0,
) -> None:
    """Follow alarm changes live (at least once: drop repeats by notification_id)."""
    request = alarms_pb2.SubscribeAlarmsRequest(
        filter=_filter(severity, resource_type, tenant=tenant),
        cursor=cursor,
        heartbeat_interval_ms=heartbeat_ms,
    )

    async def work(vim: VimClient, s: Settings) -> None:
        seen = 0

        async def follow() -> None:
            nonlocal seen
            async for message in vim.stream(_STUB, "SubscribeAlarms", request):
                if message.HasField("heartbeat"):
                    if heartbeats:
                        beat = as_dict(message.heartbeat)
                        emit_line(s.output, {"heartbeat": beat}, f"heartbeat {beat}")
                    continue
                item = as_dict(message.notification)
                emit_line(s.output, item, _text(item))
                seen += 1
                if count and seen >= count:
                    return

        if seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(follow(), seconds)
        else:
            await follow()

    run(ctx, work)
