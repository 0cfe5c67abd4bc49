"""Exit codes: what a script can rely on.

| code | meaning |
|---|---|
| 0 | success |
| 1 | an unexpected failure (a bug: report it) |
| 2 | usage: bad flags, bad settings or config file |
| 3 | not found |
| 4 | not authenticated or not allowed |
| 5 | invalid argument (the API's field violations are printed) |
| 6 | refused by the current state: conflict, already exists, failed precondition, quota |
| 7 | the VIM is unavailable or did not answer in time (safe to retry: requests are idempotent) |
| 8 | the operation was accepted but ended in failure (for example a server in ERROR) |
| 9 | not confirmed: a destructive verb without `--yes` on a non-interactive terminal |
"""

from __future__ import annotations

import enum

import grpc
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_status import rpc_status


class Exit(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    NOT_FOUND = 3
    DENIED = 4
    INVALID = 5
    CONFLICT = 6
    UNAVAILABLE = 7
    OPERATION_FAILED = 8
    NOT_CONFIRMED = 9


_BY_STATUS = {
    grpc.StatusCode.NOT_FOUND: Exit.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: Exit.DENIED,
    grpc.StatusCode.PERMISSION_DENIED: Exit.DENIED,
    grpc.StatusCode.INVALID_ARGUMENT: Exit.INVALID,
    grpc.StatusCode.OUT_OF_RANGE: Exit.INVALID,
    grpc.StatusCode.ALREADY_EXISTS: Exit.CONFLICT,
    grpc.StatusCode.FAILED_PRECONDITION: Exit.CONFLICT,
    grpc.StatusCode.ABORTED: Exit.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Exit.CONFLICT,
    grpc.StatusCode.UNAVAILABLE: Exit.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Exit.UNAVAILABLE,
}


class OperationFailed(Exception):
    """An accepted operation ended badly (exit 8)."""


def exit_code(error: grpc.RpcError) -> Exit:
    code = error.code() if hasattr(error, "code") else None
    return _BY_STATUS.get(code, Exit.FAILURE) if isinstance(code, grpc.StatusCode) else Exit.FAILURE


def describe(error: grpc.RpcError) -> list[str]:
    """The status, its message and any field violations, one line each."""
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if isinstance(code, grpc.StatusCode) else "ERROR"
    lines = [f"{name}: {details}"]
    try:
        status = rpc_status.from_call(error)
    except (AttributeError, ValueError):
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            lines += [f"  {v.field}: {v.description}" for v in bad.field_violations]
    return lines
