"""The `vim.v1.Alarms` service: IFA005 alarm queries, acknowledgement and subscriptions.

Queries read the read model (alarms are folded by `vim.domain.alarm.evolve`).
Subscriptions read the log by position, never the read model: each alarm event
after the cursor becomes one notification whose alarm is the alarm *as of that
event* (folded from its stream), so a subscriber resuming anywhere sees the same
notifications as one that never stopped.

Invariants:

- At least once, in log order: a subscription delivers every matching alarm
  change after its cursor; resuming from the cursor of the last message received
  (notification or heartbeat) misses nothing. `notification_id` is the stored
  event's id: unique, and identical on every resend, so duplicates are dropped
  by it. `cursor` is the event's log position (opaque to clients).
- Heartbeats: the first message of a stream is a heartbeat (the subscription is
  established), then one at least every interval, with a cursor covering every
  event examined so far (also events the filters dropped).
- Tenancy: admins see every alarm; other callers see only server alarms of their
  own tenant, in lists, gets (others are NOT_FOUND) and streams. Host alarms and
  the host health stream are admin-only; acknowledging a server alarm needs
  member or admin in its tenant, a host alarm needs admin.
- A notification is never ahead of the node's queries: it is sent once this
  node's read model has applied its event (bounded wait), so a `GetAlarmList` or
  `GetAlarm` on the same node after a notification shows that change.
- Bad input (cursor, enums, intervals, ids, pages) is INVALID_ARGUMENT with field
  violations; when the node drains, open streams end UNAVAILABLE with the cursor
  to resume from.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message

from vim._gen.vim.v1 import alarms_pb2 as pb
from vim._gen.vim.v1 import alarms_pb2_grpc
from vim.api import validation as v
from vim.api.auth import ADMIN, READ, WRITE
from vim.api.errors import abort_for, refuse, rpc
from vim.api.node import Ctx, Node, view_to
from vim.app.commands import Change, Decision, Principal
from vim.domain import alarm as al
from vim.domain import server as srv
from vim.domain.base import parse
from vim.errors import FieldViolation, NotFound, PermissionDenied, Unavailable, VimError
from vim.eventlog.model import RecordedEvent
from vim.eventlog.store import EventLog, Subscription
from vim.projections.readmodel import ReadModel, register_kind

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Alarms"].full_name
register_kind(al.KIND, al.evolve)
register_kind(srv.KIND, srv.evolve)

HEARTBEAT_ENV = "VIM_ALARM_HEARTBEAT_S"
DEFAULT_HEARTBEAT_S = 5.0
MIN_HEARTBEAT_MS = 100
MAX_HEARTBEAT_MS = 60_000
MAX_POSITION = 2**63 - 1
MAX_HOSTNAMES = 100
MAX_SEVERITIES = 16
CURSOR_RE = re.compile(r"^[0-9]{1,19}$")
QUEUE = 256
READ_MODEL_WAIT_S = 2.0
"""How long a notification waits for this node's read model to apply its event."""
FOLD_CACHE = 10_000

HOST_TYPES: frozenset[str] = frozenset(
    {
        "HostRegistered",
        "HostStateChanged",
        "HostHealthChanged",
        "HostMaintenanceEnabled",
        "HostMaintenanceDisabled",
        "HostFailureDetected",
        "HostFenceConfirmed",
        "HostFenceFailed",
        "HostRecovered",
        "HostSelfFenced",
        "HostServiceFailed",
        "HostServiceRecovered",
    }
)
CHANGES = {
    "AlarmRaised": pb.ALARM_CHANGE_RAISED,
    "AlarmUpdated": pb.ALARM_CHANGE_UPDATED,
    "AlarmCorrelated": pb.ALARM_CHANGE_CORRELATED,
    "AlarmCleared": pb.ALARM_CHANGE_CLEARED,
    "AlarmAcknowledged": pb.ALARM_CHANGE_ACKNOWLEDGED,
    "AlarmArchived": pb.ALARM_CHANGE_ARCHIVED,
    "AlarmPurged": pb.ALARM_CHANGE_PURGED,
}

M = TypeVar("M", bound=Message)


def default_heartbeat_s() -> float:
    """The node's heartbeat interval: VIM_ALARM_HEARTBEAT_S, else 5 s."""
    try:
        return max(float(os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)), 0.1)
    except ValueError:
        return DEFAULT_HEARTBEAT_S


# --- filters -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """A validated AlarmFilter; empty fields match everything."""

    resource_type: str = ""
    managed_object_id: str = ""
    severities: frozenset[str] = frozenset()
    state: str = ""
    ack_state: str = ""
    tenant_id: str = ""

    def matches(self, a: al.Alarm) -> bool:
        return (
            (not self.resource_type or a.resource_type.value == self.resource_type)
            and (not self.managed_object_id or a.managed_object_id == self.managed_object_id)
            and (not self.severities or a.perceived_severity.value in self.severities)
            and (not self.state or a.state.value == self.state)
            and (not self.ack_state or a.ack_state.value == self.ack_state)
            and (not self.tenant_id or a.tenant_id == self.tenant_id)
        )


