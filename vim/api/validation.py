"""Checks shared by every servicer; each returns the violations it found (never raises).

A servicer gathers every violation of a request, then calls `errors.refuse`, so
a client learns all that is wrong with a request at once.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TypeVar

from vim._gen.vim.v1 import common_pb2
from vim.errors import FieldViolation

NAME_MAX = 255
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_METADATA = 128
_NAME_RE = re.compile(r"^[^\x00-\x1f\x7f]+$")

T = TypeVar("T")


def now() -> str:
    """The API's clock: RFC 3339 UTC with milliseconds; the domain never reads a clock."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id() -> str:
    return str(uuid.uuid4())


def name(field: str, value: str, out: list[FieldViolation], *, required: bool = True) -> None:
    if not value:
        if required:
            out.append(FieldViolation(field, "must not be empty"))
        return
    if len(value) > NAME_MAX:
        out.append(FieldViolation(field, f"at most {NAME_MAX} characters"))
    elif not _NAME_RE.match(value) or value != value.strip():
        out.append(FieldViolation(field, "no control characters or surrounding spaces"))


def resource_id(field: str, value: str, out: list[FieldViolation]) -> None:
    """Ids the system assigns are UUIDs; anything else cannot exist."""
    try:
        if str(uuid.UUID(value)) == value.lower():
            return
    except ValueError:
        pass
    out.append(FieldViolation(field, f"{value[:64]!r} is not a valid id (a UUID)"))


def in_range(field: str, value: int, low: int, high: int, out: list[FieldViolation]) -> None:
    if not low <= value <= high:
        out.append(FieldViolation(field, f"must be between {low} and {high}, got {value}"))


def string_map(
    field: str, value: Mapping[str, str], out: list[FieldViolation], *, limit: int = MAX_METADATA
) -> None:
    if len(value) > limit:
        out.append(FieldViolation(field, f"at most {limit} entries"))
    for k, v in value.items():
        if not k or len(k) > NAME_MAX or len(v) > 4096:
            out.append(FieldViolation(f"{field}[{k[:40]}]", "keys 1-255, values ≤ 4096 chars"))


def enum(field: str, value: int, allowed: Sequence[int], out: list[FieldViolation]) -> None:
    if value not in allowed:
        out.append(FieldViolation(field, f"unknown or unspecified value {value}"))


def page(field: str, req: common_pb2.PageRequest, out: list[FieldViolation]) -> tuple[int, int]:
    """(offset, size) of a page request; the token is an opaque offset."""
    size = req.page_size or DEFAULT_PAGE
    if size > MAX_PAGE:
        out.append(FieldViolation(f"{field}.page_size", f"at most {MAX_PAGE}"))
    offset = 0
    if req.page_token:
        try:
            offset = int(base64.urlsafe_b64decode(req.page_token.encode()).decode())
            if offset < 0:
                raise ValueError
        except (ValueError, binascii.Error, UnicodeDecodeError):
            out.append(FieldViolation(f"{field}.page_token", "not a token this API gave out"))
    return offset, size


def paginate(items: Sequence[T], offset: int, size: int) -> tuple[list[T], common_pb2.PageResponse]:
    chunk = list(items[offset : offset + size])
    nxt = offset + size
    token = base64.urlsafe_b64encode(str(nxt).encode()).decode() if nxt < len(items) else ""
    return chunk, common_pb2.PageResponse(next_page_token=token)
