"""The project's exception tree; every layer raises these, `api/errors.py` maps them to gRPC.

```
VimError
├─ InvalidInput          -> INVALID_ARGUMENT (carries field violations)
│   └─ InvalidEvent          bad stream id, event type, oversized or non-JSON payload
├─ DomainError           -> FAILED_PRECONDITION
│   ├─ InvalidTransition
│   ├─ IdempotencyConflict   a request id reused with a different body
│   └─ FencedOut             a write carries a fencing token older than the newest seen
├─ NotFound              -> NOT_FOUND
├─ AlreadyExists         -> ALREADY_EXISTS
├─ Unauthenticated       -> UNAUTHENTICATED (no or invalid credentials)
├─ PermissionDenied      -> PERMISSION_DENIED (valid credentials, role not allowed)
├─ VersionConflict       -> ABORTED (safe to retry after reloading)
└─ Unavailable           -> UNAVAILABLE (safe to retry, same request id)
    └─ EventLogUnavailable   the database cannot be reached, or an outcome is unknown
```

The type tells a caller whether a retry makes sense: `retryable` is True only for
VersionConflict and Unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field: a dotted path into the request and what is wrong with it."""

    field: str
    description: str


class VimError(Exception):
    """Base of every error the control plane raises on purpose."""

    retryable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(VimError):
    """The caller sent something malformed; never retry unchanged."""

    def __init__(self, message: str, violations: list[FieldViolation] | None = None) -> None:
        super().__init__(message)
        self.violations = violations or []


class InvalidEvent(InvalidInput):
    """An append was refused before reaching the database."""


class DomainError(VimError):
    """A well-formed request that the current state does not allow."""


class InvalidTransition(DomainError):
    """The aggregate's state does not allow this command."""


class IdempotencyConflict(DomainError):
    """A request id was reused with a different body."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"request id {request_id!r} was already used for a different request; "
            "use a new request id for a new request"
        )
        self.request_id = request_id


class FencedOut(DomainError):
    """A write carried a fencing token older than the newest one seen for its role."""

    def __init__(self, role: str, token: int, newest: int) -> None:
        super().__init__(
            f"fenced out: {role} token {token} is older than the newest token {newest}; "
            "this process is no longer the leader"
        )
        self.role = role
        self.token = token
        self.newest = newest


class NotFound(VimError):
    """The resource does not exist (or belongs to another tenant)."""


class AlreadyExists(VimError):
    """A resource with this id or unique name exists already."""


class Unauthenticated(VimError):
    """No credentials, or credentials that do not verify."""


class PermissionDenied(VimError):
    """The caller is known but its roles do not allow this call."""


class VersionConflict(VimError):
    """Someone else appended to the stream first; reload and decide again."""

    retryable = True

    def __init__(self, stream_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"version conflict on {stream_id}: expected version {expected}, found {actual}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class Unavailable(VimError):
    """A dependency is down; retry later with the same request id."""

    retryable = True


class EventLogUnavailable(Unavailable):
    """The event log cannot be reached, or an append's outcome is unknown."""
