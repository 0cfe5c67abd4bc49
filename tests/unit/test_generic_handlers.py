"""Services reach the gRPC server as generic handlers only (see `GenericHandlersOnly`)."""

from __future__ import annotations

from typing import Any

from vim._gen.vim.v1 import compute_pb2_grpc
from vim.api.server import GenericHandlersOnly


class RecordingServer:
    """Stands in for `grpc.aio.Server`: records what is registered on it."""

    def __init__(self) -> None:
        self.generic: list[Any] = []
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        self.registered.append(service)


class Details:
    method = "/vim.v1.Compute/AllocateCompute"
    invocation_metadata = ()


def test_generated_registration_reaches_the_server_as_a_generic_handler_only() -> None:
    server = RecordingServer()
    compute_pb2_grpc.add_ComputeServicer_to_server(
        compute_pb2_grpc.ComputeServicer(),
        GenericHandlersOnly(server),  # type: ignore[arg-type]
    )
    assert server.registered == []
    [handler] = server.generic
    found = handler.service(Details())
    assert found is not None and found.unary_unary is not None
    unknown = Details()
    unknown.method = "/vim.v1.Compute/NoSuchMethod"
    assert handler.service(unknown) is None