def _enum_name(field: str, enum: Any, value: int, prefix: str, out: list[FieldViolation]) -> str:
    """The domain spelling of a proto enum value ("" for UNSPECIFIED), or a violation."""
    if value == 0:
        return ""
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        out.append(FieldViolation(field, f"unknown value {value}"))
        return ""


def parse_filter(f: pb.AlarmFilter, principal: Principal, out: list[FieldViolation]) -> Filter:
    if len(f.severities) > MAX_SEVERITIES:
        out.append(FieldViolation("filter.severities", f"at most {MAX_SEVERITIES} values"))
    sevs = [
        _enum_name(f"filter.severities[{i}]", pb.Severity, s, "SEVERITY_", out)
        for i, s in enumerate(f.severities)
    ]
    if len(f.managed_object_id) > v.NAME_MAX:
        out.append(FieldViolation("filter.managed_object_id", f"at most {v.NAME_MAX} characters"))
    if f.tenant_id and f.tenant_id != principal.tenant and not principal.is_admin:
        out.append(FieldViolation("filter.tenant_id", "only admins may name another tenant"))
    return Filter(
        resource_type=_enum_name(
            "filter.resource_type", pb.ResourceType, f.resource_type, "RESOURCE_TYPE_", out
        ),
        managed_object_id=f.managed_object_id,
        severities=frozenset(s for s in sevs if s),
        state=_enum_name("filter.state", pb.AlarmState, f.state, "ALARM_STATE_", out),
        ack_state=_enum_name("filter.ack_state", pb.AckState, f.ack_state, "ACK_STATE_", out),
        tenant_id=f.tenant_id,
    )


def visible(principal: Principal, a: al.Alarm) -> bool:
    """Admins see every alarm; others only their own tenant's server alarms."""
    if principal.is_admin:
        return True
    return a.resource_type is al.ResourceType.SERVER and a.tenant_id == principal.tenant


def parse_cursor(field: str, cursor: str, out: list[FieldViolation]) -> int:
    if not cursor:
        return 0
    if not CURSOR_RE.match(cursor) or int(cursor) > MAX_POSITION:
        out.append(FieldViolation(field, "not a cursor this API gave out"))
        return 0
    return int(cursor)


def parse_interval(field: str, ms: int, out: list[FieldViolation]) -> float:
    if ms == 0:
        return default_heartbeat_s()
    v.in_range(field, ms, MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS, out)
    return ms / 1000.0


def to_alarm(a: al.Alarm) -> pb.Alarm:
    msg = pb.Alarm()
    view_to(msg, a.view())
    return msg


def find(model: ReadModel, principal: Principal, alarm_id: str) -> al.Alarm:
    """A live alarm the caller may see, or NotFound."""
    entry = model.get(al.stream(alarm_id))
    if (
        entry is None
        or not isinstance(entry.state, al.Alarm)
        or not visible(principal, entry.state)
    ):
        raise NotFound(f"alarm {alarm_id} not found")
    state: al.Alarm = entry.state
    return state


# --- the servicer ------------------------------------------------------------------------


