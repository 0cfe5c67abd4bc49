"""The `vim.v1.Quotas` and `vim.v1.Reservations` services.

Quotas: admins create, update and delete a tenant's limits; anyone may read
their own tenant's quota (another tenant's answers NOT_FOUND, as if absent);
admins read all. Usage is not set here: it moves with the allocations of the
compute and network services, through `vim.app.quotas.plan_consume` and
`plan_release`. On the wire a limit is -1 (unlimited), 0 (none) or N.

Reservations: a member reserves capacity for its own tenant; it sees and
terminates its tenant's reservations only (admins: all). Status is computed at
the time of each answer from the node's clock.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from vim._gen.vim.v1 import quotas_pb2 as pb
from vim._gen.vim.v1 import quotas_pb2_grpc
from vim.api import validation as v
from vim.api.auth import ADMIN, READ, WRITE
from vim.api.errors import refuse, rpc
from vim.api.node import Ctx, Node, view_to
from vim.app import quotas
from vim.app.commands import Change, Decision, Principal
from vim.domain import quota, reservation
from vim.errors import FieldViolation, NotFound
from vim.projections.readmodel import ReadModel

SERVICE_NAME = "vim.v1.Quotas"
RESERVATIONS_SERVICE_NAME = "vim.v1.Reservations"

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
MAX_LIMIT = 1 << 53
MAX_VCPUS = 1 << 20
MAX_RAM_MB = 1 << 40
MAX_INSTANCES = 100_000
_TS_MIN, _TS_MAX = -62_135_596_800, 253_402_300_799  # 0001-01-01 .. 9999-12-31


def _tenant(field: str, value: str, out: list[FieldViolation]) -> None:
    if not TENANT_RE.match(value):
        out.append(FieldViolation(field, "1-128 letters, digits, . _ : -, starting alphanumeric"))


def _limits(field: str, limits: pb.QuotaLimits, out: list[FieldViolation]) -> quota.Limits:
    """The limits present in the message: -1 becomes None (unlimited)."""
    found: quota.Limits = {}
    for r in quota.RESOURCES:
        if limits.HasField(r):  # type: ignore[arg-type]
            value: int = getattr(limits, r)
            if not -1 <= value <= MAX_LIMIT:
                out.append(FieldViolation(f"{field}.{r}", f"-1 (unlimited) or 0-{MAX_LIMIT}"))
            found[r] = None if value == -1 else value
    return found


def _visible_quota(model: ReadModel, principal: Principal, tenant: str) -> quota.Quota:
    state = quotas.quota_of(model, tenant)
    mine = principal.is_admin or tenant == principal.tenant
    if state is None or not state.defined or not mine:
        raise NotFound(f"tenant {tenant} has no quota")
    return state


class QuotasServicer(quotas_pb2_grpc.QuotasServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    async def _set(self, request: Any, context: Ctx, method: str) -> pb.Quota:
        """CreateQuota and UpdateQuota: validate, decide `quota.create|update`, answer."""
        principal = await self._node.caller(context, ADMIN, method)
        bad: list[FieldViolation] = []
        _tenant("tenant_id", request.tenant_id, bad)
        limits = _limits("limits", request.limits, bad)
        if method == "UpdateQuota" and not limits:
            bad.append(FieldViolation("limits", "nothing to change: give at least one limit"))
        refuse(bad)
        ctx = self._node.command(principal, request, method, context)
        tenant, at = request.tenant_id, v.now()
        decision = quota.create if method == "CreateQuota" else quota.update

        def decide(model: ReadModel) -> Decision:
            state = quotas.quota_of(model, tenant)
            event = decision(state, tenant, limits, at)
            sid = quota.stream(tenant)
            return Decision(
                [Change(sid, model.version(sid), [event])], quota.evolve(state, event).view()
            )

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _quota(out.response)

    @rpc
    async def CreateQuota(self, request: pb.CreateQuotaRequest, context: Ctx) -> pb.Quota:
        return await self._set(request, context, "CreateQuota")

    @rpc
    async def UpdateQuota(self, request: pb.UpdateQuotaRequest, context: Ctx) -> pb.Quota:
        return await self._set(request, context, "UpdateQuota")

    @rpc
    async def GetQuota(self, request: pb.GetQuotaRequest, context: Ctx) -> pb.Quota:
        principal = await self._node.caller(context, READ, "GetQuota")
        tenant = request.tenant_id or principal.tenant
        bad: list[FieldViolation] = []
        _tenant("tenant_id", tenant, bad)
        refuse(bad)
        found = _visible_quota(self._node.model, principal, tenant)
        self._node.answered(context)
        return _quota(found.view())

    @rpc
    async def DeleteQuota(
        self, request: pb.DeleteQuotaRequest, context: Ctx
    ) -> pb.DeleteQuotaResponse:
        principal = await self._node.caller(context, ADMIN, "DeleteQuota")
        bad: list[FieldViolation] = []
        _tenant("tenant_id", request.tenant_id, bad)
        refuse(bad)
        ctx = self._node.command(principal, request, "DeleteQuota", context)
        tenant, at = request.tenant_id, v.now()

        def decide(model: ReadModel) -> Decision:
            event = quota.delete(quotas.quota_of(model, tenant), tenant, at)
            sid = quota.stream(tenant)
            return Decision([Change(sid, model.version(sid), [event])], {"tenantId": tenant})

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return pb.DeleteQuotaResponse(tenant_id=str(out.response["tenantId"]))

    @rpc
    async def ListQuotas(
        self, request: pb.ListQuotasRequest, context: Ctx
    ) -> pb.ListQuotasResponse:
        principal = await self._node.caller(context, READ, "ListQuotas")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        refuse(bad)
        items = sorted(
            (
                e.state
                for _, e in self._node.model.of_kind(quota.KIND)
                if e.state.defined and (principal.is_admin or e.state.tenant == principal.tenant)
            ),
            key=lambda q: q.tenant,
        )
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.ListQuotasResponse(quotas=[_quota(q.view()) for q in chunk], page=page)


def _time(
    field: str, ts: timestamp_pb2.Timestamp, present: bool, out: list[FieldViolation]
) -> datetime | None:
    if not present:
        return None
    if not (_TS_MIN <= ts.seconds <= _TS_MAX and 0 <= ts.nanos < 1_000_000_000):
        out.append(FieldViolation(field, "not a valid timestamp"))
        return None
    return ts.ToDatetime(tzinfo=UTC)


def _window(
    request: pb.CreateComputeReservationRequest, now: datetime, out: list[FieldViolation]
) -> reservation.Window | None:
    start = _time("start_time", request.start_time, request.HasField("start_time"), out)
    end = _time("end_time", request.end_time, request.HasField("end_time"), out)
    expiry = _time("expiry_time", request.expiry_time, request.HasField("expiry_time"), out)
    for name, value in (("start_time", start), ("end_time", end)):
        if value is None and not any(b.field == name for b in out):
            out.append(FieldViolation(name, "is required"))
    if start is None or end is None:
        return None
    window = reservation.Window(start, end, expiry)
    out.extend(window.violations(now))
    return window


def _find_reservation(
    model: ReadModel, principal: Principal, reservation_id: str
) -> reservation.Reservation:
    entry = model.get(reservation.stream(reservation_id))
    if entry is None or not (principal.is_admin or entry.state.tenant == principal.tenant):
        raise NotFound(f"reservation {reservation_id} not found")
    found: reservation.Reservation = entry.state
    return found


class ReservationsServicer(quotas_pb2_grpc.ReservationsServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @rpc
    async def CreateComputeReservation(
        self, request: pb.CreateComputeReservationRequest, context: Ctx
    ) -> pb.ComputeReservation:
        principal = await self._node.caller(context, WRITE, "CreateComputeReservation")
        now = datetime.now(UTC)
        bad: list[FieldViolation] = []
        v.name("zone", request.zone, bad, required=False)
        v.in_range("vcpus", request.vcpus, 1, MAX_VCPUS, bad)
        v.in_range("ram_mb", request.ram_mb, 1, MAX_RAM_MB, bad)
        v.in_range("instances", request.instances, 1, MAX_INSTANCES, bad)
        window = _window(request, now, bad)
        refuse(bad)
        assert window is not None  # refused above otherwise
        ctx = self._node.command(principal, request, "CreateComputeReservation", context)
        event = reservation.create(
            v.new_id(),
            principal.tenant,
            request.zone,
            (request.vcpus, request.ram_mb, request.instances),
            window,
            now,
        )

        def decide(_model: ReadModel) -> Decision:
            sid = reservation.stream(event.reservation_id)
            return Decision([Change(sid, 0, [event])], reservation.evolve(None, event).view(now))

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _reservation(out.response)

    @rpc
    async def GetComputeReservation(
        self, request: pb.GetComputeReservationRequest, context: Ctx
    ) -> pb.ComputeReservation:
        principal = await self._node.caller(context, READ, "GetComputeReservation")
        bad: list[FieldViolation] = []
        v.resource_id("reservation_id", request.reservation_id, bad)
        refuse(bad)
        found = _find_reservation(self._node.model, principal, request.reservation_id)
        self._node.answered(context)
        return _reservation(found.view(datetime.now(UTC)))

    @rpc
    async def ListComputeReservations(
        self, request: pb.ListComputeReservationsRequest, context: Ctx
    ) -> pb.ListComputeReservationsResponse:
        principal = await self._node.caller(context, READ, "ListComputeReservations")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        v.enum("status", request.status, list(pb.ReservationStatus.values()), bad)
        refuse(bad)
        now = datetime.now(UTC)
        wanted = pb.ReservationStatus.Name(request.status).removeprefix("RESERVATION_STATUS_")
        items = [
            r
            for r in quotas.reservations(self._node.model)
            if (principal.is_admin or r.tenant == principal.tenant)
            and (not request.status or r.status(now) == wanted)
        ]
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.ListComputeReservationsResponse(
            reservations=[_reservation(r.view(now)) for r in chunk], page=page
        )

    @rpc
    async def TerminateComputeReservation(
        self, request: pb.TerminateComputeReservationRequest, context: Ctx
    ) -> pb.ComputeReservation:
        principal = await self._node.caller(context, WRITE, "TerminateComputeReservation")
        bad: list[FieldViolation] = []
        v.resource_id("reservation_id", request.reservation_id, bad)
        refuse(bad)
        ctx = self._node.command(principal, request, "TerminateComputeReservation", context)
        now = datetime.now(UTC)

        def decide(model: ReadModel) -> Decision:
            state = _find_reservation(model, principal, request.reservation_id)
            event = reservation.terminate(state, request.reservation_id, now)
            sid = reservation.stream(request.reservation_id)
            return Decision(
                [Change(sid, model.version(sid), [event])],
                reservation.evolve(state, event).view(now),
            )

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _reservation(out.response)


def _quota(view: dict[str, Any] | Any) -> pb.Quota:
    msg = pb.Quota()
    view_to(msg, dict(view))
    return msg


def _reservation(view: dict[str, Any] | Any) -> pb.ComputeReservation:
    msg = pb.ComputeReservation()
    view_to(msg, dict(view))
    return msg
