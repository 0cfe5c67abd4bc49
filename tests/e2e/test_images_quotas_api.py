"""Images, Quotas and Reservations over real gRPC against an in-process node.

Also the quota's atomic enforcement, at the app level: many concurrent commands
charging one quota through `plan_consume` and the node's real CommandRunner
and event log never take it past its limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from vim._gen.vim.v1 import images_pb2 as ipb
from vim._gen.vim.v1 import images_pb2_grpc, quotas_pb2_grpc
from vim._gen.vim.v1 import quotas_pb2 as qpb
from vim.api.auth import Authenticator
from vim.api.images import find_image
from vim.api.server import ApiConfig, ApiNode
from vim.app import quotas
from vim.app.commands import CommandContext, Decision, Principal
from vim.domain import quota
from vim.errors import NotFound
from vim.projections.readmodel import ReadModel

SECRET = b"x" * 32
AUTH = Authenticator(SECRET)
SHA = "ab" * 32
Code = grpc.StatusCode


def md(tenant: str = "t1", *roles: str) -> tuple[tuple[str, str], ...]:
    token = AUTH.mint(f"{tenant}-user", tenant, list(roles or ("member",)))
    return (("authorization", "Bearer " + token),)


ADMIN = md("ops", "admin")


@dataclass
class Api:
    node: ApiNode
    images: images_pb2_grpc.ImagesStub
    quotas: quotas_pb2_grpc.QuotasStub
    reservations: quotas_pb2_grpc.ReservationsStub


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    node = ApiNode(
        ApiConfig(
            listen="127.0.0.1:0",
            eventlog_url=f"sqlite:///{tmp_path}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
        )
    )
    await node.start()
    try:
        async with grpc.aio.insecure_channel(node.address) as ch:
            yield Api(
                node,
                images_pb2_grpc.ImagesStub(ch),
                quotas_pb2_grpc.QuotasStub(ch),
                quotas_pb2_grpc.ReservationsStub(ch),
            )
    finally:
        await node.stop()


def add(name: str = "cirros", rid: str = "a-1", **kw: object) -> ipb.AddImageRequest:
    fields: dict[str, object] = {
        "disk_format": ipb.DISK_FORMAT_QCOW2,
        "min_disk_gb": 1,
        "min_ram_mb": 64,
        "size_bytes": 12_345,
        "checksum": SHA,
        "location": "https://images.example/cirros.qcow2",
    }
    return ipb.AddImageRequest(request_id=rid, name=name, **(fields | kw))  # type: ignore[arg-type]


async def fails(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    assert err.value.code() is code, err.value.details()
    return err.value


def violations(err: grpc.aio.AioRpcError) -> set[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: set[str] = set()
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields |= {v.field for v in bad.field_violations}
    return fields


# Images


async def test_image_crud(api: Api) -> None:
    made = await api.images.AddImage(add(metadata={"os": "cirros"}), metadata=md())
    assert (made.tenant_id, made.visibility, made.status) == (
        "t1",
        ipb.VISIBILITY_PRIVATE,
        ipb.IMAGE_STATUS_ACTIVE,
    )
    assert (made.disk_format, made.container_format) == (
        ipb.DISK_FORMAT_QCOW2,
        ipb.CONTAINER_FORMAT_BARE,
    )
    got = await api.images.GetImage(ipb.GetImageRequest(image_id=made.image_id), metadata=md())
    assert got == made
    changed = await api.images.UpdateImage(
        ipb.UpdateImageRequest(
            request_id="u-1",
            image_id=made.image_id,
            name="cirros-0.6",
            min_ram_mb=128,
            set_metadata={"arch": "x86_64"},
            remove_metadata=["os"],
        ),
        metadata=md(),
    )
    assert (changed.name, changed.min_ram_mb, changed.min_disk_gb) == ("cirros-0.6", 128, 1)
    assert dict(changed.metadata) == {"arch": "x86_64"}
    listed = await api.images.ListImages(ipb.ListImagesRequest(), metadata=md("t1", "reader"))
    assert [i.name for i in listed.images] == ["cirros-0.6"]
    await api.images.DeleteImage(
        ipb.DeleteImageRequest(request_id="d-1", image_id=made.image_id), metadata=md()
    )
    await fails(
        api.images.GetImage(ipb.GetImageRequest(image_id=made.image_id), metadata=md()),
        Code.NOT_FOUND,
    )


async def test_private_images_are_not_found_by_other_tenants_public_ones_are_seen(
    api: Api,
) -> None:
    private = await api.images.AddImage(add("mine"), metadata=md("t1"))
    public = await api.images.AddImage(
        add("shared", "a-2", visibility=ipb.VISIBILITY_PUBLIC, disk_format=ipb.DISK_FORMAT_RAW),
        metadata=ADMIN,
    )
    get = ipb.GetImageRequest(image_id=private.image_id)
    await fails(api.images.GetImage(get, metadata=md("t2")), Code.NOT_FOUND)
    update = ipb.UpdateImageRequest(request_id="u-1", image_id=private.image_id, name="x")
    await fails(api.images.UpdateImage(update, metadata=md("t2")), Code.NOT_FOUND)
    seen = await api.images.GetImage(
        ipb.GetImageRequest(image_id=public.image_id), metadata=md("t2")
    )
    assert seen.tenant_id == "ops"
    update = ipb.UpdateImageRequest(request_id="u-2", image_id=public.image_id, name="x")
    await fails(api.images.UpdateImage(update, metadata=md("t2")), Code.PERMISSION_DENIED)
    delete = ipb.DeleteImageRequest(request_id="d-2", image_id=public.image_id)
    await fails(api.images.DeleteImage(delete, metadata=md("t2")), Code.PERMISSION_DENIED)

    async def names(meta: tuple[tuple[str, str], ...], **kw: object) -> list[str]:
        page = await api.images.ListImages(ipb.ListImagesRequest(**kw), metadata=meta)  # type: ignore[arg-type]
        return [i.name for i in page.images]

    assert await names(md("t2")) == ["shared"]
    assert await names(md("t1")) == ["mine", "shared"]
    assert await names(ADMIN) == ["mine", "shared"]
    assert await names(md("t1"), disk_format=ipb.DISK_FORMAT_RAW) == ["shared"]
    assert await names(md("t1"), visibility=ipb.VISIBILITY_PRIVATE) == ["mine"]
    assert await names(md("t1"), name="mine") == ["mine"]

    model = api.node.node.model  # type: ignore[union-attr]
    other = Principal("u", "t2", frozenset({"member"}))
    assert find_image(model, other, public.image_id).name == "shared"
    with pytest.raises(NotFound):
        find_image(model, other, private.image_id)


async def test_roles_and_credentials(api: Api) -> None:
    await fails(api.images.AddImage(add(), metadata=md("t1", "reader")), Code.PERMISSION_DENIED)
    await fails(api.images.AddImage(add()), Code.UNAUTHENTICATED)
    await fails(api.images.ListImages(ipb.ListImagesRequest()), Code.UNAUTHENTICATED)
    public = add(visibility=ipb.VISIBILITY_PUBLIC)
    await fails(api.images.AddImage(public, metadata=md("t1")), Code.PERMISSION_DENIED)


async def test_add_image_names_every_bad_field(api: Api) -> None:
    bad = add(
        name="",
        disk_format=ipb.DISK_FORMAT_UNSPECIFIED,
        checksum="not-a-sha",
        location="ftp://x/y",
        size_bytes=0,
    )
    err = await fails(api.images.AddImage(bad, metadata=md()), Code.INVALID_ARGUMENT)
    assert violations(err) == {"name", "disk_format", "checksum", "location", "size_bytes"}


async def test_add_image_is_idempotent_and_a_reused_request_id_is_refused(api: Api) -> None:
    log = api.node.node.log  # type: ignore[union-attr]
    first = await api.images.AddImage(add(), metadata=md())
    head = await log.head()
    again = await api.images.AddImage(add(), metadata=md())
    assert again == first
    assert await log.head() == head
    await fails(api.images.AddImage(add("other"), metadata=md()), Code.FAILED_PRECONDITION)
    assert await log.head() == head


# Quotas


def create_quota(tenant: str = "t1", rid: str = "q-1", **limits: int) -> qpb.CreateQuotaRequest:
    return qpb.CreateQuotaRequest(
        request_id=rid, tenant_id=tenant, limits=qpb.QuotaLimits(**limits)
    )


async def test_quota_crud_and_who_may_see_it(api: Api) -> None:
    await fails(
        api.quotas.CreateQuota(create_quota(cores=4), metadata=md("t1")), Code.PERMISSION_DENIED
    )
    made = await api.quotas.CreateQuota(create_quota(cores=4, ports=0), metadata=ADMIN)
    assert (made.limits.cores, made.limits.ports, made.limits.ram_mb) == (4, 0, -1)
    assert made.used.cores == 0
    await fails(
        api.quotas.CreateQuota(create_quota(rid="q-2"), metadata=ADMIN), Code.ALREADY_EXISTS
    )
    own = await api.quotas.GetQuota(qpb.GetQuotaRequest(), metadata=md("t1", "reader"))
    assert own == made
    await fails(
        api.quotas.GetQuota(qpb.GetQuotaRequest(tenant_id="t1"), metadata=md("t2")),
        Code.NOT_FOUND,
    )
    updated = await api.quotas.UpdateQuota(
        qpb.UpdateQuotaRequest(
            request_id="q-3", tenant_id="t1", limits=qpb.QuotaLimits(cores=-1, instances=2)
        ),
        metadata=ADMIN,
    )
    assert (updated.limits.cores, updated.limits.instances, updated.limits.ports) == (-1, 2, 0)
    await api.quotas.CreateQuota(create_quota("t2", "q-4"), metadata=ADMIN)
    every = await api.quotas.ListQuotas(qpb.ListQuotasRequest(), metadata=ADMIN)
    assert [q.tenant_id for q in every.quotas] == ["t1", "t2"]
    mine = await api.quotas.ListQuotas(qpb.ListQuotasRequest(), metadata=md("t2"))
    assert [q.tenant_id for q in mine.quotas] == ["t2"]
    delete = qpb.DeleteQuotaRequest(request_id="q-5", tenant_id="t1")
    await fails(api.quotas.DeleteQuota(delete, metadata=md("t1")), Code.PERMISSION_DENIED)
    await api.quotas.DeleteQuota(delete, metadata=ADMIN)
    await fails(api.quotas.GetQuota(qpb.GetQuotaRequest(), metadata=md("t1")), Code.NOT_FOUND)
    bad = create_quota("bad tenant!", "q-6", cores=-2)
    err = await fails(api.quotas.CreateQuota(bad, metadata=ADMIN), Code.INVALID_ARGUMENT)
    assert violations(err) == {"tenant_id", "limits.cores"}


async def test_concurrent_consumers_never_overshoot_a_quota(api: Api) -> None:
    await api.quotas.CreateQuota(create_quota(cores=10), metadata=ADMIN)
    runner = api.node.node.runner  # type: ignore[union-attr]
    principal = Principal("compute", "t1", frozenset({"member"}))

    async def allocate(i: int) -> object:
        def decide(model: ReadModel) -> Decision:
            change = quotas.plan_consume(model, "t1", {"cores": 1}, f"server-{i}")
            return Decision([change], {"server": i})

        ctx = CommandContext(principal, f"alloc-{i}", f"fp-{i}")
        return await runner.run(ctx, decide)

    results = await asyncio.gather(*(allocate(i) for i in range(40)), return_exceptions=True)
    exceeded = [r for r in results if isinstance(r, quota.QuotaExceeded)]
    assert len(exceeded) == 30, [r for r in results if isinstance(r, BaseException)][:3]
    assert len(results) - len(exceeded) == 10
    got = await api.quotas.GetQuota(qpb.GetQuotaRequest(), metadata=md("t1"))
    assert got.used.cores == 10
    recorded = await api.node.node.log.read_all(after=0, limit=1000)  # type: ignore[union-attr]
    assert [e.type for e in recorded].count("QuotaConsumed") == 10

    def release(model: ReadModel) -> Decision:
        return Decision([quotas.plan_release(model, "t1", {"cores": 4}, "gone")])

    await runner.run(CommandContext(principal, "release-1", "fp-r"), release)
    got = await api.quotas.GetQuota(qpb.GetQuotaRequest(), metadata=md("t1"))
    assert got.used.cores == 6


# Reservations


def ts(t: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(t)
    return out


def reserve(rid: str = "r-1", **kw: object) -> qpb.CreateComputeReservationRequest:
    now = datetime.now(UTC)
    fields: dict[str, object] = {
        "vcpus": 4,
        "ram_mb": 8192,
        "instances": 2,
        "zone": "az1",
        "start_time": ts(now + timedelta(hours=1)),
        "end_time": ts(now + timedelta(hours=5)),
    }
    return qpb.CreateComputeReservationRequest(request_id=rid, **(fields | kw))  # type: ignore[arg-type]


async def test_reservation_create_get_list_terminate(api: Api) -> None:
    made = await api.reservations.CreateComputeReservation(reserve(), metadata=md("t1"))
    assert made.status == qpb.RESERVATION_STATUS_RESERVED
    assert (made.tenant_id, made.vcpus, made.instances) == ("t1", 4, 2)
    assert made.expiry_time == made.end_time
    get = qpb.GetComputeReservationRequest(reservation_id=made.reservation_id)
    assert await api.reservations.GetComputeReservation(get, metadata=md("t1")) == made
    await fails(api.reservations.GetComputeReservation(get, metadata=md("t2")), Code.NOT_FOUND)

    model = api.node.node.model  # type: ignore[union-attr]
    now = datetime.now(UTC)
    active = quotas.active_reservations(model, now)
    assert [r.reservation_id for r in active] == [made.reservation_id]
    assert not active[0].started(now)
    assert quotas.active_reservations(model, now + timedelta(hours=6)) == []

    listed = await api.reservations.ListComputeReservations(
        qpb.ListComputeReservationsRequest(), metadata=md("t2")
    )
    assert list(listed.reservations) == []
    term = qpb.TerminateComputeReservationRequest(
        request_id="r-2", reservation_id=made.reservation_id
    )
    done = await api.reservations.TerminateComputeReservation(term, metadata=md("t1"))
    assert done.status == qpb.RESERVATION_STATUS_TERMINATED and done.terminated_at
    term.request_id = "r-3"
    await fails(
        api.reservations.TerminateComputeReservation(term, metadata=md("t1")),
        Code.FAILED_PRECONDITION,
    )
    listed = await api.reservations.ListComputeReservations(
        qpb.ListComputeReservationsRequest(status=qpb.RESERVATION_STATUS_TERMINATED),
        metadata=md("t1"),
    )
    assert [r.reservation_id for r in listed.reservations] == [made.reservation_id]
    assert quotas.active_reservations(model, now) == []


async def test_reservation_times_and_sizes_are_checked(api: Api) -> None:
    now = datetime.now(UTC)
    cases = [
        (reserve(end_time=ts(now)), {"end_time"}),
        (reserve(start_time=ts(now), end_time=ts(now - timedelta(hours=1))), {"end_time"}),
        (reserve(expiry_time=ts(now + timedelta(hours=9))), {"expiry_time"}),
        (
            qpb.CreateComputeReservationRequest(request_id="r-9"),
            {"vcpus", "ram_mb", "instances", "start_time", "end_time"},
        ),
    ]
    for request, fields in cases:
        err = await fails(
            api.reservations.CreateComputeReservation(request, metadata=md("t1")),
            Code.INVALID_ARGUMENT,
        )
        assert violations(err) == fields
    await fails(
        api.reservations.CreateComputeReservation(reserve(), metadata=md("t1", "reader")),
        Code.PERMISSION_DENIED,
    )
