"""`vimctl image|flavour|quota|reservation ...`."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from google.protobuf.timestamp_pb2 import Timestamp

from vim._gen.vim.v1 import (
    flavours_pb2,
    flavours_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
    quotas_pb2,
    quotas_pb2_grpc,
)
from vim.cli.output import as_dict, emit_one
from vim.cli.resources import Resource, add_common_verbs, enum_value
from vim.cli.runtime import request_id, run
from vim.cli.settings import Settings
from vim.client import VimClient

images = typer.Typer(help="Software images.")
flavours = typer.Typer(help="Compute flavours.")
quotas = typer.Typer(help="Per-tenant quotas (admin).")
reservations = typer.Typer(help="Compute capacity reservations.")

IMAGES = Resource(
    noun="image",
    stub=images_pb2_grpc.ImagesStub,
    id_field="image_id",
    list_rpc="ListImages",
    list_request=images_pb2.ListImagesRequest,
    items_field="images",
    get_rpc="GetImage",
    get_request=images_pb2.GetImageRequest,
    columns=[
        ("ID", "image_id"),
        ("NAME", "name"),
        ("FORMAT", "disk_format"),
        ("VISIBILITY", "visibility"),
        ("SIZE", "size_bytes"),
        ("STATUS", "status"),
    ],
    delete_rpc="DeleteImage",
    delete_request=images_pb2.DeleteImageRequest,
    list_filters={"name": "name", "format": "disk_format", "visibility": "visibility"},
)
FLAVOURS = Resource(
    noun="flavour",
    stub=flavours_pb2_grpc.FlavoursStub,
    id_field="flavour_id",
    list_rpc="ListFlavours",
    list_request=flavours_pb2.ListFlavoursRequest,
    items_field="flavours",
    get_rpc="GetFlavour",
    get_request=flavours_pb2.GetFlavourRequest,
    columns=[
        ("ID", "flavour_id"),
        ("NAME", "name"),
        ("VCPUS", "vcpus"),
        ("RAM MB", "ram_mb"),
        ("DISK GB", "disk_gb"),
        ("PUBLIC", "is_public"),
    ],
    delete_rpc="DeleteFlavour",
    delete_request=flavours_pb2.DeleteFlavourRequest,
)
QUOTAS = Resource(
    noun="quota",
    stub=quotas_pb2_grpc.QuotasStub,
    id_field="tenant_id",
    list_rpc="ListQuotas",
    list_request=quotas_pb2.ListQuotasRequest,
    items_field="quotas",
    get_rpc="GetQuota",
    get_request=quotas_pb2.GetQuotaRequest,
    columns=[
        ("TENANT", "tenant_id"),
        ("CORES", "limits.cores"),
        ("RAM MB", "limits.ram_mb"),
        ("INSTANCES", "limits.instances"),
        ("NETWORKS", "limits.networks"),
        ("PORTS", "limits.ports"),
        ("USED CORES", "used.cores"),
        ("USED INSTANCES", "used.instances"),
    ],
    delete_rpc="DeleteQuota",
    delete_request=quotas_pb2.DeleteQuotaRequest,
)
RESERVATIONS = Resource(
    noun="reservation",
    stub=quotas_pb2_grpc.ReservationsStub,
    id_field="reservation_id",
    list_rpc="ListComputeReservations",
    list_request=quotas_pb2.ListComputeReservationsRequest,
    items_field="reservations",
    get_rpc="GetComputeReservation",
    get_request=quotas_pb2.GetComputeReservationRequest,
    columns=[
        ("ID", "reservation_id"),
        ("TENANT", "tenant_id"),
        ("ZONE", "zone"),
        ("VCPUS", "vcpus"),
        ("RAM MB", "ram_mb"),
        ("INSTANCES", "instances"),
        ("STATUS", "status"),
        ("END", "end_time"),
    ],
    delete_rpc="TerminateComputeReservation",
    delete_request=quotas_pb2.TerminateComputeReservationRequest,
    list_filters={"status": "status"},
)
for group, res in (
    (images, IMAGES),
    (flavours, FLAVOURS),
    (quotas, QUOTAS),
    (reservations, RESERVATIONS),
):
    add_common_verbs(group, res)


@images.command("add")
def add_image(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    location: Annotated[
        str,
        typer.Option(
            help="http(s):// or file:// URL; a local path is read for its size and SHA-256."
        ),
    ],
    disk_format: Annotated[str, typer.Option(help="qcow2 or raw.")] = "qcow2",
    size_bytes: Annotated[int, typer.Option(min=0)] = 0,
    checksum: Annotated[str, typer.Option(help="SHA-256, 64 hex digits.")] = "",
    min_disk_gb: Annotated[int, typer.Option(min=0)] = 0,
    min_ram_mb: Annotated[int, typer.Option(min=0)] = 0,
    public: Annotated[bool, typer.Option(help="Visible to every tenant.")] = False,
) -> None:
    """Register a software image."""
    local = Path(location)
    if "://" not in location and local.is_file():
        size_bytes, checksum = local.stat().st_size, _sha256(local)
        location = local.resolve().as_uri()
    request = images_pb2.AddImageRequest(
        request_id=request_id(),
        name=name,
        location=location,
        container_format=images_pb2.CONTAINER_FORMAT_BARE,
        disk_format=enum_value(
            images_pb2.DiskFormat.DESCRIPTOR, "DISK_FORMAT_", disk_format, "--disk-format"
        ),
        size_bytes=size_bytes,
        checksum=checksum,
        min_disk_gb=min_disk_gb,
        min_ram_mb=min_ram_mb,
        visibility=images_pb2.VISIBILITY_PUBLIC if public else images_pb2.VISIBILITY_PRIVATE,
    )

    async def work(vim: VimClient, s: Settings) -> None:
        emit_one(
            s.output, as_dict(await vim.unary(images_pb2_grpc.ImagesStub, "AddImage", request))
        )

    run(ctx, work)


@flavours.command("create")
def create_flavour(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    vcpus: Annotated[int, typer.Option(min=1)],
    ram_mb: Annotated[int, typer.Option(min=1)],
    disk_gb: Annotated[int, typer.Option(min=0)] = 0,
    private: Annotated[bool, typer.Option(help="Not public.")] = False,
) -> None:
    """Create a compute flavour (admin)."""
    request = flavours_pb2.CreateFlavourRequest(
        request_id=request_id(),
        name=name,
        vcpus=vcpus,
        ram_mb=ram_mb,
        disk_gb=disk_gb,
        is_public=not private,
    )

    async def work(vim: VimClient, s: Settings) -> None:
        flavour = await vim.unary(flavours_pb2_grpc.FlavoursStub, "CreateFlavour", request)
        emit_one(s.output, as_dict(flavour))

    run(ctx, work)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _limits(
    cores: int, ram_mb: int, instances: int, networks: int, ports: int
) -> quotas_pb2.QuotaLimits:
    return quotas_pb2.QuotaLimits(
        cores=cores, ram_mb=ram_mb, instances=instances, networks=networks, ports=ports
    )


_Limit = Annotated[int, typer.Option(min=-1, help="-1: unlimited.")]


@quotas.command("set")
def set_quota(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Argument()],
    cores: _Limit = -1,
    ram_mb: _Limit = -1,
    instances: _Limit = -1,
    networks: _Limit = -1,
    ports: _Limit = -1,
) -> None:
    """Create the tenant's quota, or update it when it exists."""
    limits = _limits(cores, ram_mb, instances, networks, ports)

    async def work(vim: VimClient, s: Settings) -> None:
        import grpc

        try:
            quota = await vim.unary(
                quotas_pb2_grpc.QuotasStub,
                "UpdateQuota",
                quotas_pb2.UpdateQuotaRequest(
                    request_id=request_id(), tenant_id=tenant, limits=limits
                ),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            quota = await vim.unary(
                quotas_pb2_grpc.QuotasStub,
                "CreateQuota",
                quotas_pb2.CreateQuotaRequest(
                    request_id=request_id(), tenant_id=tenant, limits=limits
                ),
            )
        emit_one(s.output, as_dict(quota))

    run(ctx, work)


def _timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


@reservations.command("create")
def create_reservation(
    ctx: typer.Context,
    zone: Annotated[str, typer.Option()],
    vcpus: Annotated[int, typer.Option(min=0)] = 0,
    ram_mb: Annotated[int, typer.Option(min=0)] = 0,
    instances: Annotated[int, typer.Option(min=0)] = 0,
    hours: Annotated[float, typer.Option(min=0.0, help="How long it lasts from now.")] = 24.0,
) -> None:
    """Reserve compute capacity in a zone, starting now."""
    now = datetime.now(UTC)
    end = now + timedelta(hours=hours)
    request = quotas_pb2.CreateComputeReservationRequest(
        request_id=request_id(),
        zone=zone,
        vcpus=vcpus,
        ram_mb=ram_mb,
        instances=instances,
        start_time=_timestamp(now),
        end_time=_timestamp(end),
        expiry_time=_timestamp(end),
    )

    async def work(vim: VimClient, s: Settings) -> None:
        reservation = await vim.unary(
            quotas_pb2_grpc.ReservationsStub, "CreateComputeReservation", request
        )
        emit_one(s.output, as_dict(reservation))

    run(ctx, work)
