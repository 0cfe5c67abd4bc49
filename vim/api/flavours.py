"""The `vim.v1.Flavours` service: the pattern every resource servicer follows.

A mutating RPC: authenticate and authorise (`node.caller`), validate into
violations and `refuse`, build the command envelope (`node.command`), run a
decision against the read model (`node.runner.run`), and answer with the stored
view, which is exactly what a repeat of the request id will get.
A query: authenticate, wait for the client's position, read the read model.
"""

from __future__ import annotations

from typing import Any

from vim._gen.vim.v1 import flavours_pb2 as pb
from vim._gen.vim.v1 import flavours_pb2_grpc
from vim.api import validation as v
from vim.api.auth import ADMIN, READ
from vim.api.errors import refuse, rpc
from vim.api.node import Ctx, Node, view_to
from vim.app.commands import Change, Decision
from vim.domain import flavor, names
from vim.errors import FieldViolation, NotFound
from vim.projections.readmodel import ReadModel, register_kind

SERVICE_NAME = "vim.v1.Flavours"
register_kind(flavor.KIND, flavor.evolve)
register_kind(names.KIND, names.evolve)
NAME_SCOPE = "flavor"

MAX_VCPUS = 1024
MAX_RAM_MB = 16 * 1024 * 1024
MAX_DISK_GB = 64 * 1024


def live(model: ReadModel) -> list[flavor.Flavor]:
    return [e.state for _, e in model.of_kind(flavor.KIND) if not e.state.deleted]


def find(model: ReadModel, flavor_id: str) -> flavor.Flavor:
    """A live flavour, or NotFound."""
    entry = model.get(flavor.stream(flavor_id))
    if entry is None or entry.state.deleted:
        raise NotFound(f"flavour {flavor_id} not found")
    state: flavor.Flavor = entry.state
    return state


class FlavoursServicer(flavours_pb2_grpc.FlavoursServicer):
    def __init__(self, node: Node) -> None:
        self._node = node

    @rpc
    async def CreateFlavour(self, request: pb.CreateFlavourRequest, context: Ctx) -> pb.Flavour:
        principal = await self._node.caller(context, ADMIN, "CreateFlavour")
        bad: list[FieldViolation] = []
        v.name("name", request.name, bad)
        v.in_range("vcpus", request.vcpus, 1, MAX_VCPUS, bad)
        v.in_range("ram_mb", request.ram_mb, 1, MAX_RAM_MB, bad)
        v.in_range("disk_gb", request.disk_gb, 0, MAX_DISK_GB, bad)
        v.string_map("extra_specs", request.extra_specs, bad, limit=64)
        refuse(bad)
        ctx = self._node.command(principal, request, "CreateFlavour", context)
        flavor_id, at = v.new_id(), v.now()

        def decide(model: ReadModel) -> Decision:
            name_sid = names.stream(NAME_SCOPE, request.name)
            owner = model.get(name_sid)
            claimed = names.claim(
                owner.state if owner else None, NAME_SCOPE, request.name, flavor_id
            )
            event = flavor.create(
                live(model),
                flavor_id,
                request.name,
                request.vcpus,
                request.ram_mb,
                request.disk_gb,
                request.is_public,
                dict(request.extra_specs),
                at,
            )
            return Decision(
                [
                    Change(flavor.stream(flavor_id), 0, [event]),
                    Change(name_sid, model.version(name_sid), [claimed]),
                ],
                flavor.evolve(None, event).view(),
            )

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return _flavour(out.response)

    @rpc
    async def GetFlavour(self, request: pb.GetFlavourRequest, context: Ctx) -> pb.Flavour:
        await self._node.caller(context, READ, "GetFlavour")
        bad: list[FieldViolation] = []
        v.resource_id("flavour_id", request.flavour_id, bad)
        refuse(bad)
        found = find(self._node.model, request.flavour_id)
        self._node.answered(context)
        return _flavour(found.view())

    @rpc
    async def ListFlavours(
        self, request: pb.ListFlavoursRequest, context: Ctx
    ) -> pb.ListFlavoursResponse:
        await self._node.caller(context, READ, "ListFlavours")
        bad: list[FieldViolation] = []
        offset, size = v.page("page", request.page, bad)
        refuse(bad)
        items = sorted(live(self._node.model), key=lambda f: (f.name, f.flavor_id))
        chunk, page = v.paginate(items, offset, size)
        self._node.answered(context)
        return pb.ListFlavoursResponse(flavours=[_flavour(f.view()) for f in chunk], page=page)

    @rpc
    async def DeleteFlavour(
        self, request: pb.DeleteFlavourRequest, context: Ctx
    ) -> pb.DeleteFlavourResponse:
        principal = await self._node.caller(context, ADMIN, "DeleteFlavour")
        bad: list[FieldViolation] = []
        v.resource_id("flavour_id", request.flavour_id, bad)
        refuse(bad)
        ctx = self._node.command(principal, request, "DeleteFlavour", context)
        at = v.now()

        def decide(model: ReadModel) -> Decision:
            sid = flavor.stream(request.flavour_id)
            entry = model.get(sid)
            event = flavor.delete(entry.state if entry else None, request.flavour_id, at)
            assert entry is not None
            name_sid = names.stream(NAME_SCOPE, entry.state.name)
            released = names.release(NAME_SCOPE, entry.state.name, request.flavour_id)
            return Decision(
                [
                    Change(sid, model.version(sid), [event]),
                    Change(name_sid, model.version(name_sid), [released]),
                ],
                {"flavourId": request.flavour_id},
            )

        out = await self._node.runner.run(ctx, decide)
        self._node.answered(context, out.position)
        return pb.DeleteFlavourResponse(flavour_id=str(out.response["flavourId"]))


def _flavour(view: dict[str, Any] | Any) -> pb.Flavour:
    msg = pb.Flavour()
    view_to(msg, dict(view))
    return msg
