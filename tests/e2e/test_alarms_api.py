"""The Alarms service over real gRPC, on a real PostgreSQL event log, with the real reactor.

A `vim-api` process serves the log; the alarm reactor runs in the test process
(standing in for the elected fault manager, with a term of role `faultd`), and
fault facts are appended to the log directly (standing in for the agent and the
fault manager). Checked: lists and filters, tenancy, acknowledgement rules and
idempotency, correlation, subscriptions (filters, cursor, heartbeats, bad
input), the host health stream, ageing with a fake clock (and a rebuild of the
read model giving the same digest), that a second leader makes no duplicate
alarms while the first one is fenced out, that a reactor whose term ended stops
acting, and that a draining node ends streams UNAVAILABLE with the resume cursor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ha.election.base import Leadership
from vim._gen.vim.v1 import admin_pb2, admin_pb2_grpc, alarms_pb2_grpc
from vim._gen.vim.v1 import alarms_pb2 as pb
from vim.alarms import AgeingPolicy, AlarmReactor, ReactorConfig
from vim.alarms.rules import FACT_TYPES
from vim.api.alarms import CHANGES as CHANGE_TYPES
from vim.api.alarms import HEARTBEAT_ENV
from vim.api.auth import Authenticator
from vim.domain import alarm as al
from vim.domain import host, server
from vim.domain.base import DomainEvent
from vim.domain.faults import (
    HostFailureDetected,
    HostRecovered,
    HostServiceFailed,
    HostServiceRecovered,
    ServerCrashed,
    ServerRecoveryFailed,
)
from vim.errors import FencedOut
from vim.eventlog.model import ANY_VERSION, AppendRequest, Metadata, NewEvent, StreamAppend
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import EventLog
from vim.harness.apinode import ApiNodeProcess
from vim.projections.readmodel import Projector

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SECRET = b"alarms-test-secret-of-at-least-32-bytes!"
AUTH = Authenticator(SECRET)
ADMIN = AUTH.mint("ops", "ops", ["admin"])
ACME = AUTH.mint("alice", "acme", ["member"])
ACME_READER = AUTH.mint("rita", "acme", ["reader"])
OTHER = AUTH.mint("bob", "other", ["member"])
AT = "2026-11-22T08:00:00.000Z"
S1 = "00000000-0000-4000-8000-000000000001"
S2 = "00000000-0000-4000-8000-000000000002"
DEADLINE_S = 15.0
NO_HOST = "no valid host: 2 hosts rejected by RamFilter"


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def term(token: int = 1) -> Leadership:
    return Leadership("faultd", "test", token, datetime.now(UTC), token, 10.0, "local")


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def put(log: EventLog, stream_id: str, *events: DomainEvent) -> int:
    """Append facts as the agent / fault manager would (no fencing needed for the test)."""
    result = await log.append(
        AppendRequest(
            [
                StreamAppend(
                    stream_id,
                    ANY_VERSION,
                    [NewEvent(e.type, e.to_data(), e.SCHEMA_VERSION) for e in events],
                )
            ],
            Metadata(actor="test"),
        )
    )
    return result.last_position


def allocated(server_id: str, tenant: str) -> server.ServerAllocated:
    flavor = server.FlavorCopy("f-1", "m1", 1, 512, 1)
    return server.allocate(server_id, tenant, server_id[-4:], flavor, "img", [], now=AT)


def registered(name: str) -> host.HostRegistered:
    spec = host.HostSpec("az-1", 8, 8192, 100, 1.0, 1.0, 1.0, "qemu", "10.0.0.1")
    (event,) = host.register(None, name, spec, AT)
    assert isinstance(event, host.HostRegistered)
    return event


@dataclass
class Rig:
    api: ApiNodeProcess
    stub: alarms_pb2_grpc.AlarmsStub
    admin: admin_pb2_grpc.AdminStub
    clock: FakeClock
    log: SqlEventLog
    projector: Projector
    reactor: AlarmReactor

    def md(self, token: str) -> tuple[tuple[str, str], ...]:
        """The caller's token, and read-your-writes: the node waits for the reactor's writes."""
        return (*md(token), ("x-vim-min-position", str(self.projector.model.position)))

    async def facts(self, *items: tuple[str, DomainEvent]) -> None:
        """Append facts, then let the reactor decide every one of them."""
        for sid, e in items:
            await put(self.log, sid, e)
        await self.reactor.catch_up()

    async def alarms(self, token: str = ADMIN, **kw: object) -> list[pb.Alarm]:
        request = pb.GetAlarmListRequest(**kw)  # type: ignore[arg-type]
        reply = await self.stub.GetAlarmList(request, metadata=self.md(token))
        return list(reply.alarms)


async def stop_projector(projector: Projector) -> None:
    """Stop a projector; cancel again if a cancellation was swallowed (see docs/ALARMS.md)."""
    task = projector._task
    for _ in range(50):
        if task is None or task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    projector._task = None


@pytest.fixture
async def rig(pg_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    api = ApiNodeProcess("api", tmp_path, pg_url, secret, env={HEARTBEAT_ENV: "5"})
    log = await SqlEventLog.open(pg_url)
    projector = Projector(log)
    try:
        api.start()
        await projector.catch_up()
        projector.start()
        clock = FakeClock()
        config = ReactorConfig(policy=AgeingPolicy(60.0, 600.0), ageing_interval_s=3600.0)
        reactor = AlarmReactor(log, projector.model, term, config=config, clock=clock)
        async with grpc.aio.insecure_channel(api.address) as ch:
            stubs = alarms_pb2_grpc.AlarmsStub(ch), admin_pb2_grpc.AdminStub(ch)
            rig = Rig(api, *stubs, clock, log, projector, reactor)
            await put(log, server.stream(S1), allocated(S1, "acme"))
            await put(log, server.stream(S2), allocated(S2, "other"))
            for name in ("cmp-1", "cmp-2", "cmp-3"):
                await put(log, host.stream(name), registered(name))
            yield rig
    finally:
        api.kill()
        await stop_projector(projector)
        await log.close()


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def failure(call: Callable[[], object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:  # type: ignore[attr-defined]
                pass
        else:
            await result  # type: ignore[misc]
    return err.value


FAILURE = (host.stream("cmp-1"), HostFailureDetected("cmp-1", "HARDWARE", "BMC silent", AT, AT))
SERVICE = (host.stream("cmp-2"), HostServiceFailed("cmp-2", "libvirtd", "exited 9", AT))
LOST = (server.stream(S1), ServerRecoveryFailed(S1, "cmp-1", NO_HOST, AT))
CRASH2 = (server.stream(S2), ServerCrashed(S2, "cmp-3", "killed", AT))


async def test_list_filters_tenancy_and_correlation(rig: Rig) -> None:
    await rig.facts(FAILURE, SERVICE, LOST, CRASH2)
    every = await rig.alarms()
    assert sorted(a.fault_type for a in every) == [
        "HOST_HARDWARE_FAILURE",
        "HOST_SERVICE_FAILURE",
        "VM_CRASH",
        "VM_RECOVERY_FAILURE",
    ]
    servers = await rig.alarms(filter=pb.AlarmFilter(resource_type=pb.RESOURCE_TYPE_SERVER))
    assert {a.managed_object_id for a in servers} == {S1, S2}
    major = await rig.alarms(filter=pb.AlarmFilter(severities=[pb.SEVERITY_MAJOR]))
    assert [a.fault_type for a in major] == ["HOST_SERVICE_FAILURE"]
    on_host = await rig.alarms(filter=pb.AlarmFilter(managed_object_id="cmp-1"))
    assert [a.fault_type for a in on_host] == ["HOST_HARDWARE_FAILURE"]
    (root,) = on_host
    # A member sees only their tenant's server alarms: the one correlated to the host.
    (mine,) = await rig.alarms(ACME)
    assert mine.managed_object_id == S1 and mine.tenant_id == "acme"
    assert not mine.is_root_cause and list(mine.correlated_alarm_ids) == [root.alarm_id]
    assert mine.root_cause_faulty_resource.resource_id == "cmp-1"
    assert mine.probable_cause == "RESOURCE_AT_OR_NEARING_CAPACITY"
    assert list(root.correlated_alarm_ids) == [mine.alarm_id] and root.is_root_cause
    assert mine.state == pb.ALARM_STATE_FIRED and mine.ack_state == pb.ACK_STATE_UNACKNOWLEDGED
    assert mine.alarm_raised_time and mine.event_time == AT and mine.hostname == "cmp-1"
    got = await rig.stub.GetAlarm(pb.GetAlarmRequest(alarm_id=mine.alarm_id), metadata=rig.md(ACME))
    assert got == mine
    err = await failure(
        lambda: rig.stub.GetAlarm(
            pb.GetAlarmRequest(alarm_id=mine.alarm_id), metadata=rig.md(OTHER)
        )
    )
    assert err.code() is grpc.StatusCode.NOT_FOUND
    err = await failure(
        lambda: rig.stub.GetAlarmList(
            pb.GetAlarmListRequest(filter=pb.AlarmFilter(tenant_id="other", severities=[42])),
            metadata=rig.md(ACME),
        )
    )
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err)) == {"filter.tenant_id", "filter.severities[0]"}
    # Paging walks every alarm once.
    seen, token = [], ""
    while True:
        reply = await rig.stub.GetAlarmList(
            pb.GetAlarmListRequest(page={"page_size": 3, "page_token": token}),
            metadata=rig.md(ADMIN),
        )
        seen += [a.alarm_id for a in reply.alarms]
        token = reply.page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(a.alarm_id for a in every)


async def test_recovery_clears_and_a_repeat_raises_a_new_alarm(rig: Rig) -> None:
    await rig.facts(SERVICE)
    (first,) = await rig.alarms()
    await rig.facts(SERVICE)
    (again,) = await rig.alarms()
    assert again.alarm_id == first.alarm_id and again.state == pb.ALARM_STATE_UPDATED
    await rig.facts((host.stream("cmp-2"), HostServiceRecovered("cmp-2", "libvirtd", 1, AT)))
    (cleared,) = await rig.alarms()
    assert cleared.state == pb.ALARM_STATE_CLEARED and cleared.alarm_cleared_time
    assert cleared.perceived_severity == pb.SEVERITY_CLEARED
    await rig.facts(SERVICE)
    active = await rig.alarms(filter=pb.AlarmFilter(state=pb.ALARM_STATE_FIRED))
    assert len(active) == 1 and active[0].alarm_id != first.alarm_id


async def test_acknowledge_rules_and_idempotency(rig: Rig) -> None:
    await rig.facts(FAILURE, LOST)
    (mine,) = await rig.alarms(ACME)
    (root,) = await rig.alarms(filter=pb.AlarmFilter(resource_type=pb.RESOURCE_TYPE_HOST))

    def ack(alarm_id: str, token: str, rid: str = "ack-1") -> object:
        return rig.stub.Acknowledge(
            pb.AcknowledgeRequest(request_id=rid, alarm_id=alarm_id), metadata=rig.md(token)
        )

    done = await ack(mine.alarm_id, ACME)  # type: ignore[misc]
    assert done.ack_state == pb.ACK_STATE_ACKNOWLEDGED and done.alarm_acknowledged_time
    assert await ack(mine.alarm_id, ACME) == done  # the same request id: the same answer
    assert (await ack(mine.alarm_id, ACME, "ack-2")).ack_state == pb.ACK_STATE_ACKNOWLEDGED  # type: ignore[misc,attr-defined]
    events = await rig.log.read_stream(al.stream(mine.alarm_id))
    assert [e.type for e in events].count("AlarmAcknowledged") == 1  # twice is a no-op
    assert (await failure(lambda: ack(mine.alarm_id, ACME_READER))).code() is (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert (await failure(lambda: ack(mine.alarm_id, OTHER))).code() is grpc.StatusCode.NOT_FOUND
    # Host alarms: admins only (a member does not even see them).
    assert (await failure(lambda: ack(root.alarm_id, ACME, "ack-3"))).code() is (
        grpc.StatusCode.NOT_FOUND
    )
    assert (await ack(root.alarm_id, ADMIN, "ack-4")).ack_state == pb.ACK_STATE_ACKNOWLEDGED  # type: ignore[misc,attr-defined]
    unknown = "00000000-0000-4000-8000-0000000000ff"
    assert (await failure(lambda: ack(unknown, ADMIN, "ack-5"))).code() is (
        grpc.StatusCode.NOT_FOUND
    )
    err = await failure(lambda: ack("not-an-id", ADMIN, "ack-6"))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and violations(err) == ["alarm_id"]
    acked = await rig.alarms(filter=pb.AlarmFilter(ack_state=pb.ACK_STATE_ACKNOWLEDGED))
    assert {a.alarm_id for a in acked} == {mine.alarm_id, root.alarm_id}


async def read_until(
    stream: AsyncIterator[pb.AlarmStreamMessage],
    done: Callable[[list[pb.AlarmStreamMessage]], bool],
) -> list[pb.AlarmStreamMessage]:
    got: list[pb.AlarmStreamMessage] = []
    async with asyncio.timeout(DEADLINE_S):
        async for msg in stream:
            got.append(msg)
            if done(got):
                return got
    raise AssertionError(f"stream ended early after {got}")


def notes(msgs: list[pb.AlarmStreamMessage]) -> list[pb.AlarmNotification]:
    return [m.notification for m in msgs if m.HasField("notification")]


async def test_subscription_filters_resumes_and_beats(rig: Rig) -> None:
    await rig.facts(FAILURE, SERVICE, LOST, CRASH2)
    call = rig.stub.SubscribeAlarms(pb.SubscribeAlarmsRequest(), metadata=rig.md(ACME))
    msgs = await read_until(call, lambda g: len(notes(g)) == 1)
    call.cancel()
    assert msgs[0].HasField("heartbeat")  # the first message says the stream is up
    (raised,) = notes(msgs)
    assert raised.change == pb.ALARM_CHANGE_RAISED and raised.alarm.managed_object_id == S1
    # More changes: acknowledge, then the server runs again elsewhere (clear).
    await rig.stub.Acknowledge(
        pb.AcknowledgeRequest(request_id="a", alarm_id=raised.alarm.alarm_id), metadata=rig.md(ACME)
    )
    report = server.ServerStateReported(S1, "cmp-4", "ACTIVE", "RUNNING", reported_at=AT)
    await rig.facts((server.stream(S1), report))
    resumed = rig.stub.SubscribeAlarms(
        pb.SubscribeAlarmsRequest(cursor=raised.cursor, heartbeat_interval_ms=200),
        metadata=rig.md(ACME),
    )
    msgs = await read_until(resumed, lambda g: len(notes(g)) == 2)
    resumed.cancel()
    later = notes(msgs)
    assert [n.change for n in later] == [pb.ALARM_CHANGE_ACKNOWLEDGED, pb.ALARM_CHANGE_CLEARED]
    assert later[1].alarm.state == pb.ALARM_STATE_CLEARED
    assert later[1].alarm.ack_state == pb.ACK_STATE_ACKNOWLEDGED  # the alarm as of the change
    assert int(raised.cursor) < int(later[0].cursor) < int(later[1].cursor)
    # Admin with a severity filter: only the MAJOR service alarm's notifications.
    admin = rig.stub.SubscribeAlarms(
        pb.SubscribeAlarmsRequest(
            filter=pb.AlarmFilter(severities=[pb.SEVERITY_MAJOR]), heartbeat_interval_ms=200
        ),
        metadata=rig.md(ADMIN),
    )
    target = int(later[1].cursor)

    def beats(g: list[pb.AlarmStreamMessage]) -> list[pb.Heartbeat]:
        return [m.heartbeat for m in g if m.HasField("heartbeat")]

    # Heartbeats keep coming on the idle stream, with a cursor covering every event
    # examined (also those the filter dropped, like the last clear of S1's alarm).
    msgs = await read_until(admin, lambda g: sum(int(b.cursor) >= target for b in beats(g)) >= 2)
    admin.cancel()
    assert [n.alarm.fault_type for n in notes(msgs)] == ["HOST_SERVICE_FAILURE"]
    assert all(b.sent_at for b in beats(msgs)) and len(beats(msgs)) >= 3


async def test_bad_subscription_input_is_invalid_argument(rig: Rig) -> None:
    head = await rig.log.head()
    cases = [
        (pb.SubscribeAlarmsRequest(cursor="abc"), ["cursor"]),
        (pb.SubscribeAlarmsRequest(cursor=str(head + 1000)), ["cursor"]),
        (pb.SubscribeAlarmsRequest(heartbeat_interval_ms=5), ["heartbeat_interval_ms"]),
        (
            pb.SubscribeAlarmsRequest(filter=pb.AlarmFilter(state=9, resource_type=7)),  # type: ignore[arg-type]
            ["filter.resource_type", "filter.state"],
        ),
    ]
    for request, fields in cases:
        err = await failure(lambda r=request: rig.stub.SubscribeAlarms(r, metadata=rig.md(ADMIN)))  # type: ignore[misc]
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT, request
        assert sorted(violations(err)) == fields
    err = await failure(
        lambda: rig.stub.WatchHostHealth(
            pb.WatchHostHealthRequest(hostnames=[""], heartbeat_interval_ms=10**6),
            metadata=rig.md(ADMIN),
        )
    )
    assert sorted(violations(err)) == ["heartbeat_interval_ms", "hostnames[0]"]


async def test_host_health_stream_for_mano(rig: Rig) -> None:
    changed = host.HostStateChanged("cmp-1", "FAILED", "UP", "lease lost", AT)
    health = host.HostHealthChanged("cmp-2", "DEGRADED", ["libvirtd down"], AT)
    await rig.facts(FAILURE, (host.stream("cmp-1"), changed), (host.stream("cmp-2"), health))
    await rig.facts((host.stream("cmp-1"), HostRecovered("cmp-1", AT)))
    call = rig.stub.WatchHostHealth(
        pb.WatchHostHealthRequest(hostnames=["cmp-1"], heartbeat_interval_ms=200),
        metadata=rig.md(ADMIN),
    )
    got: list[pb.HostHealthChange] = []
    async with asyncio.timeout(DEADLINE_S):
        async for msg in call:
            if msg.HasField("change"):
                got.append(msg.change)
            if len(got) == 4:
                break
    call.cancel()
    assert [c.event_type for c in got] == [
        "HostRegistered",
        "HostFailureDetected",
        "HostStateChanged",
        "HostRecovered",
    ]
    assert got[1].failure_kind == "HARDWARE" and got[2].state == "FAILED"
    assert len({c.notification_id for c in got}) == 4
    err = await failure(
        lambda: rig.stub.WatchHostHealth(pb.WatchHostHealthRequest(), metadata=rig.md(ACME))
    )
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_ageing_policy_archives_then_purges_and_rebuild_is_identical(rig: Rig) -> None:
    await rig.facts(SERVICE, FAILURE)
    await rig.facts((host.stream("cmp-2"), HostServiceRecovered("cmp-2", "libvirtd", 1, AT)))
    (cleared,) = await rig.alarms(filter=pb.AlarmFilter(state=pb.ALARM_STATE_CLEARED))
    rig.clock.now += timedelta(seconds=59)
    assert await rig.reactor.age() == 0
    assert len(await rig.alarms()) == 2
    rig.clock.now += timedelta(seconds=2)  # past the cleared-alarm retention (60 s)
    assert await rig.reactor.age() == 1
    assert await rig.reactor.age() == 0  # nothing more is due
    current = await rig.alarms()
    assert [a.fault_type for a in current] == ["HOST_HARDWARE_FAILURE"]  # active stays
    history = await rig.alarms(include_history=True)
    assert {a.alarm_id for a in history} == {cleared.alarm_id, current[0].alarm_id}
    got = await rig.stub.GetAlarm(
        pb.GetAlarmRequest(alarm_id=cleared.alarm_id), metadata=rig.md(ADMIN)
    )
    assert got.archived
    rig.clock.now += timedelta(seconds=600)  # past the history retention (600 s)
    assert await rig.reactor.age() == 1
    assert [a.alarm_id for a in await rig.alarms(include_history=True)] == [current[0].alarm_id]
    err = await failure(
        lambda: rig.stub.GetAlarm(
            pb.GetAlarmRequest(alarm_id=cleared.alarm_id), metadata=rig.md(ADMIN)
        )
    )
    assert err.code() is grpc.StatusCode.NOT_FOUND
    rig.clock.now += timedelta(days=365)
    assert await rig.reactor.age() == 0  # the active alarm never ages
    rebuilt = await rig.admin.RebuildReadModel(
        admin_pb2.RebuildReadModelRequest(), metadata=rig.md(ADMIN)
    )
    assert rebuilt.identical and rebuilt.digest_before == rebuilt.digest_after
    assert [a.alarm_id for a in await rig.alarms(include_history=True)] == [current[0].alarm_id]


async def test_a_new_leader_resumes_without_duplicates_and_the_old_one_is_fenced(
    rig: Rig,
) -> None:
    model = rig.projector.model
    await rig.facts(FAILURE, SERVICE)
    # The old leader handled those; the new term starts from the derived checkpoint.
    second = AlarmReactor(rig.log, model, lambda: term(2), clock=rig.clock)
    await put(rig.log, *LOST)
    await second.catch_up()
    assert second.stats.appends == 1
    alarms = await rig.alarms()
    assert len(alarms) == 3
    alarm_events = len(await rig.log.read_all(after=0, limit=1000, types=sorted(CHANGE_TYPES)))
    # Deciding every old fact again (an old leader's appends not yet seen) writes nothing:
    # the same fact gives the same request id, and the log answers it from the first append.
    second.position = 0
    for e in await rig.log.read_all(after=0, limit=1000, types=sorted(FACT_TYPES)):
        await second.handle(e)
    assert len(await rig.alarms()) == 3
    assert len(await rig.log.read_all(after=0, limit=1000, types=sorted(CHANGE_TYPES))) == (
        alarm_events
    )
    # The old term (token 1) may no longer write once token 2 has.
    await put(rig.log, *CRASH2)
    with pytest.raises(FencedOut):
        await rig.reactor.catch_up()
    assert len(await rig.alarms()) == 3


async def test_a_draining_node_ends_streams_unavailable_with_the_cursor(rig: Rig) -> None:
    await rig.facts(SERVICE)
    call = rig.stub.SubscribeAlarms(
        pb.SubscribeAlarmsRequest(heartbeat_interval_ms=200), metadata=rig.md(ADMIN)
    )
    msgs = await read_until(call, lambda g: len(notes(g)) == 1)
    stopping = asyncio.create_task(asyncio.to_thread(rig.api.stop))  # SIGTERM: drain
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(DEADLINE_S):
            async for _ in call:
                pass
    await stopping
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "subscribe again from cursor" in (err.value.details() or "")
    assert int(notes(msgs)[0].cursor) > 0


async def test_a_running_reactor_follows_facts_and_stops_acting_when_its_term_ends(
    rig: Rig,
) -> None:
    current: dict[str, Leadership | None] = {"term": term(1)}
    reactor = AlarmReactor(rig.log, rig.projector.model, lambda: current["term"])
    running = asyncio.create_task(reactor.run())
    try:
        call = rig.stub.SubscribeAlarms(pb.SubscribeAlarmsRequest(), metadata=rig.md(ADMIN))
        await put(rig.log, *SERVICE)
        await read_until(call, lambda g: len(notes(g)) == 1)  # the reactor raised it
        call.cancel()
        current["term"] = None  # the fault manager lost its term
        await put(rig.log, *CRASH2)
        async with asyncio.timeout(DEADLINE_S):
            await running  # it returns at the next fact, without acting on it
        await rig.projector.model.wait_for(await rig.log.head())
        assert [a.fault_type for a in await rig.alarms()] == ["HOST_SERVICE_FAILURE"]
    finally:
        await reactor.stop()
        await asyncio.gather(running, return_exceptions=True)