class AlarmsServicer(alarms_pb2_grpc.AlarmsServicer):
    """Serves alarms from one node; `drain()` ends every open stream when the node stops."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._log: EventLog = node.log
        self._subs: set[Subscription] = set()
        self._draining = False

    @rpc
    async def GetAlarmList(
        self, request: pb.GetAlarmListRequest, context: Ctx
    ) -> pb.GetAlarmListResponse:
        principal = await self._node.caller(context, READ, "GetAlarmList")
        bad: list[FieldViolation] = []
        flt = parse_filter(request.filter, principal, bad)
        offset, size = v.page("page", request.page, bad)
        refuse(bad)
        items = [
            e.state
            for _, e in self._node.model.of_kind(al.KIND)
            if isinstance(e.state, al.Alarm)
            and (request.include_history or not e.state.archived)
            and visible(principal, e.state)
            and flt.matches(e.state)
        ]
        items.sort(key=lambda a: (a.raised_at, a.alarm_id), reverse=True)
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.GetAlarmListResponse(alarms=[to_alarm(a) for a in chunk], page=page)

    @rpc
    async def GetAlarm(self, request: pb.GetAlarmRequest, context: Ctx) -> pb.Alarm:
        principal = await self._node.caller(context, READ, "GetAlarm")
        bad: list[FieldViolation] = []
        v.resource_id("alarm_id", request.alarm_id, bad)
        refuse(bad)
        found = find(self._node.model, principal, request.alarm_id)
        self._node.answered(context)
        return to_alarm(found)

    @rpc
    async def Acknowledge(self, request: pb.AcknowledgeRequest, context: Ctx) -> pb.Alarm:
        principal = await self._node.caller(context, WRITE, "Acknowledge")
        bad: list[FieldViolation] = []
        v.resource_id("alarm_id", request.alarm_id, bad)
        refuse(bad)
        ctx = self._node.command(principal, request, "Acknowledge", context)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            alarm = find(model, principal, request.alarm_id)
            if alarm.resource_type is al.ResourceType.HOST and not principal.is_admin:
                raise PermissionDenied("acknowledging a host alarm needs the admin role")
            sid = al.stream(request.alarm_id)
            events = al.acknowledge(alarm, request.alarm_id, principal.user, at)
            after = alarm
            for e in events:
                folded = al.evolve(after, e)
                assert isinstance(folded, al.Alarm)
                after = folded
            changes = [Change(sid, model.version(sid), events)] if events else []
            return Decision(changes, after.view())

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        msg = pb.Alarm()
        view_to(msg, dict(out.response))
        return msg

    async def SubscribeAlarms(
        self, request: pb.SubscribeAlarmsRequest, context: Ctx
    ) -> AsyncIterator[pb.AlarmStreamMessage]:
        """Alarm notifications after the cursor, with heartbeats; see the module docstring."""
        try:
            principal = await self._node.caller(context, READ, "SubscribeAlarms")
            bad: list[FieldViolation] = []
            flt = parse_filter(request.filter, principal, bad)
            after = parse_cursor("cursor", request.cursor, bad)
            interval = parse_interval("heartbeat_interval_ms", request.heartbeat_interval_ms, bad)
            refuse(bad)
            await self._check_cursor(after)
            folder = _Folder(self._log)

            async def convert(e: RecordedEvent) -> pb.AlarmStreamMessage | None:
                note = await folder.notification(e)
                if note is None or not visible(principal, note[0]) or not flt.matches(note[0]):
                    return None
                return pb.AlarmStreamMessage(notification=note[1])

            def beat(cursor: int) -> pb.AlarmStreamMessage:
                return pb.AlarmStreamMessage(heartbeat=_heartbeat(cursor))

            sub = self._log.subscribe(after=after, kinds=[al.KIND])
            async for msg in self._follow(sub, after, interval, convert, beat, context):
                yield msg
        except VimError as exc:
            await abort_for(context, exc)

    async def WatchHostHealth(
        self, request: pb.WatchHostHealthRequest, context: Ctx
    ) -> AsyncIterator[pb.HostHealthStreamMessage]:
        """Host state, health and failure facts after the cursor, with heartbeats (admin)."""
        try:
            await self._node.caller(context, ADMIN, "WatchHostHealth")
            bad: list[FieldViolation] = []
            after = parse_cursor("cursor", request.cursor, bad)
            interval = parse_interval("heartbeat_interval_ms", request.heartbeat_interval_ms, bad)
            if len(request.hostnames) > MAX_HOSTNAMES:
                bad.append(FieldViolation("hostnames", f"at most {MAX_HOSTNAMES} hostnames"))
            for i, name in enumerate(request.hostnames):
                v.name(f"hostnames[{i}]", name, bad)
            refuse(bad)
            await self._check_cursor(after)
            wanted = frozenset(request.hostnames)

            async def convert(e: RecordedEvent) -> pb.HostHealthStreamMessage | None:
                change = _host_change(e)
                if wanted and change.hostname not in wanted:
                    return None
                return pb.HostHealthStreamMessage(change=change)

            def beat(cursor: int) -> pb.HostHealthStreamMessage:
                return pb.HostHealthStreamMessage(heartbeat=_heartbeat(cursor))

            sub = self._log.subscribe(after=after, types=sorted(HOST_TYPES))
            async for msg in self._follow(sub, after, interval, convert, beat, context):
                yield msg
        except VimError as exc:
            await abort_for(context, exc)

    async def drain(self) -> None:
        """End every open stream with UNAVAILABLE, and refuse to follow new ones."""
        self._draining = True
        for sub in list(self._subs):
            await sub.close()

    async def _check_cursor(self, after: int) -> None:
        head = await self._log.head()  # also fails fast (UNAVAILABLE) when the log is down
        if after > head:
            refuse([FieldViolation("cursor", f"cursor {after} is ahead of the log ({head})")])

    async def _follow(
        self,
        sub: Subscription,
        after: int,
        interval: float,
        convert: Callable[[RecordedEvent], Awaitable[M | None]],
        beat: Callable[[int], M],
        context: Ctx,
    ) -> AsyncIterator[M]:
        """Converted events from `sub`, a heartbeat first and then every `interval`."""
        self._subs.add(sub)
        queue: asyncio.Queue[RecordedEvent | None] = asyncio.Queue(QUEUE)
        failure: list[BaseException] = []

        async def pump() -> None:
            try:
                async for e in sub:
                    await queue.put(e)
            except VimError as exc:
                failure.append(exc)
            await queue.put(None)

        task = asyncio.create_task(pump(), name="alarm-stream")
        loop = asyncio.get_running_loop()
        cursor = after
        try:
            await context.send_initial_metadata(())
            if self._draining:
                await sub.close()
            yield beat(cursor)
            next_beat = loop.time() + interval
            while True:
                try:
                    async with asyncio.timeout(max(next_beat - loop.time(), 0)):
                        item = await queue.get()
                except TimeoutError:
                    yield beat(cursor)
                    next_beat = loop.time() + interval
                    continue
                if item is None:
                    break
                msg = await convert(item)
                cursor = item.position
                if msg is not None:
                    # Queries here read the read model: never notify ahead of it.
                    with contextlib.suppress(Unavailable):
                        await self._node.model.wait_for(item.position, READ_MODEL_WAIT_S)
                    yield msg
                if loop.time() >= next_beat:
                    yield beat(cursor)
                    next_beat = loop.time() + interval
        finally:
            self._subs.discard(sub)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await sub.close()
        if failure:
            raise failure[0]
        raise Unavailable(
            f"this API node is shutting down; subscribe again from cursor {cursor} on another node"
        )


def _heartbeat(cursor: int) -> pb.Heartbeat:
    return pb.Heartbeat(cursor=str(cursor), sent_at=v.now())


class _Folder:
    """Alarm states as of each event of a subscription (folded from their streams)."""

    def __init__(self, log: EventLog) -> None:
        self._log = log
        self._states: dict[str, tuple[int, al.Alarm, bool]] = {}

    async def notification(self, e: RecordedEvent) -> tuple[al.Alarm, pb.AlarmNotification] | None:
        """The alarm after `e` (its last live form for a purge) and its notification."""
        change = CHANGES.get(e.type)
        if change is None:
            return None
        known = self._states.get(e.stream_id)
        if known is None or known[0] != e.version - 1:
            known = await self._fold(e.stream_id, e.version - 1)
        state: al.AlarmEntry | None = None if known is None else known[1]
        if known is not None and known[2]:
            state = al.PurgedAlarm(known[1].alarm_id, "")
        event = parse(e.type, e.data)
        if event is None:
            return None
        after = al.evolve(state, event)
        last = after if isinstance(after, al.Alarm) else (known[1] if known else None)
        if last is None:
            return None
        self._remember(e.stream_id, (e.version, last, isinstance(after, al.PurgedAlarm)))
        note = pb.AlarmNotification(
            notification_id=e.event_id,
            cursor=str(e.position),
            change=change,
            alarm=to_alarm(last),
            recorded_at=e.recorded_at.isoformat(),
        )
        return last, note

    async def _fold(self, stream_id: str, upto: int) -> tuple[int, al.Alarm, bool] | None:
        if upto <= 0:
            return None
        state: al.AlarmEntry | None = None
        last: al.Alarm | None = None
        for rec in await self._log.read_stream(stream_id, limit=upto):
            event = parse(rec.type, rec.data)
            if event is not None:
                state = al.evolve(state, event)
                if isinstance(state, al.Alarm):
                    last = state
        if last is None:
            return None
        return upto, last, isinstance(state, al.PurgedAlarm)

    def _remember(self, stream_id: str, value: tuple[int, al.Alarm, bool]) -> None:
        self._states.pop(stream_id, None)
        self._states[stream_id] = value
        if len(self._states) > FOLD_CACHE:
            self._states.pop(next(iter(self._states)))


def _host_change(e: RecordedEvent) -> pb.HostHealthChange:
    d = e.data
    reasons: Sequence[str] = d.get("reasons") or []
    detail = d.get("detail") or d.get("reason") or d.get("service") or ""
    if e.type in ("HostServiceFailed", "HostServiceRecovered"):
        detail = f"{d.get('service', '')}: {d.get('detail', '')}".rstrip(": ")
    return pb.HostHealthChange(
        notification_id=e.event_id,
        cursor=str(e.position),
        hostname=str(d.get("hostname", "")),
        event_type=e.type,
        state=str(d.get("state", "")) if e.type == "HostStateChanged" else "",
        health=str(d.get("health", "")),
        reasons=[str(r) for r in reasons],
        failure_kind=str(d.get("kind", "")) if e.type == "HostFailureDetected" else "",
        detail=str(detail),
        event_time=str(d.get("at") or d.get("fenced_at") or ""),
        recorded_at=e.recorded_at.isoformat(),
    )
