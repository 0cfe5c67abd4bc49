"""The guided tour of an `EmbeddedCluster`: build a small VNF, fail a host, watch it recover.

Every step goes through the API (`VimClient`, admin token, TLS), as any
program would, except where the tour looks at the simulated hardware itself
(which domains run on which libvirt test node) to prove what the API says.
Each step runs under a deadline and records what it found; a failed step stops
the tour (the later ones depend on it). Steps:

1. health: the node and its services report SERVING;
2. hosts: the three agents registered their hosts (UP, with the BMC endpoint
   the cluster recorded);
3. catalogue: a flavour, an image, a VXLAN network and a subnet;
4. group: an anti-affinity group (host scope);
5. servers: two group members (priority 900 in az-1, 500 in az-2) and one
   other server (priority 100 in az-1), each placed before the next is asked
   for, all ACTIVE on three different hosts, each domain running on exactly its
   host's node;
6. watch: an alarm subscription (`SubscribeAlarms`) and an event-log Watch are
   open (first heartbeat received) before anything fails;
7. power off: the host of the priority-900 member loses its power (agent gone,
   domains destroyed, liveness lost);
8-10. as they happen, printed live: `HostFailureDetected` and the alarm RAISED
   on the subscription; `HostFenceConfirmed` (the simulated BMC observed the
   host off) and the host FENCED; the server rebuilt on another host with the
   same id, MAC and IP addresses, running there and nowhere else, and the time
   from power-off to ACTIVE again;
11. anti-affinity: the group's members are still on different hosts, and the
    server that was not on the failed host did not move;
12. event log: the newest events, with the failure facts in causal order;
13. bad input is refused with INVALID_ARGUMENT and a field-level BadRequest;
14. metrics: the Prometheus endpoint counts the calls.

The summary (`Findings.summary()`) is printed as one JSON line at the end.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from rich.console import Console

from vim._gen.vim.v1 import (
    alarms_pb2,
    alarms_pb2_grpc,
    compute_pb2,
    compute_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    flavours_pb2,
    hosts_pb2,
    hosts_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    networks_pb2,
    networks_pb2_grpc,
)
from vim.client import StreamCall, VimClient
from vim.demo.cluster import EmbeddedCluster
from vim.demo.hosts import BMC_METHOD

STEP_TIMEOUT_S = 20.0
RECOVERY_TIMEOUT_S = 30.0
POLL_S = 0.1
TAIL = 20
TIMELINE_TYPES = (
    "HostFailureDetected",
    "HostStateChanged",
    "HostFenceConfirmed",
    "HostFenceFailed",
    "ServerEvacuationRequested",
    "ServerScheduled",
    "ServerStateReported",
    "ServerRecoveryFailed",
)
CAUSAL_ORDER = (
    "HostFailureDetected",
    "HostFenceConfirmed",
    "ServerEvacuationRequested",
    "ServerScheduled",
)


@dataclass(frozen=True, slots=True)
class StepResult:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a server is and who it is on the network."""

    host: str
    macs: tuple[str, ...]
    ips: tuple[str, ...]

    @classmethod
    def of(cls, s: compute_pb2.Server) -> Placement:
        return cls(
            s.host,
            tuple(n.mac_address for n in s.nics),
            tuple(ip for n in s.nics for ip in n.ip_addresses),
        )

    def data(self) -> dict[str, Any]:
        return {"host": self.host, "macs": list(self.macs), "ips": list(self.ips)}


@dataclass(slots=True)
class ServerRecord:
    name: str
    priority: int
    zone: str
    in_group: bool
    server_id: str = ""
    before: Placement | None = None
    after: Placement | None = None


