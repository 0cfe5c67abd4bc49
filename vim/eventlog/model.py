"""The event envelope and the shapes of appends and their results.

An append names one or more streams, each at an expected version, and the events
for each. It is all or nothing: every stream moves, or none does. The metadata is
shared by every event in the append (one request makes one append), and carries
the audit trail: tenant, actor, request id, correlation and causation ids, and
the fencing token of a leader.

Validation (`prepare`) happens before anything is queued for the database, so bad
input never reaches a transaction: stream ids and event types have a fixed shape,
data must be JSON (no NaN, no non-string keys, no objects JSON cannot carry) and
the encoded size of an append is bounded.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from vim.errors import FieldViolation, InvalidEvent

ANY_VERSION = -1
"""Expected version meaning "do not check" (for streams with a single writer)."""
NO_STREAM = 0
"""Expected version meaning "the stream must not exist yet"."""

DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_EVENTS_PER_APPEND = 10_000

STREAM_ID_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}-[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")
EVENT_TYPE_RE = re.compile(r"^[A-Z][A-Za-z0-9]{0,99}$")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$")


@dataclass(frozen=True, slots=True)
class Metadata:
    """Who, why and under which authority; stored with every event of an append."""

    tenant: str | None = None
    actor: str | None = None
    request_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    fencing_role: str | None = None
    fencing_token: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in _metadata_items(self) if v is not None}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Metadata:
        return cls(**{k: raw.get(k) for k in _METADATA_FIELDS})


_METADATA_FIELDS = (
    "tenant",
    "actor",
    "request_id",
    "correlation_id",
    "causation_id",
    "fencing_role",
    "fencing_token",
)


def _metadata_items(m: Metadata) -> list[tuple[str, Any]]:
    return [(k, getattr(m, k)) for k in _METADATA_FIELDS]


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event about to be appended: its type, schema version and JSON data."""

    type: str
    data: Mapping[str, Any]
    schema_version: int = 1
    event_id: str = field(default_factory=lambda: str(uuid.uuid4()))


@dataclass(frozen=True, slots=True)
class StreamAppend:
    """Events for one stream, valid only if the stream is at `expected_version`."""

    stream_id: str
    expected_version: int
    events: Sequence[NewEvent]


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """One atomic append over one or more streams.

    With `metadata.request_id` set, the append is idempotent: the request id is
    recorded in the same transaction, a repeat returns the first result (and its
    `response`) without writing, and a repeat whose `fingerprint` differs is
    refused. The fingerprint defaults to a hash of the streams and events.
    """

    streams: Sequence[StreamAppend]
    metadata: Metadata = Metadata()
    fingerprint: str | None = None
    response: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an append landed; `replayed` is True when a request id was repeated."""

    first_position: int
    last_position: int
    versions: Mapping[str, int]
    recorded_at: datetime
    request_id: str | None = None
    response: Mapping[str, Any] | None = None
    replayed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "first_position": self.first_position,
            "last_position": self.last_position,
            "versions": dict(self.versions),
            "recorded_at": self.recorded_at.isoformat(),
            "request_id": self.request_id,
            "response": None if self.response is None else dict(self.response),
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], *, replayed: bool) -> AppendResult:
        return cls(
            first_position=int(raw["first_position"]),
            last_position=int(raw["last_position"]),
            versions={str(k): int(v) for k, v in raw["versions"].items()},
            recorded_at=datetime.fromisoformat(raw["recorded_at"]),
            request_id=raw.get("request_id"),
            response=raw.get("response"),
            replayed=replayed,
        )


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event as stored: its global position, stream version and envelope."""

    position: int
    stream_id: str
    version: int
    event_id: str
    type: str
    schema_version: int
    data: Mapping[str, Any]
    metadata: Metadata
    recorded_at: datetime

    @property
    def stream_kind(self) -> str:
        """The aggregate kind, the stream id's prefix (`server` in `server-42`)."""
        return self.stream_id.split("-", 1)[0]


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """A validated event with its data already encoded as canonical JSON."""

    event_id: str
    type: str
    schema_version: int
    data_json: str


@dataclass(frozen=True, slots=True)
class EncodedStream:
    stream_id: str
    expected_version: int
    events: tuple[EncodedEvent, ...]


@dataclass(frozen=True, slots=True)
class PreparedAppend:
    """An append that passed validation, ready for the writer."""

    streams: tuple[EncodedStream, ...]
    metadata: Metadata
    metadata_json: str
    fingerprint: str
    response: Mapping[str, Any] | None

    @property
    def event_count(self) -> int:
        return sum(len(s.events) for s in self.streams)


