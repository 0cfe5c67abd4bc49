"""Prometheus metrics of an API node: a grpc.aio server interceptor and the scrape endpoint.

Metrics:

- `vim_api_requests_total{method,code}`: finished RPCs, by full method name
  (`/vim.v1.EventLog/ListEvents`) and gRPC status code name (`OK`,
  `INVALID_ARGUMENT`, ...). A stream counts once, when it ends.
- `vim_api_request_seconds{method}`: latency of unary-response RPCs. Streams are
  left out: a Watch lives as long as its client wants, and its lifetime would
  swamp the buckets.
- `vim_api_streams_active{method}`: response streams open right now.

Invariants: label values are bounded. `method` comes only from methods that a
registered service implements (unknown methods are answered UNIMPLEMENTED by
gRPC before any handler runs and are not counted), and `code` is one of the 17
status codes. Each node has its own `CollectorRegistry`, so several nodes can
share a process (the demo, tests) without clashing on the global registry.

A node with several workers (`vim-api --workers N`) has one scrape endpoint, served
by its supervisor (`serve_workers`): the workers run in prometheus_client's
multiprocess mode and the endpoint reports counters and histograms summed over
them (`vim_api_streams_active`: over the live ones). Process, platform and GC
collectors are per process and are not reported there.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess


class ApiMetrics:
    """The node's metric families, registered in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        prometheus_client.ProcessCollector(registry=self.registry)
        prometheus_client.PlatformCollector(registry=self.registry)
        prometheus_client.GCCollector(registry=self.registry)
        self.requests = Counter(
            "vim_api_requests_total",
            "gRPC requests finished, by method and status code.",
            ("method", "code"),
            registry=self.registry,
        )
        self.seconds = Histogram(
            "vim_api_request_seconds",
            "Latency of unary-response gRPC requests, by method.",
            ("method",),
            registry=self.registry,
        )
        self.streams = Gauge(
            "vim_api_streams_active",
            "Response streams currently open, by method.",
            ("method",),
            registry=self.registry,
            multiprocess_mode="livesum",  # with --workers: the live workers' sum
        )


@dataclass(slots=True)
class MetricsEndpoint:
    """A running scrape endpoint (prometheus_client's WSGI server in a daemon thread)."""

    host: str
    port: int
    _server: Any

    def close(self) -> None:
        """Stop serving scrapes; idempotent."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve(metrics: ApiMetrics, listen: str) -> MetricsEndpoint:
    """Serve /metrics on `host:port` (port 0 picks a free one); returns the bound endpoint."""
    return _serve(metrics.registry, listen)


def _serve(registry: CollectorRegistry, listen: str) -> MetricsEndpoint:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    server, _thread = prometheus_client.start_http_server(int(port), addr=host, registry=registry)
    return MetricsEndpoint(host, int(server.server_port), server)


def serve_workers(path: Path, listen: str) -> MetricsEndpoint:
    """Serve /metrics for a node's workers: the sum over every worker process of the
    metrics they write under `path` (prometheus_client's multiprocess mode, enabled in
    a worker by `PROMETHEUS_MULTIPROC_DIR=path` in its environment)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return _serve(registry, listen)


def _code_of(context: grpc.aio.ServicerContext[Any, Any], default: grpc.StatusCode) -> str:
    """The status the handler set (by abort or set_code), else `default`."""
    code = context.code()
    # grpc.aio reports the code as a StatusCode or, before one is set, as None.
    return code.name if isinstance(code, grpc.StatusCode) else default.name


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC of the services registered on the server."""

    def __init__(self, metrics: ApiMetrics) -> None:
        self._metrics = metrics
        # Label children, looked up once: `labels()` takes a lock and builds a tuple on
        # every call, which showed in the profile of a node under load. Bounded, as the
        # labels are (see the module docstring).
        self._counters: dict[tuple[str, str], Any] = {}
        self._timers: dict[str, Any] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.response_streaming:
            behavior = handler.unary_stream or handler.stream_stream
            factory = (
                grpc.unary_stream_rpc_method_handler
                if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler
            )
            wrapped = self._wrap_stream(method, behavior)
        else:
            behavior = handler.unary_unary or handler.stream_unary
            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            wrapped = self._wrap_unary(method, behavior)
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _record(
        self, method: str, context: Any, default: grpc.StatusCode, started: float | None
    ) -> None:
        seconds = None if started is None else time.perf_counter() - started
        key = (method, _code_of(context, default))
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self._metrics.requests.labels(*key)
        counter.inc()
        if seconds is not None:
            timer = self._timers.get(method)
            if timer is None:
                timer = self._timers[method] = self._metrics.seconds.labels(method)
            timer.observe(seconds)

    def _wrap_unary(self, method: str, behavior: Any) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            outcome = grpc.StatusCode.UNKNOWN
            try:
                response = await behavior(request, context)
                outcome = grpc.StatusCode.OK
                return response
            except grpc.aio.AbortError:
                raise  # the handler chose the code; context.code() has it
            except BaseException as exc:
                outcome = _status_for_exception(exc)
                raise
            finally:
                self._record(method, context, outcome, started)

        return unary

    def _wrap_stream(self, method: str, behavior: Any) -> Callable[..., Any]:
        gauge = self._metrics.streams.labels(method)
        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
                outcome = grpc.StatusCode.UNKNOWN
                gauge.inc()
                try:
                    async for item in behavior(request, context):
                        yield item
                    outcome = grpc.StatusCode.OK
                except grpc.aio.AbortError:
                    raise
                except BaseException as exc:
                    outcome = _status_for_exception(exc)
                    raise
                finally:
                    gauge.dec()
                    self._record(method, context, outcome, None)

            return generator

        async def writer(request: Any, context: Any) -> Any:
            # A handler that writes with context.write() (grpc_health's Watch, for one).
            outcome = grpc.StatusCode.UNKNOWN
            gauge.inc()
            try:
                result = await behavior(request, context)
                outcome = grpc.StatusCode.OK
                return result
            except grpc.aio.AbortError:
                raise
            except BaseException as exc:
                outcome = _status_for_exception(exc)
                raise
            finally:
                gauge.dec()
                self._record(method, context, outcome, None)

        return writer


def _status_for_exception(exc: BaseException) -> grpc.StatusCode:
    """What the client sees when a handler ends with `exc` rather than a status."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
