"""The `vim.v1.Hosts` service: host registration, maintenance, zones and capacity.

Follows the Flavours pattern (`vim/api/flavours.py`): validate every field into
violations, build the command envelope, decide against the read model, answer
with the stored JSON view (what a repeat of the request id gets back).

- Registration and maintenance are admin-only, as are GetHost and ListHosts
  (they show management and BMC addresses); ListZones and GetCapacity are
  open to every role.
- A command that changes nothing (a re-registration with the same values,
  maintenance enabled twice) appends nothing and answers with the current view.
- EvacuateHost (admin, the operator's role) records a request that the fault
  manager carries out (fence, then evacuate whatever the zone's policy). Whether
  the host's agent is alive is read from its liveness key in etcd
  (`VIM_ETCD_ENDPOINTS`, as `Admin.GetClusterStatus` reads it); without etcd (the
  embedded default) an UP or MAINTENANCE host counts as alive, as it does there.
  An etcd that cannot be read gives UNAVAILABLE: the request is not guessed at.
- Reservations are another module's: the servicer takes an optional provider
  `reservations(model)` and passes what it returns to `app.capacity.capacity`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

from ha.liveness import read_liveness
from vim._gen.vim.v1 import hosts_pb2 as pb
from vim._gen.vim.v1 import hosts_pb2_grpc
from vim.api import validation as v
from vim.api.admin import etcd_from_env
from vim.api.auth import ADMIN, READ
from vim.api.errors import refuse, rpc
from vim.api.node import Ctx, Node, view_to
from vim.app import capacity as cap
from vim.app.commands import Change, Decision
from vim.domain import host
from vim.domain.base import DomainEvent
from vim.errors import FieldViolation, NotFound, Unavailable
from vim.projections.readmodel import ReadModel, register_kind

SERVICE_NAME = "vim.v1.Hosts"
register_kind(host.KIND, host.evolve)

MAX_VCPUS = 4096
MAX_RAM_MB = 64 * 1024 * 1024  # 64 TiB
MAX_DISK_GB = 1024 * 1024  # 1 PiB
MAX_RATIO = 64.0
MAX_INSTANCES = 4096
DEFAULT_RATIOS = {"cpu": 4.0, "ram": 1.0, "disk": 1.0}
_RatioField = Literal["cpu_allocation_ratio", "ram_allocation_ratio", "disk_allocation_ratio"]
_RATIO_FIELDS: dict[str, _RatioField] = {
    "cpu": "cpu_allocation_ratio",
    "ram": "ram_allocation_ratio",
    "disk": "disk_allocation_ratio",
}
BMC_SCHEMES = frozenset({"ipmi", "redfish", "redfish+http", "redfish+https", "netns"})
"""`netns://<namespace>`: a test host's namespace power (ha.fencing.netns, docs/FAULTS.md)."""
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_HYPERVISORS = {
    pb.HYPERVISOR_TYPE_UNSPECIFIED: "KVM",
    pb.HYPERVISOR_TYPE_KVM: "KVM",
    pb.HYPERVISOR_TYPE_QEMU: "QEMU",
    pb.HYPERVISOR_TYPE_TEST: "TEST",
}

Provider = Callable[[ReadModel], Iterable[cap.ReservationLike]]
AgentAlive = Callable[[host.Host], Awaitable[bool]]
"""Whether the host's agent holds its liveness lease now."""
LIVENESS_TIMEOUT_S = 3.0


def liveness_reader(etcd_endpoints: Sequence[str]) -> AgentAlive:
    """The agent's liveness as `Admin.GetClusterStatus` sees it: its key in etcd, or,
    without etcd (embedded), its host being UP or in maintenance."""

    async def alive(h: host.Host) -> bool:
        if not etcd_endpoints:
            return h.state in (host.HostState.UP, host.HostState.MAINTENANCE)
        try:
            async with asyncio.timeout(LIVENESS_TIMEOUT_S):
                record = await read_liveness(etcd_endpoints, h.hostname, rpc_timeout_s=1.0)
        except Exception as exc:  # any failure to read: we do not know, so we refuse
            why = type(exc).__name__
            raise Unavailable(f"cannot read the liveness of {h.hostname} from etcd: {why}") from exc
        return record is not None

    return alive