def encode_json(value: Any) -> str:
    """Canonical JSON (sorted keys, no NaN); raises TypeError/ValueError when not JSON."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def prepare(req: AppendRequest, *, max_payload_bytes: int) -> PreparedAppend:
    """Validate and encode an append; raises InvalidEvent listing every bad field."""
    violations: list[FieldViolation] = []
    _check_metadata(req.metadata, violations)
    if not req.streams:
        violations.append(FieldViolation("streams", "an append needs at least one stream"))
    streams: list[EncodedStream] = []
    seen: set[str] = set()
    size = 0
    count = 0
    for i, s in enumerate(req.streams):
        encoded = _encode_stream(i, s, seen, violations)
        count += len(encoded.events)
        size += sum(len(e.data_json) for e in encoded.events)
        streams.append(encoded)
    if count > MAX_EVENTS_PER_APPEND:
        violations.append(
            FieldViolation("streams", f"{count} events exceed the limit {MAX_EVENTS_PER_APPEND}")
        )
    if size > max_payload_bytes:
        violations.append(
            FieldViolation(
                "streams", f"payload of {size} bytes exceeds the limit of {max_payload_bytes}"
            )
        )
    if violations:
        raise InvalidEvent(
            "append refused: " + "; ".join(v.description for v in violations[:5]), violations
        )
    return PreparedAppend(
        streams=tuple(streams),
        metadata=req.metadata,
        metadata_json=encode_json(req.metadata.to_json()),
        fingerprint=req.fingerprint or _fingerprint(streams),
        response=req.response,
    )


def _encode_stream(
    i: int, s: StreamAppend, seen: set[str], violations: list[FieldViolation]
) -> EncodedStream:
    where = f"streams[{i}]"
    if not isinstance(s.stream_id, str) or not STREAM_ID_RE.match(s.stream_id):
        violations.append(
            FieldViolation(
                f"{where}.stream_id",
                f"stream id {s.stream_id!r} is not of the form <kind>-<id> "
                "(kind: lowercase letters, digits, _; id: letters, digits, . _ : -)",
            )
        )
    elif s.stream_id in seen:
        violations.append(FieldViolation(f"{where}.stream_id", "stream named twice in one append"))
    seen.add(str(s.stream_id))
    if not isinstance(s.expected_version, int) or s.expected_version < ANY_VERSION:
        violations.append(
            FieldViolation(f"{where}.expected_version", "must be -1 (any), 0 (new) or a version")
        )
    if not s.events:
        violations.append(FieldViolation(f"{where}.events", "at least one event is needed"))
    events = tuple(
        _encode_event(f"{where}.events[{j}]", e, violations) for j, e in enumerate(s.events)
    )
    return EncodedStream(s.stream_id, s.expected_version, events)


def _encode_event(where: str, e: NewEvent, violations: list[FieldViolation]) -> EncodedEvent:
    if not isinstance(e.type, str) or not EVENT_TYPE_RE.match(e.type):
        violations.append(
            FieldViolation(f"{where}.type", f"event type {e.type!r} must be PascalCase, ≤ 100")
        )
    if not isinstance(e.schema_version, int) or not 1 <= e.schema_version <= 1000:
        violations.append(FieldViolation(f"{where}.schema_version", "must be 1..1000"))
    data_json = ""
    if not isinstance(e.data, Mapping):
        violations.append(FieldViolation(f"{where}.data", "event data must be a JSON object"))
    else:
        try:
            data_json = encode_json(e.data)
        except (TypeError, ValueError) as exc:
            violations.append(FieldViolation(f"{where}.data", f"event data is not JSON: {exc}"))
    if not isinstance(e.event_id, str) or not 1 <= len(e.event_id) <= 64:
        violations.append(FieldViolation(f"{where}.event_id", "1-64 characters expected"))
    return EncodedEvent(str(e.event_id), e.type, e.schema_version, data_json)


def _check_metadata(m: Metadata, violations: list[FieldViolation]) -> None:
    if m.request_id is not None and not REQUEST_ID_RE.match(m.request_id):
        violations.append(
            FieldViolation("metadata.request_id", "1-128 letters, digits, . _ : - expected")
        )
    if (m.fencing_role is None) != (m.fencing_token is None):
        violations.append(
            FieldViolation("metadata.fencing_token", "fencing role and token go together")
        )
    if m.fencing_role is not None and not ROLE_RE.match(m.fencing_role):
        violations.append(FieldViolation("metadata.fencing_role", "lowercase role name expected"))
    if m.fencing_token is not None and (
        not isinstance(m.fencing_token, int) or m.fencing_token < 0
    ):
        violations.append(FieldViolation("metadata.fencing_token", "must be a non-negative int"))
    for name in ("tenant", "actor", "correlation_id", "causation_id"):
        value = getattr(m, name)
        if value is not None and (not isinstance(value, str) or len(value) > 256):
            violations.append(FieldViolation(f"metadata.{name}", "a string of ≤ 256 expected"))


def _fingerprint(streams: Sequence[EncodedStream]) -> str:
    h = hashlib.sha256()
    for s in streams:
        h.update(f"{s.stream_id}\0{s.expected_version}\0".encode())
        for e in s.events:
            h.update(f"{e.type}\0{e.schema_version}\0{e.data_json}\0".encode())
    return h.hexdigest()
