"""A `grpc.aio.Channel` over several API nodes that retries, rotates and stays consistent.

`RetryingChannel` looks like one channel to any generated stub
(`FlavoursStub(channel)`, and every service added later), but holds one real
channel per endpoint and wraps every call:

- Metadata: `authorization: Bearer <token>`, `x-correlation-id` (one per call,
  the same on every retry), and `x-vim-min-position`, the highest
  `x-vim-position` seen in any trailing metadata (also of failed calls), so a
  read on any node reflects every write this client has seen (read-your-writes).
- Deadline: every unary attempt gets one (`timeout_s` unless the call gives its
  own). Server streams get none by default: a Watch is meant to stay open.
- Retries: on UNAVAILABLE (a refused connection, a node that died or drains),
  the call moves to the next endpoint and is tried again after an exponential
  backoff with full jitter, up to `RetryPolicy.retries` times. Any other status
  is the answer and is raised as the `grpc.aio.AioRpcError` it is.
- Idempotency: a request with a string field `request_id` (every mutating
  request) that is empty gets a uuid4 before the first attempt. The same id is
  sent on every retry, so a retry after a node died mid-call returns the first
  answer instead of applying the change twice.
- Streams: a server stream is retried while nothing has been received. A
  resumable one (the request has `from_position`, each message a `position`,
  as Watch does) is also resumed after a disconnect, from the last position
  received, so it loses and repeats nothing; each message received resets the
  retry budget.

Invariants: the caller's request objects are never modified; rotation is
shared by all calls (a node found down is skipped by the next call too), and
two calls failing on the same node rotate only once. Client-streaming methods
are not supported (the VIM API has none).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, TypeVar, cast

import grpc
import structlog
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

logger = structlog.get_logger("vim.client")

POSITION_KEY = "x-vim-position"
MIN_POSITION_KEY = "x-vim-min-position"
CORRELATION_KEY = "x-correlation-id"
REQUEST_ID_FIELD = "request_id"
RESUME_FIELD = "from_position"
"""A server stream whose request has this field, and whose messages have `position`, resumes."""

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Metadata = Sequence[tuple[str, str | bytes]]
_Serializer = Callable[[Any], bytes] | None
_Deserializer = Callable[[bytes], Any] | None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often, how long apart and on which codes a call is tried again."""

    retries: int = 5
    base_s: float = 0.05
    max_s: float = 2.0
    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)] (attempt counts from 0)."""
        return random.uniform(0.0, min(self.max_s, self.base_s * 2.0**attempt))


@dataclass(slots=True)
class CallOptions:
    """What every call of one client carries; `position` only ever grows."""

    token: str | None = None
    timeout_s: float | None = 10.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    position: int = 0

    def saw(self, metadata: Any) -> None:
        """Remember the log position a response reflected (its trailing metadata)."""
        for key, value in metadata or ():  # grpc.aio.Metadata or a sequence of pairs
            if key == POSITION_KEY:
                text = value.decode() if isinstance(value, bytes) else value
                if text.isdigit():
                    self.position = max(self.position, int(text))

    def metadata(self, correlation_id: str, extra: Metadata | None) -> tuple[Any, ...]:
        """The metadata of one attempt (the min-position may have grown since the last)."""
        md: list[tuple[str, str | bytes]] = [(CORRELATION_KEY, correlation_id)]
        if self.token:
            md.append(("authorization", f"Bearer {self.token}"))
        if self.position:
            md.append((MIN_POSITION_KEY, str(self.position)))
        md.extend(extra or ())
        return tuple(md)


class Endpoints:
    """One lazily opened channel per endpoint, and which endpoint calls start at."""

    def __init__(
        self,
        targets: Sequence[str],
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not targets:
            raise ValueError("at least one endpoint is needed")
        self.targets = tuple(targets)
        self._credentials = credentials
        self._options = tuple(options)
        self._channels: dict[int, grpc.aio.Channel] = {}
        self.current = 0

    def index(self, target: str | None) -> int:
        """Where a call starts: at `target` if given (it must be one of ours), else current."""
        if target is None:
            return self.current
        try:
            return self.targets.index(target)
        except ValueError:
            raise ValueError(f"{target} is not one of {list(self.targets)}") from None

    def channel(self, index: int) -> grpc.aio.Channel:
        """The channel to endpoint `index`, opened on first use (inside the running loop)."""
        ch = self._channels.get(index)
        if ch is None:
            target = self.targets[index]
            if self._credentials is None:
                ch = grpc.aio.insecure_channel(target, options=self._options)
            else:
                ch = grpc.aio.secure_channel(target, self._credentials, options=self._options)
            self._channels[index] = ch
        return ch

    def failed(self, index: int) -> int:
        """Endpoint `index` is unavailable: move on from it (once) and return the next one."""
        following = (index + 1) % len(self.targets)
        if self.current == index:
            self.current = following
        return following

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close()


def with_request_id(request: Req) -> Req:
    """A copy with a fresh uuid4 `request_id` if it has an empty one; else the request."""
    if not isinstance(request, Message):
        return request
    fd = request.DESCRIPTOR.fields_by_name.get(REQUEST_ID_FIELD)
    if fd is None or fd.type != FieldDescriptor.TYPE_STRING or getattr(request, fd.name):
        return request
    copy = type(request)()
    copy.CopyFrom(request)
    setattr(copy, fd.name, str(uuid.uuid4()))
    return cast(Req, copy)


def _resumable(request: object) -> bool:
    return isinstance(request, Message) and RESUME_FIELD in request.DESCRIPTOR.fields_by_name


def _resumed(request: Req, position: int) -> Req:
    message = cast(Message, request)
    copy = type(message)()
    copy.CopyFrom(message)
    setattr(copy, RESUME_FIELD, position)
    return cast(Req, copy)


@dataclass(frozen=True, slots=True)
class _Method:
    path: str
    serializer: _Serializer
    deserializer: _Deserializer


class _Caller:
    """What the multicallables share: the endpoints and the per-client call options."""

    def __init__(self, endpoints: Endpoints, options: CallOptions) -> None:
        self.endpoints = endpoints
        self.options = options

    async def backoff(self, exc: grpc.aio.AioRpcError, index: int, attempt: int) -> int:
        """Rotate away from a failed endpoint and wait; returns the endpoint to try next."""
        nxt = self.endpoints.failed(index)
        delay = self.options.policy.delay(attempt)
        logger.debug(
            "retrying call",
            endpoint=self.endpoints.targets[index],
            next=self.endpoints.targets[nxt],
            code=exc.code().name,
            attempt=attempt + 1,
            delay_s=round(delay, 3),
        )
        await asyncio.sleep(delay)  # backoff between attempts, not synchronisation
        return nxt

    def retryable(self, exc: grpc.aio.AioRpcError, attempt: int) -> bool:
        return exc.code() in self.options.policy.codes and attempt < self.options.policy.retries


class UnaryUnary(Generic[Req, Resp]):
    """`await multicallable(request)`: the response, after retries on other endpoints."""

    def __init__(self, caller: _Caller, method: _Method) -> None:
        self._caller = caller
        self._method = method

    def __call__(
        self,
        request: Req,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
        endpoint: str | None = None,
        correlation_id: str | None = None,
    ) -> Awaitable[Resp]:
        return self._invoke(
            with_request_id(request),
            timeout if timeout is not None else self._caller.options.timeout_s,
            metadata,
            dict(credentials=credentials, wait_for_ready=wait_for_ready, compression=compression),
            endpoint,
            correlation_id or str(uuid.uuid4()),
        )

    async def _invoke(
        self,
        request: Req,
        deadline_s: float | None,
        metadata: Metadata | None,
        grpc_kwargs: dict[str, Any],
        endpoint: str | None,
        correlation_id: str,
    ) -> Resp:
        c, m = self._caller, self._method
        index = c.endpoints.index(endpoint)
        attempt = 0
        while True:
            multi = c.endpoints.channel(index).unary_unary(m.path, m.serializer, m.deserializer)
            call = multi(
                request,
                timeout=deadline_s,
                metadata=c.options.metadata(correlation_id, metadata),
                **grpc_kwargs,
            )
            try:
                response = await call
            except grpc.aio.AioRpcError as exc:
                c.options.saw(exc.trailing_metadata())
                if not c.retryable(exc, attempt):
                    raise
                index = await c.backoff(exc, index, attempt)
                attempt += 1
                continue
            c.options.saw(await call.trailing_metadata())
            return cast(Resp, response)


class StreamCall(Generic[Resp]):
    """A server stream: `async for message in call`, and `cancel()` to end it quietly."""

    def __init__(self, messages: Callable[[StreamCall[Resp]], AsyncIterator[Resp]]) -> None:
        self.cancelled = False
        self.current: grpc.aio.UnaryStreamCall[Any, Any] | None = None
        self._messages = messages(self)

    def __aiter__(self) -> AsyncIterator[Resp]:
        return self._messages

    def cancel(self) -> bool:
        """End the stream: iteration stops without an error."""
        self.cancelled = True
        if self.current is not None:
            return self.current.cancel()
        return True

    async def aclose(self) -> None:
        self.cancel()
        await cast(Any, self._messages).aclose()


class UnaryStream(Generic[Req, Resp]):
    """`async for message in multicallable(request)`, retried and resumed (see the module)."""

    def __init__(self, caller: _Caller, method: _Method) -> None:
        self._caller = caller
        self._method = method

    def __call__(
        self,
        request: Req,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        credentials: grpc.CallCredentials | None = None,
        wait_for_ready: bool | None = None,
        compression: grpc.Compression | None = None,
        endpoint: str | None = None,
        correlation_id: str | None = None,
        resume: bool | None = None,
    ) -> StreamCall[Resp]:
        grpc_kwargs = dict(
            credentials=credentials, wait_for_ready=wait_for_ready, compression=compression
        )
        cid = correlation_id or str(uuid.uuid4())
        resumable = _resumable(request) if resume is None else resume

        def messages(handle: StreamCall[Resp]) -> AsyncIterator[Resp]:
            return self._messages(
                handle, request, timeout, metadata, grpc_kwargs, endpoint, cid, resumable
            )

        return StreamCall(messages)

    async def _messages(
        self,
        handle: StreamCall[Resp],
        request: Req,
        deadline_s: float | None,
        metadata: Metadata | None,
        grpc_kwargs: dict[str, Any],
        endpoint: str | None,
        correlation_id: str,
        resumable: bool,
    ) -> AsyncIterator[Resp]:
        # One loop owns reconnecting, resuming and the retry budget, which interact:
        # progress resets the budget, and only a resumable stream may reconnect after it.
        c, m = self._caller, self._method
        index = c.endpoints.index(endpoint)
        attempt, received = 0, False
        while not handle.cancelled:
            multi = c.endpoints.channel(index).unary_stream(m.path, m.serializer, m.deserializer)
            call = multi(
                request,
                timeout=deadline_s,
                metadata=c.options.metadata(correlation_id, metadata),
                **grpc_kwargs,
            )
            handle.current = call
            # The call's own async generator, closed below: left suspended, it would be
            # closed by the loop's finaliser whenever it is collected, possibly while the
            # loop shuts down, where that close task was seen to hang loop shutdown.
            incoming = cast(AsyncGenerator[Any, None], call.__aiter__())
            try:
                async for message in incoming:
                    received, attempt = True, 0
                    position = getattr(message, "position", None)
                    if resumable and isinstance(position, int):
                        request = _resumed(request, position)
                    yield cast(Resp, message)
                c.options.saw(await call.trailing_metadata())
                return
            except grpc.aio.AioRpcError as exc:
                c.options.saw(exc.trailing_metadata())
                if handle.cancelled:
                    return
                if (received and not resumable) or not c.retryable(exc, attempt):
                    raise
                index = await c.backoff(exc, index, attempt)
                attempt += 1
            except asyncio.CancelledError:
                if handle.cancelled:  # our own cancel(), not the task's
                    return
                raise
            finally:
                handle.current = None
                call.cancel()
                await incoming.aclose()


class RetryingChannel(grpc.aio.Channel):
    """A channel for generated stubs whose calls go through `UnaryUnary` / `UnaryStream`."""

    def __init__(self, endpoints: Endpoints, options: CallOptions) -> None:
        self.endpoints = endpoints
        self.options = options
        self._caller = _Caller(endpoints, options)

    def unary_unary(
        self,
        method: str,
        request_serializer: _Serializer = None,
        response_deserializer: _Deserializer = None,
        _registered_method: bool | None = False,  # passed by generated stubs; not needed
    ) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        spec = _Method(method, request_serializer, response_deserializer)
        # Awaitable like the real multicallable's call, without the Call object's
        # metadata accessors: this channel consumes the trailing metadata itself.
        return cast(
            "grpc.aio.UnaryUnaryMultiCallable[Any, Any]", UnaryUnary[Any, Any](self._caller, spec)
        )

    def unary_stream(
        self,
        method: str,
        request_serializer: _Serializer = None,
        response_deserializer: _Deserializer = None,
        _registered_method: bool | None = False,
    ) -> grpc.aio.UnaryStreamMultiCallable[Any, Any]:
        spec = _Method(method, request_serializer, response_deserializer)
        return cast(
            "grpc.aio.UnaryStreamMultiCallable[Any, Any]", UnaryStream[Any, Any](self._caller, spec)
        )

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Unsupported(method)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Unsupported(method)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """The state of the endpoint calls currently start at."""
        return self.endpoints.channel(self.endpoints.current).get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        ch = self.endpoints.channel(self.endpoints.current)
        await ch.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.endpoints.channel(self.endpoints.current).channel_ready()

    async def close(self, grace: float | None = None) -> None:
        await self.endpoints.close()

    async def __aenter__(self) -> RetryingChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.close()


class _Unsupported:
    """Stubs build every method up front; only calling a client-streaming one fails."""

    def __init__(self, method: str) -> None:
        self._method = method

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{self._method}: client streaming is not supported")
