"""The `vim.v1.Images` service: software images, tenant-owned, PRIVATE or PUBLIC.

Follows the Flavours pattern (`vim/api/flavours.py`). Visibility is enforced
here, in one place, `find_image`: an image the caller may not see answers
NOT_FOUND exactly like one that never existed, so tenants cannot probe for each
other's ids. Admins see every image. Changing an image needs the owning tenant
(member role) or an admin; a tenant that only sees someone else's PUBLIC image
gets PERMISSION_DENIED. Making an image PUBLIC needs an admin.

`find_image` is also what the compute service uses to resolve a server's image.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from vim._gen.vim.v1 import images_pb2 as pb
from vim._gen.vim.v1 import images_pb2_grpc
from vim.api import validation as v
from vim.api.auth import READ, WRITE
from vim.api.errors import refuse, rpc
from vim.api.node import Ctx, Node, view_to
from vim.app.commands import Change, Decision, Principal
from vim.domain import image
from vim.errors import FieldViolation, NotFound, PermissionDenied
from vim.projections.readmodel import ReadModel, register_kind

SERVICE_NAME = "vim.v1.Images"
register_kind(image.KIND, image.evolve)

MAX_DISK_GB = 64 * 1024
MAX_RAM_MB = 16 * 1024 * 1024
MAX_SIZE_BYTES = 1 << 44  # 16 TiB
MAX_LOCATION = 2048
LOCATION_SCHEMES = ("http", "https", "file")
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def find_image(model: ReadModel, principal: Principal, image_id: str) -> image.Image:
    """A live image the caller may see (its tenant's, PUBLIC, or any for admins), or NotFound."""
    entry = model.get(image.stream(image_id))
    if entry is None or not entry.state.visible_to(principal.tenant, principal.is_admin):
        raise NotFound(f"image {image_id} not found")
    found: image.Image = entry.state
    return found


def visible(model: ReadModel, principal: Principal) -> list[image.Image]:
    """Every live image the caller may see, by name then id."""
    images = [
        e.state
        for _, e in model.of_kind(image.KIND)
        if e.state.visible_to(principal.tenant, principal.is_admin)
    ]
    return sorted(images, key=lambda i: (i.name, i.image_id))


def _owned(model: ReadModel, principal: Principal, image_id: str) -> image.Image:
    """A visible image the caller may change: its tenant's, or any for admins."""
    found = find_image(model, principal, image_id)
    if not principal.is_admin and found.tenant_id != principal.tenant:
        raise PermissionDenied(f"image {image_id} belongs to another tenant; it cannot change it")
    return found


def _suffix(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix)


def _location(value: str, out: list[FieldViolation]) -> None:
    if not value:
        return
    parts = urlsplit(value)
    ok = parts.scheme in LOCATION_SCHEMES and (parts.netloc or parts.scheme == "file")
    if len(value) > MAX_LOCATION or not ok or any(c.isspace() for c in value):
        out.append(
            FieldViolation("location", f"an {'/'.join(LOCATION_SCHEMES)} URL, ≤ {MAX_LOCATION}")
        )


def _check_add(request: pb.AddImageRequest, principal: Principal) -> None:
    bad: list[FieldViolation] = []
    v.name("name", request.name, bad)
    v.enum("disk_format", request.disk_format, [pb.DISK_FORMAT_QCOW2, pb.DISK_FORMAT_RAW], bad)
    v.enum("container_format", request.container_format, list(pb.ContainerFormat.values()), bad)
    v.enum("visibility", request.visibility, list(pb.Visibility.values()), bad)
    v.in_range("min_disk_gb", request.min_disk_gb, 0, MAX_DISK_GB, bad)
    v.in_range("min_ram_mb", request.min_ram_mb, 0, MAX_RAM_MB, bad)
    v.in_range("size_bytes", request.size_bytes, 1, MAX_SIZE_BYTES, bad)
    if not _SHA256_RE.match(request.checksum):
        bad.append(FieldViolation("checksum", "a SHA-256 digest: 64 hex digits"))
    _location(request.location, bad)
    v.string_map("metadata", request.metadata, bad)
    refuse(bad)
    if request.visibility == pb.VISIBILITY_PUBLIC and not principal.is_admin:
        raise PermissionDenied("only an admin may add a PUBLIC image")


def _added(request: pb.AddImageRequest, principal: Principal, image_id: str) -> image.ImageAdded:
    container = request.container_format or pb.CONTAINER_FORMAT_BARE
    visibility = request.visibility or pb.VISIBILITY_PRIVATE
    return image.add(
        image.ImageAdded(
            image_id=image_id,
            tenant_id=principal.tenant,
            name=request.name,
            container_format=_suffix(pb.ContainerFormat.Name(container), "CONTAINER_FORMAT_"),
            disk_format=_suffix(pb.DiskFormat.Name(request.disk_format), "DISK_FORMAT_"),
            min_disk_gb=request.min_disk_gb,
            min_ram_mb=request.min_ram_mb,
            size_bytes=request.size_bytes,
            checksum=request.checksum.lower(),
            visibility=_suffix(pb.Visibility.Name(visibility), "VISIBILITY_"),
            location=request.location,
            metadata=dict(request.metadata),
            created_at=v.now(),
        )
    )


def _changes(request: pb.UpdateImageRequest) -> dict[str, Any]:
    """The validated name and size changes of an update (InvalidInput otherwise)."""
    bad: list[FieldViolation] = []
    v.resource_id("image_id", request.image_id, bad)
    changes: dict[str, Any] = {}
    if request.HasField("name"):
        v.name("name", request.name, bad)
        changes["name"] = request.name
    if request.HasField("min_disk_gb"):
        v.in_range("min_disk_gb", request.min_disk_gb, 0, MAX_DISK_GB, bad)
        changes["min_disk_gb"] = request.min_disk_gb
    if request.HasField("min_ram_mb"):
        v.in_range("min_ram_mb", request.min_ram_mb, 0, MAX_RAM_MB, bad)
        changes["min_ram_mb"] = request.min_ram_mb
    v.string_map("set_metadata", request.set_metadata, bad)
    for i, key in enumerate(request.remove_metadata):
        if not key or len(key) > v.NAME_MAX:
            bad.append(FieldViolation(f"remove_metadata[{i}]", "keys are 1-255 characters"))
    if not (changes or request.set_metadata or request.remove_metadata):
        bad.append(FieldViolation("name", "nothing to change: give at least one field"))
    refuse(bad)
    return changes


class ImagesServicer(images_pb2_grpc.ImagesServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @rpc
    async def AddImage(self, request: pb.AddImageRequest, context: Ctx) -> pb.Image:
        principal = await self._node.caller(context, WRITE, "AddImage")
        _check_add(request, principal)
        ctx = self._node.command(principal, request, "AddImage", context)
        event = _added(request, principal, v.new_id())

        def decide(_model: ReadModel) -> Decision:
            return Decision(
                [Change(image.stream(event.image_id), 0, [event])],
                image.evolve(None, event).view(),
            )

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _image(out.response)

    @rpc
    async def GetImage(self, request: pb.GetImageRequest, context: Ctx) -> pb.Image:
        principal = await self._node.caller(context, READ, "GetImage")
        bad: list[FieldViolation] = []
        v.resource_id("image_id", request.image_id, bad)
        refuse(bad)
        found = find_image(self._node.model, principal, request.image_id)
        self._node.answered(context)
        return _image(found.view())

    @rpc
    async def ListImages(
        self, request: pb.ListImagesRequest, context: Ctx
    ) -> pb.ListImagesResponse:
        principal = await self._node.caller(context, READ, "ListImages")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        v.enum("disk_format", request.disk_format, list(pb.DiskFormat.values()), bad)
        v.enum("visibility", request.visibility, list(pb.Visibility.values()), bad)
        refuse(bad)
        items = [i for i in visible(self._node.model, principal) if _matches(request, i)]
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.ListImagesResponse(images=[_image(i.view()) for i in chunk], page=page)

    @rpc
    async def UpdateImage(self, request: pb.UpdateImageRequest, context: Ctx) -> pb.Image:
        principal = await self._node.caller(context, WRITE, "UpdateImage")
        changes = _changes(request)
        ctx = self._node.command(principal, request, "UpdateImage", context)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            state = _owned(model, principal, request.image_id)
            event = image.update(
                state,
                request.image_id,
                changes,
                dict(request.set_metadata),
                list(request.remove_metadata),
                at,
            )
            sid = image.stream(request.image_id)
            return Decision(
                [Change(sid, model.version(sid), [event])], image.evolve(state, event).view()
            )

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _image(out.response)

    @rpc
    async def DeleteImage(
        self, request: pb.DeleteImageRequest, context: Ctx
    ) -> pb.DeleteImageResponse:
        principal = await self._node.caller(context, WRITE, "DeleteImage")
        bad: list[FieldViolation] = []
        v.resource_id("image_id", request.image_id, bad)
        refuse(bad)
        ctx = self._node.command(principal, request, "DeleteImage", context)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            state = _owned(model, principal, request.image_id)
            event = image.delete(state, request.image_id, at)
            sid = image.stream(request.image_id)
            return Decision(
                [Change(sid, model.version(sid), [event])], {"imageId": request.image_id}
            )

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return pb.DeleteImageResponse(image_id=str(out.response["imageId"]))


def _matches(request: pb.ListImagesRequest, i: image.Image) -> bool:
    if request.name and i.name != request.name:
        return False
    if request.disk_format and i.disk_format != _suffix(
        pb.DiskFormat.Name(request.disk_format), "DISK_FORMAT_"
    ):
        return False
    return not request.visibility or i.visibility == _suffix(
        pb.Visibility.Name(request.visibility), "VISIBILITY_"
    )


def _image(view: dict[str, Any] | Any) -> pb.Image:
    msg = pb.Image()
    view_to(msg, dict(view))
    return msg
