"""Flavours and Admin over real gRPC against an in-process node: the resource pattern."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from vim._gen.vim.v1 import admin_pb2, admin_pb2_grpc, flavours_pb2, flavours_pb2_grpc
from vim.api.auth import Authenticator
from vim.api.server import ApiConfig, ApiNode

SECRET = b"s" * 32
AUTH = Authenticator(SECRET)


def md(roles: tuple[str, ...] = ("admin",), tenant: str = "ops") -> tuple[tuple[str, str], ...]:
    return (("authorization", "Bearer " + AUTH.mint("alice", tenant, list(roles))),)


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[ApiNode]:
    n = ApiNode(
        ApiConfig(
            listen="127.0.0.1:0",
            eventlog_url=f"sqlite:///{tmp_path}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
        )
    )
    await n.start()
    yield n
    await n.stop()


@pytest.fixture
async def stubs(
    node: ApiNode,
) -> AsyncIterator[tuple[flavours_pb2_grpc.FlavoursStub, admin_pb2_grpc.AdminStub]]:
    async with grpc.aio.insecure_channel(node.address) as ch:
        yield flavours_pb2_grpc.FlavoursStub(ch), admin_pb2_grpc.AdminStub(ch)


def create(
    name: str = "m1.small", rid: str = "r-1", **kw: int
) -> flavours_pb2.CreateFlavourRequest:
    sizes = {"vcpus": 2, "ram_mb": 2048, "disk_gb": 20} | kw
    return flavours_pb2.CreateFlavourRequest(request_id=rid, name=name, **sizes)


def violations(err: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(err)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


async def test_create_get_list_delete(stubs: tuple[flavours_pb2_grpc.FlavoursStub, object]) -> None:
    fl, _ = stubs
    made = await fl.CreateFlavour(create(), metadata=md())
    assert (made.name, made.vcpus, made.ram_mb) == ("m1.small", 2, 2048)
    got = await fl.GetFlavour(
        flavours_pb2.GetFlavourRequest(flavour_id=made.flavour_id), metadata=md(("reader",), "t1")
    )
    assert got == made
    await fl.CreateFlavour(create("m1.large", "r-2", vcpus=8), metadata=md())
    page = await fl.ListFlavours(flavours_pb2.ListFlavoursRequest(), metadata=md(("member",)))
    assert [f.name for f in page.flavours] == ["m1.large", "m1.small"]
    await fl.DeleteFlavour(
        flavours_pb2.DeleteFlavourRequest(request_id="r-3", flavour_id=made.flavour_id),
        metadata=md(),
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fl.GetFlavour(
            flavours_pb2.GetFlavourRequest(flavour_id=made.flavour_id), metadata=md()
        )
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


async def test_pagination_walks_every_item_once(
    stubs: tuple[flavours_pb2_grpc.FlavoursStub, object],
) -> None:
    fl, _ = stubs
    for i in range(7):
        await fl.CreateFlavour(create(f"f{i}", f"r{i}"), metadata=md())
    names: list[str] = []
    token = ""
    for _ in range(10):
        page = await fl.ListFlavours(
            flavours_pb2.ListFlavoursRequest(page={"page_size": 3, "page_token": token}),
            metadata=md(),
        )
        names += [f.name for f in page.flavours]
        token = page.page.next_page_token
        if not token:
            break
    assert names == [f"f{i}" for i in range(7)]


async def test_credentials_and_roles(stubs: tuple[flavours_pb2_grpc.FlavoursStub, object]) -> None:
    fl, _ = stubs
    cases = [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer not-a-jwt"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Basic abc"),), grpc.StatusCode.UNAUTHENTICATED),
        (
            (("authorization", "Bearer " + Authenticator(b"o" * 32).mint("x", "t", ["admin"])),),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            (("authorization", "Bearer " + AUTH.mint("x", "t", ["admin"], ttl_s=-60)),),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (md(("member",)), grpc.StatusCode.PERMISSION_DENIED),
        (md(("reader",)), grpc.StatusCode.PERMISSION_DENIED),
    ]
    for metadata, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fl.CreateFlavour(create(), metadata=metadata)
        assert err.value.code() is code, metadata


BAD = [
    (create(name=""), ["name"]),
    (create(name="x" * 256), ["name"]),
    (create(name=" padded"), ["name"]),
    (create(vcpus=0), ["vcpus"]),
    (create(vcpus=5000, ram_mb=0), ["vcpus", "ram_mb"]),
    (create(ram_mb=2**63), ["ram_mb"]),
    (create(disk_gb=10**9), ["disk_gb"]),
    (create(rid=""), ["request_id"]),
    (create(rid="bad id!"), ["request_id"]),
]


@pytest.mark.parametrize(("request_", "fields"), BAD)
async def test_bad_input_is_invalid_argument_with_fields(
    stubs: tuple[flavours_pb2_grpc.FlavoursStub, object],
    request_: flavours_pb2.CreateFlavourRequest,
    fields: list[str],
) -> None:
    fl, _ = stubs
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fl.CreateFlavour(request_, metadata=md())
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == fields


async def test_bad_ids_and_pages(stubs: tuple[flavours_pb2_grpc.FlavoursStub, object]) -> None:
    fl, _ = stubs
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fl.GetFlavour(flavours_pb2.GetFlavourRequest(flavour_id="nope"), metadata=md())
    assert violations(err.value) == ["flavour_id"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fl.ListFlavours(
            flavours_pb2.ListFlavoursRequest(page={"page_size": 5000, "page_token": "%%"}),
            metadata=md(),
        )
    assert violations(err.value) == ["page.page_size", "page.page_token"]


async def test_request_id_repeat_and_reuse(
    node: ApiNode, stubs: tuple[flavours_pb2_grpc.FlavoursStub, object]
) -> None:
    fl, _ = stubs
    first = await fl.CreateFlavour(create(), metadata=md())
    assert node.node is not None
    head = await node.node.log.head()
    again = await fl.CreateFlavour(create(), metadata=md())
    assert again == first
    assert await node.node.log.head() == head
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fl.CreateFlavour(create(name="other"), metadata=md())
    assert err.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "different request" in (err.value.details() or "")
    # The request id is scoped by tenant: another tenant may use the same one.
    other = await fl.CreateFlavour(create(name="m2"), metadata=md(tenant="other"))
    assert other.flavour_id != first.flavour_id


async def test_concurrent_creates_of_one_name_make_one_flavour(
    stubs: tuple[flavours_pb2_grpc.FlavoursStub, object],
) -> None:
    fl, _ = stubs
    results = await asyncio.gather(
        *(fl.CreateFlavour(create("dup", f"c{i}"), metadata=md()) for i in range(10)),
        return_exceptions=True,
    )
    ok = [r for r in results if isinstance(r, flavours_pb2.Flavour)]
    failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(ok) == 1
    assert {e.code() for e in failed} == {grpc.StatusCode.ALREADY_EXISTS}


async def test_read_model_rebuild_is_identical(
    stubs: tuple[flavours_pb2_grpc.FlavoursStub, admin_pb2_grpc.AdminStub],
) -> None:
    fl, admin = stubs
    for i in range(5):
        await fl.CreateFlavour(create(f"f{i}", f"r{i}"), metadata=md())
    status = await admin.GetReadModel(admin_pb2.GetReadModelRequest(), metadata=md())
    out = await admin.RebuildReadModel(admin_pb2.RebuildReadModelRequest(), metadata=md())
    assert out.identical and out.digest_after == status.digest
    # each creation writes the flavour and its name claim
    assert out.position == status.position == 10 and out.streams == 10
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.RebuildReadModel(admin_pb2.RebuildReadModelRequest(), metadata=md(("member",)))
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
