"""`VimClient`: the one way programs (vimctl, the VNFM, the demo, tests) call the VIM.

    async with VimClient(["10.0.0.1:50051", "10.0.0.2:50051"], token=token,
                         tls_ca=Path("ca.pem")) as vim:
        flavour = await vim.flavours.CreateFlavour(CreateFlavourRequest(name="m1", ...))
        same = await vim.flavours.GetFlavour(GetFlavourRequest(flavour_id=flavour.flavour_id))
        async for event in vim.events.Watch(WatchEventsRequest()):
            ...

Any generated stub works without changing this module, typed:
`vim.stub(compute_pb2_grpc.ComputeStub).CreateServer(...)`, or untyped by name:
`await vim.unary(ComputeStub, "CreateServer", request)` and
`vim.stream(EventLogStub, "Watch", request)`. What every call gets (token,
correlation id, min-position, deadline, retries on another node, request ids,
resumed streams) is described in `vim.client.channel`.

TLS: with `tls_ca` the client verifies the nodes' certificates against that CA
(and presents `tls_cert`/`tls_key` when the nodes require mutual TLS); without
it the client speaks plaintext, which only `vim-api --insecure` accepts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc

from vim._gen.vim.v1 import admin_pb2_grpc, events_pb2_grpc, flavours_pb2_grpc
from vim.client.channel import (
    CallOptions,
    Endpoints,
    Metadata,
    RetryingChannel,
    RetryPolicy,
    StreamCall,
)

S = TypeVar("S")
StubFactory = Callable[[grpc.aio.Channel], S]


class VimClient:
    """Calls to a set of API nodes; use as `async with`, or call `close()`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        token: str | None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        tls_server_name: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 5,
        backoff_s: float = 0.05,
        max_backoff_s: float = 2.0,
    ) -> None:
        creds = _credentials(tls_ca, tls_cert, tls_key)
        options: list[tuple[str, Any]] = []
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        self._options = CallOptions(
            token=token,
            timeout_s=timeout_s,
            policy=RetryPolicy(retries=retries, base_s=backoff_s, max_s=max_backoff_s),
        )
        self.channel = RetryingChannel(Endpoints(endpoints, creds, options), self._options)
        """A `grpc.aio.Channel` for any generated stub; every call through it is wrapped."""
        self._stubs: dict[Any, Any] = {}

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.channel.endpoints.targets

    @property
    def position(self) -> int:
        """The newest log position seen in a response; sent as `x-vim-min-position`."""
        return self._options.position

    def observe(self, position: int) -> None:
        """Require later reads to reflect `position` (learnt elsewhere, e.g. from a Watch)."""
        self._options.position = max(self._options.position, position)

    def stub(self, factory: StubFactory[S]) -> S:
        """The stub of a service (a generated `...Stub` class) on this client; cached."""
        found = self._stubs.get(factory)
        if found is None:
            found = self._stubs[factory] = factory(self.channel)
        return found

    async def unary(
        self,
        factory: StubFactory[Any],
        method: str,
        request: Any,
        *,
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
        endpoint: str | None = None,
        correlation_id: str | None = None,
    ) -> Any:
        """Call a unary method by name, e.g. `unary(FlavoursStub, "GetFlavour", req)`."""
        call = getattr(self.stub(factory), method)
        return await call(
            request,
            timeout=timeout_s,
            metadata=metadata,
            endpoint=endpoint,
            correlation_id=correlation_id,
        )

    def stream(
        self,
        factory: StubFactory[Any],
        method: str,
        request: Any,
        *,
        timeout_s: float | None = None,
        metadata: Metadata | None = None,
        endpoint: str | None = None,
        correlation_id: str | None = None,
        resume: bool | None = None,
    ) -> StreamCall[Any]:
        """A server stream by name; Watch-like streams resume where they broke off."""
        call = getattr(self.stub(factory), method)
        result: StreamCall[Any] = call(
            request,
            timeout=timeout_s,
            metadata=metadata,
            endpoint=endpoint,
            correlation_id=correlation_id,
            resume=resume,
        )
        return result

    @property
    def events(self) -> events_pb2_grpc.EventLogAsyncStub:
        return self.stub(events_pb2_grpc.EventLogStub)

    @property
    def flavours(self) -> flavours_pb2_grpc.FlavoursAsyncStub:
        return self.stub(flavours_pb2_grpc.FlavoursStub)

    @property
    def admin(self) -> admin_pb2_grpc.AdminAsyncStub:
        return self.stub(admin_pb2_grpc.AdminStub)

    @property
    def health(self) -> Any:
        """grpc.health.v1.Health (needs no token)."""
        return self.stub(health_pb2_grpc.HealthStub)

    async def close(self) -> None:
        """Close every channel; open calls end with CANCELLED. Safe to call twice."""
        await self.channel.close()

    async def __aenter__(self) -> VimClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()


def _credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials | None:
    if ca is None:
        if cert or key:
            raise ValueError("a client certificate needs tls_ca (TLS) as well")
        return None
    if (cert is None) != (key is None):
        raise ValueError("tls_cert and tls_key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
