"""The one mapping from the project's error tree (`vim/errors.py`) to gRPC statuses.

Every servicer method is wrapped by `@rpc`: a `VimError` ends the call with its
status (INVALID_ARGUMENT carries a `google.rpc.BadRequest` naming every bad
field); anything else is a bug, logged with its traceback and reported as
INTERNAL without leaking details. Bad input must therefore always be caught as
an `InvalidInput` before it can raise anything else.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status

from vim.errors import (
    AlreadyExists,
    DomainError,
    FieldViolation,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    VersionConflict,
    VimError,
)

logger = structlog.get_logger("vim.api")

_CODES: tuple[tuple[type[VimError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (DomainError, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (VersionConflict, grpc.StatusCode.ABORTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
)


class _Context(Protocol):
    async def abort_with_status(self, status: grpc.Status) -> NoReturn: ...


def status_code_for(exc: VimError) -> grpc.StatusCode:
    """The gRPC code for a project error (INTERNAL only for an unmapped subclass)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def to_status(exc: VimError) -> grpc.Status:
    code = status_code_for(exc)
    status = status_pb2.Status(code=code.value[0], message=exc.message)
    if isinstance(exc, InvalidInput) and exc.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in exc.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad)
        status.details.append(detail)
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort_for(context: _Context, exc: VimError) -> NoReturn:
    """End the RPC with the error's status, and a BadRequest detail for field violations."""
    await context.abort_with_status(to_status(exc))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def refuse(violations: list[FieldViolation]) -> None:
    """Raise InvalidInput listing every violation, if there are any."""
    if violations:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations[:5])
        raise InvalidInput(f"invalid request: {summary}", violations)


M = TypeVar("M", bound=Callable[..., Awaitable[Any]])


def rpc(method: M) -> M:
    """Wrap a unary servicer method: project errors become statuses, bugs INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await method(self, request, context)
        except VimError as exc:
            await abort_for(context, exc)
        except (grpc.aio.AbortError, grpc.aio.BaseError):
            raise
        except Exception:
            logger.exception("unexpected error", method=method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged on the node)")

    return wrapper  # type: ignore[return-value]