class HostsServicer(hosts_pb2_grpc.HostsServicer):
    def __init__(
        self,
        node: Node,
        *,
        reservations: Provider | None = None,
        agent_alive: AgentAlive | None = None,
    ) -> None:
        self._node = node
        self._reservations = reservations
        self._agent_alive = agent_alive or liveness_reader(etcd_from_env())

    @rpc
    async def RegisterHost(self, request: pb.RegisterHostRequest, context: Ctx) -> pb.Host:
        principal = await self._node.caller(context, ADMIN, "RegisterHost")
        spec = _spec(request)
        ctx = self._node.command(principal, request, "RegisterHost", context)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            sid = host.stream(request.hostname)
            state = _state(model, sid)
            events = host.register(state, request.hostname, spec, at)
            return _decision(model, sid, state, events)

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _host_msg(out.response)

    @rpc
    async def GetHost(self, request: pb.GetHostRequest, context: Ctx) -> pb.Host:
        await self._node.caller(context, ADMIN, "GetHost")
        bad: list[FieldViolation] = []
        label("hostname", request.hostname, bad)
        refuse(bad)
        found = find(self._node.model, request.hostname)
        self._node.answered(context)
        return _host_msg(view(found))

    @rpc
    async def ListHosts(self, request: pb.ListHostsRequest, context: Ctx) -> pb.ListHostsResponse:
        await self._node.caller(context, ADMIN, "ListHosts")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        if request.zone:
            label("zone", request.zone, bad)
        if request.state:
            v.enum("state", request.state, pb.HostState.values()[1:], bad)
        refuse(bad)
        wanted = pb.HostState.Name(request.state).removeprefix("HOST_STATE_")
        items = [
            h
            for h in cap.hosts(self._node.model)
            if (not request.zone or h.spec.zone == request.zone)
            and (not request.state or h.state == wanted)
        ]
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.ListHostsResponse(hosts=[_host_msg(view(h)) for h in chunk], page=page)

    @rpc
    async def EnableMaintenance(
        self, request: pb.EnableMaintenanceRequest, context: Ctx
    ) -> pb.Host:
        principal = await self._node.caller(context, ADMIN, "EnableMaintenance")
        bad: list[FieldViolation] = []
        label("hostname", request.hostname, bad)
        v.name("reason", request.reason, bad, required=False)
        refuse(bad)
        ctx = self._node.command(principal, request, "EnableMaintenance", context)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            sid = host.stream(request.hostname)
            state = _state(model, sid)
            events = host.enable_maintenance(state, request.hostname, request.reason, at)
            return _decision(model, sid, state, events)

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _host_msg(out.response)

    @rpc
    async def DisableMaintenance(
        self, request: pb.DisableMaintenanceRequest, context: Ctx
    ) -> pb.Host:
        principal = await self._node.caller(context, ADMIN, "DisableMaintenance")
        bad: list[FieldViolation] = []
        label("hostname", request.hostname, bad)
        refuse(bad)
        ctx = self._node.command(principal, request, "DisableMaintenance", context)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            sid = host.stream(request.hostname)
            state = _state(model, sid)
            events = host.disable_maintenance(state, request.hostname, at)
            return _decision(model, sid, state, events)

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _host_msg(out.response)

    @rpc
    async def EvacuateHost(self, request: pb.EvacuateHostRequest, context: Ctx) -> pb.Host:
        principal = await self._node.caller(context, ADMIN, "EvacuateHost")
        bad: list[FieldViolation] = []
        label("hostname", request.hostname, bad)
        v.name("reason", request.reason, bad, required=False)
        refuse(bad)
        ctx = self._node.command(principal, request, "EvacuateHost", context)
        at = v.now()
        current = find(self._node.model, request.hostname)
        settled = (host.HostState.FAILED, host.HostState.FENCED)
        alive = current.state not in settled and await self._agent_alive(current)

        def decide(model: ReadModel) -> Decision:
            sid = host.stream(request.hostname)
            state = _state(model, sid)
            events = host.request_evacuation(state, request.hostname, request.reason, alive, at)
            return _decision(model, sid, state, events)

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _host_msg(out.response)

    @rpc
    async def ListZones(self, request: pb.ListZonesRequest, context: Ctx) -> pb.ListZonesResponse:
        await self._node.caller(context, READ, "ListZones")
        report = self._report()
        self._node.answered(context)
        return pb.ListZonesResponse(zones=[_zone_msg(z) for z in report.zones])

    @rpc
    async def GetCapacity(self, request: pb.GetCapacityRequest, context: Ctx) -> pb.CapacityReport:
        await self._node.caller(context, READ, "GetCapacity")
        bad: list[FieldViolation] = []
        if request.zone:
            label("zone", request.zone, bad)
        refuse(bad)
        report = self._report()
        zones = [z for z in report.zones if not request.zone or z.zone == request.zone]
        if request.zone and not zones:
            raise NotFound(f"zone {request.zone} not found")
        hosts = [h for h in report.hosts if not request.zone or h.zone == request.zone]
        self._node.answered(context)
        return pb.CapacityReport(
            zones=[_zone_msg(z) for z in zones],
            hosts=[
                pb.HostCapacity(
                    hostname=h.hostname,
                    zone=h.zone,
                    state=_state_enum(h.state),
                    capacity=_capacity_msg(h.capacity),
                )
                for h in hosts
            ],
        )

    def _report(self) -> cap.CapacityReport:
        model = self._node.model
        reservations = self._reservations(model) if self._reservations else ()
        return cap.capacity(model, reservations=reservations)


