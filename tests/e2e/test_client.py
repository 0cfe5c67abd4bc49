"""`VimClient` against two in-process API nodes sharing one SQLite event log.

The nodes are real (gRPC servers, projectors following the shared file); the
client is used as a program would use it. What is checked: read-your-writes
across nodes (min-position), failover when a node stops (UNAVAILABLE is
retried on the other node), request ids reused on retry (a change applied by a
node that then "died" is not applied again), and a Watch that resumes on the
other node without losing or repeating events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from vim._gen.vim.v1 import events_pb2, events_pb2_grpc, flavours_pb2, flavours_pb2_grpc
from vim.api import flavours
from vim.api.auth import Authenticator
from vim.api.node import Ctx, Node
from vim.api.server import ApiConfig, ApiNode, Service, ServiceFactory, default_services
from vim.client import VimClient

SECRET = b"c" * 32
ADMIN = Authenticator(SECRET).mint("alice", "ops", ["admin"])
DEADLINE_S = 10.0


def make_node(tmp_path: Path, services: ServiceFactory = default_services) -> ApiNode:
    return ApiNode(
        ApiConfig(
            listen="127.0.0.1:0",
            eventlog_url=f"sqlite:///{tmp_path}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
            grace_s=0.5,
        ),
        services=services,
    )


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[tuple[ApiNode, ApiNode]]:
    a, b = make_node(tmp_path), make_node(tmp_path)
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


def flavour(name: str = "m1.small", rid: str = "") -> flavours_pb2.CreateFlavourRequest:
    return flavours_pb2.CreateFlavourRequest(
        request_id=rid, name=name, vcpus=2, ram_mb=2048, disk_gb=20
    )


async def head(client: VimClient) -> int:
    reply = await client.events.GetHead(events_pb2.GetHeadRequest())
    return reply.head.position


async def test_read_your_writes_through_another_node(nodes: tuple[ApiNode, ApiNode]) -> None:
    a, b = nodes
    async with VimClient([a.address, b.address], token=ADMIN) as client:
        for i in range(5):  # each read follows its write at once, on the other node
            made = await client.unary(
                flavours_pb2_grpc.FlavoursStub,
                "CreateFlavour",
                flavour(f"f{i}"),
                endpoint=a.address,
            )
            assert made.flavour_id
            assert client.position > 0
            got = await client.unary(
                flavours_pb2_grpc.FlavoursStub,
                "GetFlavour",
                flavours_pb2.GetFlavourRequest(flavour_id=made.flavour_id),
                endpoint=b.address,
            )
            assert got == made
        assert b.node is not None and b.node.model.position >= client.position


async def test_typed_stubs_fill_request_ids_and_leave_requests_alone(
    nodes: tuple[ApiNode, ApiNode],
) -> None:
    a, _ = nodes
    async with VimClient([a.address], token=ADMIN) as client:
        request = flavour()
        made = await client.flavours.CreateFlavour(request)
        assert request.request_id == ""  # the caller's message is not modified
        page = await client.flavours.ListFlavours(flavours_pb2.ListFlavoursRequest())
        assert [f.flavour_id for f in page.flavours] == [made.flavour_id]
        listed = await client.events.ListEvents(events_pb2.ListEventsRequest())
        rids = {e.metadata.request_id for e in listed.events}
        assert len(rids) == 1 and rids != {""}


async def test_client_fails_over_when_a_node_stops(nodes: tuple[ApiNode, ApiNode]) -> None:
    a, b = nodes
    async with VimClient([a.address, b.address], token=ADMIN, backoff_s=0.01) as client:
        await client.flavours.CreateFlavour(flavour("before"))
        await a.stop()
        made = await client.flavours.CreateFlavour(flavour("after"))
        got = await client.flavours.GetFlavour(
            flavours_pb2.GetFlavourRequest(flavour_id=made.flavour_id)
        )
        assert got.name == "after"
        assert client.endpoints[client.channel.endpoints.current] == b.address
        assert await head(client) == 4  # two creates, two events each


async def test_other_errors_are_not_retried(nodes: tuple[ApiNode, ApiNode]) -> None:
    a, b = nodes
    async with VimClient([a.address, b.address], token=None) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await head(client)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert client.channel.endpoints.current == 0  # no rotation either


async def test_all_nodes_down_raises_unavailable_after_the_retries(tmp_path: Path) -> None:
    a = make_node(tmp_path)
    await a.start()
    address = a.address
    await a.stop()
    async with VimClient([address], token=ADMIN, retries=2, backoff_s=0.01) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await head(client)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE


class DiesAfterFirstCreate(flavours.FlavoursServicer):
    """Applies CreateFlavour, then fails the first call as a node dying mid-call would."""

    def __init__(self, node: Node, seen: list[str]) -> None:
        super().__init__(node)
        self.seen = seen

    async def CreateFlavour(
        self, request: flavours_pb2.CreateFlavourRequest, context: Ctx
    ) -> flavours_pb2.Flavour:
        self.seen.append(request.request_id)
        answer = await super().CreateFlavour(request, context)
        if len(self.seen) == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "node died after the append")
        return answer


def dying_flavours(seen: list[str]) -> Callable[[Node], Sequence[Service]]:
    def services(node: Node) -> Sequence[Service]:
        kept = [s for s in default_services(node) if s.name != flavours.SERVICE_NAME]
        add = flavours_pb2_grpc.add_FlavoursServicer_to_server
        flaky: Any = DiesAfterFirstCreate(node, seen)
        return [*kept, Service(partial(add, flaky), flavours.SERVICE_NAME)]

    return services


@pytest.mark.parametrize("other_node", [False, True], ids=["same-node", "other-node"])
async def test_a_retried_mutation_reuses_its_request_id(tmp_path: Path, other_node: bool) -> None:
    seen: list[str] = []
    a, b = make_node(tmp_path, dying_flavours(seen)), make_node(tmp_path, dying_flavours(seen))
    await a.start()
    await b.start()
    try:
        endpoints = [a.address, b.address] if other_node else [a.address]
        async with VimClient(endpoints, token=ADMIN, backoff_s=0.01) as client:
            before = await head(client)
            made = await client.flavours.CreateFlavour(flavour())
            assert len(seen) == 2 and seen[0] == seen[1] != ""  # one id, sent twice
            assert await head(client) == before + 2  # one append (flavour + name), not two
            page = await client.flavours.ListFlavours(flavours_pb2.ListFlavoursRequest())
            assert [f.flavour_id for f in page.flavours] == [made.flavour_id]
    finally:
        await a.stop()
        await b.stop()


async def test_watch_resumes_on_another_node_without_gaps_or_repeats(
    nodes: tuple[ApiNode, ApiNode],
) -> None:
    a, b = nodes
    async with VimClient([a.address, b.address], token=ADMIN, backoff_s=0.01) as client:
        await client.flavours.CreateFlavour(flavour("one"))  # positions 1, 2
        watch = client.stream(
            events_pb2_grpc.EventLogStub, "Watch", events_pb2.WatchEventsRequest()
        )
        stream = aiter(watch)
        got = [await anext(stream), await anext(stream)]
        await a.stop()  # drains: the Watch ends with UNAVAILABLE, the client moves to b
        await client.flavours.CreateFlavour(flavour("two"))  # positions 3, 4
        async with asyncio.timeout(DEADLINE_S):
            got += [await anext(stream), await anext(stream)]
        assert [e.position for e in got] == [1, 2, 3, 4]
        assert watch.cancel()
        with pytest.raises(StopAsyncIteration):
            await anext(stream)
