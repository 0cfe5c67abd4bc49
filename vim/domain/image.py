"""Software images (IFA005 "software image"): what servers boot from.

An image belongs to the tenant that added it. PRIVATE images are seen by that
tenant only (and admins); PUBLIC images by everyone. Only name, metadata and the
minimum sizes change after adding; the bits (format, size, checksum, location)
never do: a different image is a new image. Deleting leaves a tombstone, so
servers booted from it keep their copy of what they need. Stream: `image-<id>`.

Who may do what (PUBLIC needs an admin, only the owner changes an image) is the
API's business; this module only keeps the state consistent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.errors import FieldViolation, InvalidInput, InvalidTransition, NotFound

KIND = "image"
ACTIVE = "ACTIVE"
PRIVATE = "PRIVATE"
PUBLIC = "PUBLIC"
DISK_FORMATS = ("QCOW2", "RAW")
CONTAINER_FORMATS = ("BARE", "OVF")
VISIBILITIES = (PRIVATE, PUBLIC)
MAX_METADATA = 128


def stream(image_id: str) -> str:
    return f"{KIND}-{image_id}"


@dataclass(frozen=True, slots=True)
class ImageAdded(DomainEvent):
    image_id: str
    tenant_id: str
    name: str
    container_format: str
    disk_format: str
    min_disk_gb: int
    min_ram_mb: int
    size_bytes: int
    checksum: str
    visibility: str
    location: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class ImageUpdated(DomainEvent):
    """Fields that are None did not change; metadata keys are removed, then set."""

    image_id: str
    name: str | None = None
    min_disk_gb: int | None = None
    min_ram_mb: int | None = None
    set_metadata: dict[str, str] = field(default_factory=dict)
    remove_metadata: list[str] = field(default_factory=list)
    updated_at: str = ""


@dataclass(frozen=True, slots=True)
class ImageDeleted(DomainEvent):
    image_id: str
    deleted_at: str = ""


@dataclass(frozen=True, slots=True)
class Image:
    image_id: str
    name: str
    tenant_id: str
    visibility: str
    min_disk_gb: int
    min_ram_mb: int
    container_format: str
    disk_format: str
    size_bytes: int
    checksum: str
    location: str
    metadata: dict[str, str]
    created_at: str
    updated_at: str
    status: str = ACTIVE
    deleted: bool = False

    def visible_to(self, tenant: str, is_admin: bool) -> bool:
        """Whether a caller of `tenant` sees this image (deleted ones are seen by none)."""
        if self.deleted:
            return False
        return is_admin or self.visibility == PUBLIC or self.tenant_id == tenant

    def view(self) -> dict[str, Any]:
        """The proto3 JSON view of the image (the API's `Image` message)."""
        return {
            "imageId": self.image_id,
            "name": self.name,
            "tenantId": self.tenant_id,
            "containerFormat": f"CONTAINER_FORMAT_{self.container_format}",
            "diskFormat": f"DISK_FORMAT_{self.disk_format}",
            "minDiskGb": str(self.min_disk_gb),
            "minRamMb": str(self.min_ram_mb),
            "sizeBytes": str(self.size_bytes),
            "checksum": self.checksum,
            "visibility": f"VISIBILITY_{self.visibility}",
            "location": self.location,
            "metadata": dict(self.metadata),
            "status": f"IMAGE_STATUS_{self.status}",
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }


def _updated(s: Image, e: ImageUpdated) -> Image:
    metadata = {k: v for k, v in s.metadata.items() if k not in e.remove_metadata}
    metadata |= e.set_metadata
    return replace(
        s,
        name=s.name if e.name is None else e.name,
        min_disk_gb=s.min_disk_gb if e.min_disk_gb is None else e.min_disk_gb,
        min_ram_mb=s.min_ram_mb if e.min_ram_mb is None else e.min_ram_mb,
        metadata=metadata,
        updated_at=e.updated_at,
    )


def evolve(state: Image | None, event: DomainEvent, _recorded: object = None) -> Image:
    match event:
        case ImageAdded():
            return Image(
                image_id=event.image_id,
                name=event.name,
                tenant_id=event.tenant_id,
                visibility=event.visibility,
                min_disk_gb=event.min_disk_gb,
                min_ram_mb=event.min_ram_mb,
                container_format=event.container_format,
                disk_format=event.disk_format,
                size_bytes=event.size_bytes,
                checksum=event.checksum,
                location=event.location,
                metadata=dict(event.metadata),
                created_at=event.created_at,
                updated_at=event.created_at,
            )
        case ImageUpdated() if state is not None:
            return _updated(state, event)
        case ImageDeleted() if state is not None:
            return replace(state, deleted=True, updated_at=event.deleted_at)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before ImageAdded")
    return state


def add(added: ImageAdded) -> ImageAdded:
    """Check an image's formats and visibility; the API validated the rest."""
    if added.disk_format not in DISK_FORMATS:
        raise ValueError(f"unknown disk format {added.disk_format!r}")
    if added.container_format not in CONTAINER_FORMATS:
        raise ValueError(f"unknown container format {added.container_format!r}")
    if added.visibility not in VISIBILITIES:
        raise ValueError(f"unknown visibility {added.visibility!r}")
    return added


def update(
    state: Image | None,
    image_id: str,
    changes: Mapping[str, Any],
    set_metadata: Mapping[str, str],
    remove_metadata: Sequence[str],
    now: str,
) -> ImageUpdated:
    """Change name and/or min sizes (`changes`) and metadata; at most 128 entries remain."""
    if state is None or state.deleted:
        raise NotFound(f"image {image_id} not found")
    unknown = set(changes) - {"name", "min_disk_gb", "min_ram_mb"}
    if unknown:
        raise ValueError(f"images cannot change {sorted(unknown)}")
    kept = {k for k in state.metadata if k not in remove_metadata} | set(set_metadata)
    if len(kept) > MAX_METADATA:
        raise InvalidInput(
            f"an image has at most {MAX_METADATA} metadata entries; this would leave {len(kept)}",
            [FieldViolation("set_metadata", f"at most {MAX_METADATA} entries in all")],
        )
    return ImageUpdated(
        image_id,
        name=changes.get("name"),
        min_disk_gb=changes.get("min_disk_gb"),
        min_ram_mb=changes.get("min_ram_mb"),
        set_metadata=dict(set_metadata),
        remove_metadata=list(remove_metadata),
        updated_at=now,
    )


def delete(state: Image | None, image_id: str, now: str) -> ImageDeleted:
    if state is None or state.deleted:
        raise NotFound(f"image {image_id} not found")
    return ImageDeleted(image_id, now)