# Reading the model.


def find(model: ReadModel, hostname: str) -> host.Host:
    """A registered host, or NotFound."""
    found = _state(model, host.stream(hostname))
    if found is None:
        raise NotFound(f"host {hostname} not found")
    return found


def _state(model: ReadModel, sid: str) -> host.Host | None:
    entry = model.get(sid)
    if entry is None:
        return None
    state: host.Host = entry.state
    return state


def _decision(
    model: ReadModel, sid: str, state: host.Host | None, events: Sequence[DomainEvent]
) -> Decision:
    """Append `events` at the version decided against; answer with the host after them."""
    after = state
    for e in events:
        after = host.evolve(after, e)
    if after is None:  # a decision on a missing host raises NotFound before this
        raise NotFound(f"{sid} not found")
    changes = [Change(sid, model.version(sid), list(events))] if events else []
    return Decision(changes, view(after))


# Validation.


def label(field: str, value: str, out: list[FieldViolation]) -> None:
    """A lowercase DNS label (RFC 1123): a-z, 0-9, '-', 1-63, no '-' at either end."""
    if not _LABEL_RE.match(value):
        out.append(
            FieldViolation(field, f"{value[:64]!r} is not a lowercase DNS label (a-z 0-9 -, 1-63)")
        )


def _spec(r: pb.RegisterHostRequest) -> host.HostSpec:
    """The registration's spec, or InvalidInput naming every bad field."""
    bad: list[FieldViolation] = []
    label("hostname", r.hostname, bad)
    if r.zone:
        label("zone", r.zone, bad)
    v.in_range("vcpus", r.vcpus, 1, MAX_VCPUS, bad)
    v.in_range("ram_mb", r.ram_mb, 1, MAX_RAM_MB, bad)
    v.in_range("disk_gb", r.disk_gb, 1, MAX_DISK_GB, bad)
    ratios = {k: _ratio(r, k, bad) for k in DEFAULT_RATIOS}
    v.enum("hypervisor_type", r.hypervisor_type, list(_HYPERVISORS), bad)
    _address("management_address", r.management_address, bad)
    if r.bmc_endpoint:
        _bmc("bmc_endpoint", r.bmc_endpoint, bad)
    if r.max_instances:
        v.in_range("max_instances", r.max_instances, 1, MAX_INSTANCES, bad)
    refuse(bad)
    return host.HostSpec(
        zone=r.zone or host.DEFAULT_ZONE,
        vcpus=r.vcpus,
        ram_mb=r.ram_mb,
        disk_gb=r.disk_gb,
        cpu_allocation_ratio=ratios["cpu"],
        ram_allocation_ratio=ratios["ram"],
        disk_allocation_ratio=ratios["disk"],
        hypervisor_type=_HYPERVISORS[r.hypervisor_type],
        management_address=r.management_address.lower(),
        bmc_endpoint=r.bmc_endpoint,
        max_instances=r.max_instances or host.DEFAULT_MAX_INSTANCES,
    )