@dataclass(slots=True)
class Findings:
    """What the tour saw; `summary()` is the final JSON line."""

    steps: list[StepResult] = field(default_factory=list)
    servers: list[ServerRecord] = field(default_factory=list)
    failed_host: str = ""
    victim: str = ""
    powered_off_at: float | None = None
    recovery_s: float | None = None
    alarm: dict[str, Any] = field(default_factory=dict)
    fence: dict[str, Any] = field(default_factory=dict)
    tail: list[events_pb2.RecordedEvent] = field(default_factory=list)
    tour_s: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    def summary(self, endpoint: str, profile: str) -> dict[str, Any]:
        victim = next((s for s in self.servers if s.server_id == self.victim), None)
        identity = bool(
            victim
            and victim.before
            and victim.after
            and victim.before.macs == victim.after.macs
            and victim.before.ips == victim.after.ips
            and victim.after.host not in ("", self.failed_host)
        )
        return {
            "demo": "vim-demo tour",
            "ok": self.ok,
            "tour_s": round(self.tour_s, 2),
            "steps": [
                {"name": s.name, "ok": s.ok, "detail": s.detail, "seconds": round(s.seconds, 2)}
                for s in self.steps
            ],
            "failed_host": self.failed_host,
            "recovered": [self.victim] if identity else [],
            "identity_kept": identity,
            "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
            "alarm": self.alarm,
            "fence": self.fence,
            "servers": [
                {
                    "name": s.name,
                    "server_id": s.server_id,
                    "priority": s.priority,
                    "affinity_group": s.in_group,
                    "before": s.before.data() if s.before else None,
                    "after": s.after.data() if s.after else None,
                }
                for s in self.servers
            ],
            "endpoint": endpoint,
            "profile": profile,
        }


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
    """Poll `check` until it returns something true, within `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if loop.time() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s (last: {last!r})")
        await asyncio.sleep(POLL_S)


class Tour:
    """The tour against one started cluster; `run()` fills `findings`."""

    def __init__(self, cluster: EmbeddedCluster, client: VimClient, console: Console) -> None:
        self.cluster = cluster
        self.vim = client
        self.console = console
        self.findings = Findings()
        self.compute = client.stub(compute_pb2_grpc.ComputeStub)
        self.hosts = client.stub(hosts_pb2_grpc.HostsStub)
        self.catalogue: dict[str, str] = {}
        self.group_id = ""
        self.events_seen: list[events_pb2.RecordedEvent] = []
        self.alarms_seen: list[alarms_pb2.AlarmNotification] = []
        self._heartbeat = asyncio.Event()
        self._news = asyncio.Event()
        self._followers: list[asyncio.Task[None]] = []
        self._streams: list[StreamCall[Any]] = []

    # -- running -----------------------------------------------------------------------

    async def run(self) -> Findings:
        started = time.perf_counter()
        steps: list[tuple[str, Callable[[], Awaitable[str]], float]] = [
            ("health", self.health, STEP_TIMEOUT_S),
            ("hosts", self.check_hosts, STEP_TIMEOUT_S),
            ("catalogue", self.make_catalogue, STEP_TIMEOUT_S),
            ("anti-affinity group", self.make_group, STEP_TIMEOUT_S),
            ("servers", self.make_servers, 2 * STEP_TIMEOUT_S),
            ("subscriptions", self.subscribe, STEP_TIMEOUT_S),
            ("power off", self.power_off, STEP_TIMEOUT_S),
            ("failure + alarm", self.failure_and_alarm, RECOVERY_TIMEOUT_S),
            ("fenced", self.fenced, RECOVERY_TIMEOUT_S),
            ("evacuated", self.evacuated, RECOVERY_TIMEOUT_S),
            ("anti-affinity", self.anti_affinity, STEP_TIMEOUT_S),
            ("event log", self.event_log, STEP_TIMEOUT_S),
            ("bad input", self.refuse_bad_input, STEP_TIMEOUT_S),
            ("metrics", self.scrape, STEP_TIMEOUT_S),
        ]
        try:
            for name, check, timeout_s in steps:
                if not await self._step(name, check, timeout_s):
                    break
        finally:
            for stream in self._streams:
                stream.cancel()
            for task in self._followers:
                task.cancel()
            await asyncio.gather(*self._followers, return_exceptions=True)
            self.findings.tour_s = time.perf_counter() - started
        return self.findings

    async def _step(self, name: str, check: Callable[[], Awaitable[str]], timeout_s: float) -> bool:
        """Run one step under its deadline; record and print its outcome, never raise."""
        started = time.perf_counter()
        try:
            detail = await asyncio.wait_for(check(), timeout_s)
            ok = True
        except Exception as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
        took = time.perf_counter() - started
        self.findings.steps.append(StepResult(name, ok, detail, took))
        mark = "[green]ok[/]" if ok else "[red]FAILED[/]"
        self.console.print(f"{mark} [bold]{name}[/] ({took:.1f} s): {detail}", highlight=False)
        return ok

    def _say(self, text: str) -> None:
        at = self.findings.powered_off_at
        stamp = f"+{time.monotonic() - at:5.2f}s" if at is not None else "       "
        self.console.print(f"  [cyan]{stamp}[/] {text}", highlight=False)

    # -- steps -------------------------------------------------------------------------

    async def health(self) -> str:
        for name in ("", "vim.v1.Compute", "vim.v1.Agents", "vim.v1.Alarms"):
            reply = await self.vim.health.Check(health_pb2.HealthCheckRequest(service=name))
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                raise AssertionError(f"health of {name!r} is {reply.status}")
        return "the node, Compute, Agents and Alarms report SERVING"

    async def check_hosts(self) -> str:
        reply = await self.hosts.ListHosts(hosts_pb2.ListHostsRequest())
        found = {h.hostname: h for h in reply.hosts}
        wanted = set(self.cluster.hosts)
        if set(found) != wanted:
            raise AssertionError(f"hosts {sorted(found)}, expected {sorted(wanted)}")
        lines = []
        for name in sorted(found):
            h = found[name]
            if h.state != hosts_pb2.HOST_STATE_UP or not h.bmc_endpoint:
                raise AssertionError(
                    f"{name}: {hosts_pb2.HostState.Name(h.state)}, bmc {h.bmc_endpoint!r}"
                )
            lines.append(f"{name} ({h.zone}, {h.physical.vcpus} vCPU, BMC {h.bmc_endpoint})")
        return (
            "registered by their agents, UP: "
            + "; ".join(lines)
            + " - OVS 'none': network plans are recorded in the log, not applied"
        )

    async def make_catalogue(self) -> str:
        flavour = await self.vim.flavours.CreateFlavour(
            flavours_pb2.CreateFlavourRequest(
                name="m1.small", vcpus=2, ram_mb=2048, disk_gb=20, is_public=True
            )
        )
        image = await self.vim.stub(images_pb2_grpc.ImagesStub).AddImage(
            images_pb2.AddImageRequest(
                name="cirros",
                disk_format=images_pb2.DISK_FORMAT_QCOW2,
                size_bytes=1024,
                checksum="a" * 64,
                visibility=images_pb2.VISIBILITY_PUBLIC,
            )
        )
        nets = self.vim.stub(networks_pb2_grpc.NetworksStub)
        net = await nets.AllocateNetwork(
            networks_pb2.AllocateNetworkRequest(
                name="vnf-net", network_type=networks_pb2.NETWORK_TYPE_VXLAN
            )
        )
        subnet = await nets.AllocateSubnet(
            networks_pb2.AllocateSubnetRequest(network_id=net.network_id, cidr="10.10.0.0/24")
        )
        self.catalogue = {
            "flavour": flavour.flavour_id,
            "image": image.image_id,
            "network": net.network_id,
        }
        return (
            f"flavour m1.small, image cirros, VXLAN network vnf-net "
            f"(VNI {net.segmentation_id}), subnet {subnet.cidr}"
        )

    async def make_group(self) -> str:
        group = await self.compute.CreateAffinityGroup(
            compute_pb2.CreateAffinityGroupRequest(
                name="vnf-a",
                policy=compute_pb2.AFFINITY_POLICY_ANTI_AFFINITY,
                scope=compute_pb2.AFFINITY_SCOPE_HOST,
            )
        )
        self.group_id = group.group_id
        return f"vnf-a ({group.group_id}): anti-affinity, host scope"

    async def make_servers(self) -> str:
        self.findings.servers = [
            ServerRecord("vnf-a-0", 900, "az-1", True),
            ServerRecord("vnf-a-1", 500, "az-2", True),
            ServerRecord("web-0", 100, "az-1", False),
        ]
        for record in self.findings.servers:
            made = await self.compute.AllocateCompute(
                compute_pb2.AllocateComputeRequest(
                    name=record.name,
                    flavour_id=self.catalogue["flavour"],
                    image_id=self.catalogue["image"],
                    networks=[compute_pb2.NicRequest(network_id=self.catalogue["network"])],
                    affinity_group_id=self.group_id if record.in_group else "",
                    zone=record.zone,
                    priority=record.priority,
                )
            )
            record.server_id = made.server_id
            # One at a time: each placement sees the ones before it (spread).
            await until(f"{record.name} placed", partial(self._placed, record), STEP_TIMEOUT_S)
        lines = []
        for record in self.findings.servers:
            s = await until(f"{record.name} ACTIVE", partial(self._active, record), STEP_TIMEOUT_S)
            record.before = Placement.of(s)
            await until(
                f"{record.name}'s domain running on {s.host} only",
                partial(self._runs_only_on, record.server_id, s.host),
                STEP_TIMEOUT_S,
            )
            lines.append(
                f"{record.name} (priority {record.priority}) ACTIVE on {s.host}, "
                f"{', '.join(record.before.ips)}"
            )
        used = {r.before.host for r in self.findings.servers if r.before}
        if len(used) != len(self.findings.servers):
            raise AssertionError(f"expected three different hosts, got {sorted(used)}")
        return "; ".join(lines)

    async def _server(self, server_id: str) -> compute_pb2.Server:
        return await self.compute.GetServer(compute_pb2.GetServerRequest(server_id=server_id))

    async def _placed(self, r: ServerRecord) -> bool:
        s = await self._server(r.server_id)
        if s.state == compute_pb2.SERVER_STATE_ERROR:
            raise AssertionError(f"{r.name} is in ERROR: {s.fault_reason}")
        return bool(s.host)

    async def _active(self, r: ServerRecord) -> compute_pb2.Server | None:
        s = await self._server(r.server_id)
        if s.state == compute_pb2.SERVER_STATE_ERROR:
            raise AssertionError(f"{r.name} is in ERROR: {s.fault_reason}")
        ok = s.state == compute_pb2.SERVER_STATE_ACTIVE and not s.task and s.host
        return s if ok else None

    async def _runs_only_on(self, server_id: str, hostname: str) -> bool:
        for name, h in self.cluster.hosts.items():
            running = server_id in await h.running()
            if running != (name == hostname):
                return False
        return True

    async def subscribe(self) -> str:
        alarms = self.vim.stream(
            alarms_pb2_grpc.AlarmsStub,
            "SubscribeAlarms",
            alarms_pb2.SubscribeAlarmsRequest(heartbeat_interval_ms=500),
            resume=False,
        )
        head = await self.vim.events.GetHead(events_pb2.GetHeadRequest())
        watch = self.vim.stream(
            events_pb2_grpc.EventLogStub,
            "Watch",
            events_pb2.WatchEventsRequest(
                from_position=head.head.position, types=list(TIMELINE_TYPES)
            ),
        )
        self._streams += [alarms, watch]
        self._followers += [
            asyncio.create_task(self._follow_alarms(alarms), name="demo-alarms"),
            asyncio.create_task(self._follow_events(watch), name="demo-events"),
        ]
        await self._heartbeat.wait()
        return (
            f"SubscribeAlarms open (heartbeat received), EventLog.Watch open from "
            f"position {head.head.position}"
        )

    async def _follow_alarms(self, stream: StreamCall[alarms_pb2.AlarmStreamMessage]) -> None:
        async for message in stream:
            if message.WhichOneof("kind") == "heartbeat":
                self._heartbeat.set()
                continue
            n = message.notification
            self.alarms_seen.append(n)
            a = n.alarm
            change = alarms_pb2.AlarmChange.Name(n.change).removeprefix("ALARM_CHANGE_")
            severity = alarms_pb2.Severity.Name(a.perceived_severity).removeprefix("SEVERITY_")
            state = alarms_pb2.AlarmState.Name(a.state).removeprefix("ALARM_STATE_")
            self._say(
                f"[magenta]alarm {change}[/] ({state}) {a.fault_type} on {a.managed_object_id}, "
                f"{severity}, {a.probable_cause}"
            )
            self._news.set()

    async def _follow_events(self, stream: StreamCall[events_pb2.RecordedEvent]) -> None:
        async for e in stream:
            self.events_seen.append(e)
            if self._relevant(e):
                self._say(f"[yellow]{e.type}[/] {e.stream_id} {_brief(e)}")
            self._news.set()

    def _relevant(self, e: events_pb2.RecordedEvent) -> bool:
        f = self.findings
        if e.stream_id == f"host-{f.failed_host}":
            return True
        if e.stream_id != f"server-{f.victim}":
            return False
        return e.type != "ServerStateReported" or event_data(e).get("state") == "ACTIVE"

    async def power_off(self) -> str:
        victim = self.findings.servers[0]
        assert victim.before is not None
        self.findings.victim = victim.server_id
        self.findings.failed_host = hostname = victim.before.host
        self.console.print(
            f"\n[bold red]Powering off {hostname}[/] (it runs {victim.name}); "
            "what follows is printed as it happens:",
            highlight=False,
        )
        off = await self.cluster.power_off(hostname)
        self.findings.powered_off_at = off.at
        self._say(
            f"[red]{hostname} is off[/]: agent gone, {off.domains_destroyed} domain(s) "
            "destroyed, liveness lost"
        )
        return f"{hostname} lost its power (it ran {victim.name})"

    async def _seen(self, what: str, found: Callable[[], Any], timeout_s: float) -> Any:
        """Wait until `found()` (checked on every event or alarm received) is true."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not (result := found()):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no {what} within {timeout_s:.0f} s")
            self._news.clear()
            try:
                async with asyncio.timeout(min(remaining, 1.0)):
                    await self._news.wait()
            except TimeoutError:
                pass
        return result

    def _host_event(self, type_: str) -> events_pb2.RecordedEvent | None:
        stream = f"host-{self.findings.failed_host}"
        return next(
            (e for e in self.events_seen if e.stream_id == stream and e.type == type_), None
        )

    async def failure_and_alarm(self) -> str:
        host = self.findings.failed_host
        detected = await self._seen(
            f"HostFailureDetected for {host}",
            lambda: self._host_event("HostFailureDetected"),
            RECOVERY_TIMEOUT_S,
        )
        raised = await self._seen(
            f"alarm raised on {host}",
            lambda: next(
                (
                    n
                    for n in self.alarms_seen
                    if n.change == alarms_pb2.ALARM_CHANGE_RAISED
                    and n.alarm.managed_object_id == host
                ),
                None,
            ),
            RECOVERY_TIMEOUT_S,
        )
        a = raised.alarm
        self.findings.alarm = {
            "alarm_id": a.alarm_id,
            "managed_object_id": a.managed_object_id,
            "fault_type": a.fault_type,
            "severity": alarms_pb2.Severity.Name(a.perceived_severity),
            "state": alarms_pb2.AlarmState.Name(a.state),
            "probable_cause": a.probable_cause,
        }
        return (
            f"HostFailureDetected ({event_data(detected).get('kind')}); alarm {a.fault_type} "
            f"{alarms_pb2.Severity.Name(a.perceived_severity)} raised on the subscription"
        )

    async def fenced(self) -> str:
        host = self.findings.failed_host
        confirmed = await self._seen(
            f"HostFenceConfirmed for {host}",
            lambda: self._host_event("HostFenceConfirmed"),
            RECOVERY_TIMEOUT_S,
        )
        fact = event_data(confirmed)
        method = str(fact.get("method", ""))
        if method != BMC_METHOD:
            raise AssertionError(f"fenced by {method!r}, not by the simulated BMC")
        # The state change is the next event after the fact; the API may not have it yet.
        await until(f"{host} FENCED", partial(self._host_in, host, "FENCED"), STEP_TIMEOUT_S)
        self.findings.fence = {"method": method, "detail": fact.get("detail", "")}
        return f"{host} FENCED by {method}: {fact.get('detail', '')}"

    async def _host_in(self, hostname: str, state: str) -> str | None:
        h = await self.hosts.GetHost(hosts_pb2.GetHostRequest(hostname=hostname))
        name = hosts_pb2.HostState.Name(h.state).removeprefix("HOST_STATE_")
        return name if name == state else None

    async def evacuated(self) -> str:
        f = self.findings
        victim = next(r for r in f.servers if r.server_id == f.victim)
        assert victim.before is not None and f.powered_off_at is not None
        s = await until(
            f"{victim.name} ACTIVE on another host",
            lambda: self._recovered(victim),
            RECOVERY_TIMEOUT_S,
        )
        f.recovery_s = time.monotonic() - f.powered_off_at
        victim.after = Placement.of(s)
        await until(
            f"{victim.name}'s domain on {s.host} only",
            lambda: self._runs_only_on(victim.server_id, s.host),
            STEP_TIMEOUT_S,
        )
        before, after = victim.before, victim.after
        if (before.macs, before.ips) != (after.macs, after.ips):
            raise AssertionError(f"identity changed: {before} -> {after}")
        self._say(f"[green]{victim.name} ACTIVE on {s.host}[/], same id, MAC and IP")
        return (
            f"{victim.name} {victim.server_id} rebuilt on {after.host} (was {before.host}) "
            f"with the same MAC {', '.join(after.macs)} and IP {', '.join(after.ips)}, "
            f"{f.recovery_s:.1f} s after the power-off"
        )

    async def _recovered(self, r: ServerRecord) -> compute_pb2.Server | None:
        s = await self._server(r.server_id)
        if s.state == compute_pb2.SERVER_STATE_ERROR:
            raise AssertionError(f"{r.name} is in ERROR: {s.fault_reason}")
        moved = s.host and s.host != self.findings.failed_host
        ok = moved and s.state == compute_pb2.SERVER_STATE_ACTIVE and not s.task
        return s if ok else None

    async def anti_affinity(self) -> str:
        hosts: dict[str, str] = {}
        for r in self.findings.servers:
            s = await self._server(r.server_id)
            hosts[r.name] = s.host
            if r.server_id != self.findings.victim:
                assert r.before is not None
                if s.host != r.before.host:
                    raise AssertionError(f"{r.name} moved from {r.before.host} to {s.host}")
                r.after = Placement.of(s)
        members = [hosts[r.name] for r in self.findings.servers if r.in_group]
        if len(set(members)) != len(members) or self.findings.failed_host in members:
            raise AssertionError(f"group vnf-a on {members}")
        return (
            "vnf-a members on " + " and ".join(sorted(members)) + "; the other servers did not move"
        )

    async def event_log(self) -> str:
        head = await self.vim.events.GetHead(events_pb2.GetHeadRequest())
        after = max(0, head.head.position - TAIL)
        page = await self.vim.events.ListEvents(
            events_pb2.ListEventsRequest(after=after, limit=TAIL)
        )
        self.findings.tail = list(page.events)
        f = self.findings
        streams = {f"host-{f.failed_host}", f"server-{f.victim}"}
        # The whole log, for the order of the failure facts (the tail may not reach back).
        positions: dict[str, int] = {}
        for e in await self._all_events(list(CAUSAL_ORDER)):
            # The ServerScheduled that counts is the one after the evacuation request.
            after_evacuation = e.position > positions.get("ServerEvacuationRequested", 1 << 62)
            wanted = e.type != "ServerScheduled" or after_evacuation
            if e.stream_id in streams and e.type not in positions and wanted:
                positions[e.type] = e.position
        order = [positions.get(t, -1) for t in CAUSAL_ORDER]
        if -1 in order or order != sorted(order):
            raise AssertionError(
                f"failure facts out of order: {dict(zip(CAUSAL_ORDER, order, strict=True))}"
            )
        return f"{head.head.position} events; " + " < ".join(
            f"{t}@{positions[t]}" for t in CAUSAL_ORDER
        )

    async def _all_events(self, types: list[str]) -> list[events_pb2.RecordedEvent]:
        found: list[events_pb2.RecordedEvent] = []
        after = 0
        while True:
            page = await self.vim.events.ListEvents(
                events_pb2.ListEventsRequest(after=after, limit=500, types=types)
            )
            found += page.events
            if not page.events or page.next.position <= after:
                return found
            after = page.next.position

    async def refuse_bad_input(self) -> str:
        try:
            await self.vim.events.ListEvents(events_pb2.ListEventsRequest(limit=5000))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            fields = bad_request_fields(exc)
            if fields != ["limit"]:
                raise AssertionError(f"BadRequest names {fields}, not ['limit']") from exc
            return f"limit=5000 refused: INVALID_ARGUMENT, BadRequest field {fields[0]!r}"
        raise AssertionError("limit=5000 was accepted")

    async def scrape(self) -> str:
        url = f"http://127.0.0.1:{self.cluster.api.metrics_port}/metrics"
        body = await asyncio.to_thread(_get, url)
        wanted = 'vim_api_requests_total{code="OK",method="/vim.v1.Compute/AllocateCompute"}'
        if wanted not in body:
            raise AssertionError(f"{wanted} missing from {url}")
        return f"{url} counts requests by method and code"


def event_data(e: events_pb2.RecordedEvent) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(e.data)
    return data


def _brief(e: events_pb2.RecordedEvent) -> str:
    keep = {
        k: v
        for k, v in event_data(e).items()
        if k in ("kind", "state", "previous", "host", "method", "detail", "from_host", "reason")
    }
    text = json.dumps(keep, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= 140 else text[:137] + "..."


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=STEP_TIMEOUT_S) as reply:
        return str(reply.read().decode("utf-8"))


def bad_request_fields(exc: grpc.aio.AioRpcError) -> list[str]:
    """The fields named by the google.rpc.BadRequest detail of a failed call."""
    status = rpc_status.from_call(exc)
    fields: list[str] = []
    for detail in [] if status is None else status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields
