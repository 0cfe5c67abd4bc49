"""The `vim.v1.Admin` service: read-model status and rebuild, for operators (admin only)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from vim._gen.vim.v1 import admin_pb2 as pb
from vim._gen.vim.v1 import admin_pb2_grpc
from vim.api.auth import ADMIN
from vim.api.cluster import cluster_status
from vim.api.errors import rpc
from vim.api.node import Ctx, Node
from vim.projections.readmodel import rebuild

SERVICE_NAME = "vim.v1.Admin"


def etcd_from_env() -> tuple[str, ...]:
    """`VIM_ETCD_ENDPOINTS` (comma-separated host:port), as the other services read it."""
    raw = os.environ.get("VIM_ETCD_ENDPOINTS", "")
    return tuple(e.strip() for e in raw.split(",") if e.strip())


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, node: Node, etcd_endpoints: Sequence[str] | None = None) -> None:
        self._node = node
        self._etcd = tuple(etcd_endpoints) if etcd_endpoints is not None else etcd_from_env()

    @rpc
    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, context: Ctx
    ) -> pb.ClusterStatus:
        await self._node.caller(context, ADMIN, "GetClusterStatus")
        status = await cluster_status(self._node, self._etcd)
        self._node.answered(context)
        return status

    @rpc
    async def RebuildReadModel(
        self, request: pb.RebuildReadModelRequest, context: Ctx
    ) -> pb.RebuildReadModelResponse:
        await self._node.caller(context, ADMIN, "RebuildReadModel")
        started = time.perf_counter()
        before, after, position = await rebuild(self._node.log, self._node.model)
        self._node.answered(context, position)
        return pb.RebuildReadModelResponse(
            digest_before=before,
            digest_after=after,
            identical=before == after,
            position=position,
            streams=len(self._node.model),
            seconds=time.perf_counter() - started,
        )

    @rpc
    async def GetReadModel(
        self, request: pb.GetReadModelRequest, context: Ctx
    ) -> pb.ReadModelStatus:
        await self._node.caller(context, ADMIN, "GetReadModel")
        model = self._node.model
        self._node.answered(context)
        return pb.ReadModelStatus(
            position=model.position, digest=model.digest(), streams=len(model)
        )