def _ratio(r: pb.RegisterHostRequest, kind: str, out: list[FieldViolation]) -> float:
    name = _RATIO_FIELDS[kind]
    if not r.HasField(name):
        return DEFAULT_RATIOS[kind]
    value: float = getattr(r, name)
    if not (math.isfinite(value) and 0.0 < value <= MAX_RATIO):
        out.append(FieldViolation(name, f"must be > 0 and <= {MAX_RATIO:g}, got {value!r}"))
    return value


def _address(field: str, value: str, out: list[FieldViolation]) -> None:
    """An IP address or a DNS name."""
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    labels = value.lower().rstrip(".").split(".")
    if not value or len(value) > 253 or not all(_LABEL_RE.match(x) for x in labels):
        out.append(FieldViolation(field, "an IP address or a DNS name expected"))


def _bmc(field: str, value: str, out: list[FieldViolation]) -> None:
    """A BMC URL with a known scheme and a host, and without credentials."""
    try:
        url = urlsplit(value)
        _ = url.port  # raises ValueError for a bad port
    except ValueError:
        out.append(FieldViolation(field, "not a valid URL"))
        return
    if len(value) > v.NAME_MAX or url.scheme not in BMC_SCHEMES or not url.hostname:
        out.append(
            FieldViolation(field, f"a URL with scheme {sorted(BMC_SCHEMES)} and a host expected")
        )
    elif url.username or url.password:
        out.append(FieldViolation(field, "must not carry credentials"))


# Views: proto3 JSON, stored as the command's response.


def view(h: host.Host) -> dict[str, Any]:
    """The proto3 JSON view of a host (the API's `Host` message)."""
    s = h.spec
    return {
        "hostname": h.hostname,
        "zone": s.zone,
        "state": f"HOST_STATE_{h.state}",
        "health": f"HOST_HEALTH_{h.health}",
        "healthReasons": list(h.health_reasons),
        "maintenance": h.maintenance,
        "maintenanceReason": h.maintenance_reason,
        "physical": _amounts(host.Resources(s.vcpus, s.ram_mb, s.disk_gb, s.max_instances)),
        "allocationRatios": {
            "cpu": s.cpu_allocation_ratio,
            "ram": s.ram_allocation_ratio,
            "disk": s.disk_allocation_ratio,
        },
        "hypervisorType": f"HYPERVISOR_TYPE_{s.hypervisor_type}",
        "managementAddress": s.management_address,
        "bmcEndpoint": s.bmc_endpoint,
        "capacity": _capacity(cap.of_host(h).capacity),
        "registeredAt": h.registered_at,
        "updatedAt": h.updated_at,
        "evacuationRequested": h.evacuation_requested,
        "evacuationReason": h.evacuation_reason,
    }


def _amounts(r: host.Resources) -> dict[str, int]:
    return {"vcpus": r.vcpus, "ramMb": r.ram_mb, "diskGb": r.disk_gb, "instances": r.instances}


def _capacity(c: cap.Capacity) -> dict[str, Any]:
    return {
        "total": _amounts(c.total),
        "used": _amounts(c.used),
        "reserved": _amounts(c.reserved),
        "available": _amounts(c.available),
    }


def _host_msg(view_: dict[str, Any] | Any) -> pb.Host:
    msg = pb.Host()
    view_to(msg, dict(view_))
    return msg


def _capacity_msg(c: cap.Capacity) -> pb.ResourceCapacity:
    msg = pb.ResourceCapacity()
    view_to(msg, _capacity(c))
    return msg


def _zone_msg(z: cap.ZoneCapacity) -> pb.AvailabilityZone:
    return pb.AvailabilityZone(
        name=z.zone,
        host_count=z.host_count,
        schedulable_hosts=z.schedulable_hosts,
        capacity=_capacity_msg(z.capacity),
    )


def _state_enum(state: host.HostState) -> pb.HostState.ValueType:
    return pb.HostState.Value(f"HOST_STATE_{state}")
