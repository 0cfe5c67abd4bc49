"""gRPC health checking (`grpc.health.v1.Health`) for an API node.

Load balancers, clients and `vimctl` ask `Check("")` for the node as a whole and
`Check("vim.v1.EventLog")` (and so on) per service; `Watch` streams changes.

Invariants: a node reports SERVING only after every service is registered and
the server is accepting connections, and goes NOT_SERVING (for every name, and
for good) as the first step of shutdown, before any RPC is refused, so that
clients move to another node while this one still answers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE_NAME: str = health.SERVICE_NAME
"""`grpc.health.v1.Health`."""

OVERALL = ""
"""The name that stands for the whole node."""


class Health:
    """The node's health servicer and the two transitions it goes through."""

    def __init__(self) -> None:
        # Starts NOT_SERVING: the asyncio servicer itself would say SERVING for "".
        self.servicer: Any = health.aio.HealthServicer()
        self._names: list[str] = [OVERALL]

    def add_to(self, server: Any) -> None:
        """Register the health service on `server` (before it starts)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def starting(self, names: Iterable[str]) -> None:
        """Report NOT_SERVING for the node and each named service until `serving()`."""
        self._names = [OVERALL, *names]
        for name in self._names:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def serving(self) -> None:
        """Report SERVING for the node and every service named in `starting()`."""
        for name in self._names:
            await self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def shutting_down(self) -> None:
        """NOT_SERVING for every name, and ignore any later change; idempotent."""
        await self.servicer.enter_graceful_shutdown()
