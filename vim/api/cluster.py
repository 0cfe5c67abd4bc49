"""What `Admin.GetClusterStatus` reports: the node, the log, etcd, leaders, agents.

Every probe has its own short deadline and turns failure into a reported
state, never into a failed call: an operator asks this question exactly when
something is down. With etcd endpoints configured (`vim-api --etcd`), leaders
are read from their election keys and agents from their liveness keys; without
(the embedded default), leaders are known only by the newest fencing token the
log has seen, and agents by their host state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Sequence

import aetcd

from ha.election import EtcdElector
from ha.liveness import read_liveness
from vim._gen.vim.v1 import admin_pb2 as pb
from vim.api.node import Node
from vim.domain import host as host_domain

ROLES = ("scheduler", "faultd", "sdn")
PROBE_TIMEOUT_S = 1.5
STARTED = time.monotonic()
NODE_ID = f"{socket.gethostname()}:{os.getpid()}"


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host or "127.0.0.1", int(port or 2379)


async def _etcd_member(endpoint: str) -> pb.EtcdMemberStatus:
    host, port = _split(endpoint)
    client = aetcd.Client(host=host, port=port, timeout=PROBE_TIMEOUT_S)
    try:
        status = await asyncio.wait_for(client.status(), PROBE_TIMEOUT_S)
        urls = [u for u in getattr(status.leader, "client_urls", [])]
        return pb.EtcdMemberStatus(
            endpoint=endpoint,
            healthy=True,
            is_leader=any(u.endswith(f":{port}") for u in urls),
            version=str(status.version),
        )
    except Exception as exc:  # any failure is the member's state, not the call's
        return pb.EtcdMemberStatus(endpoint=endpoint, healthy=False, error=_why(exc))
    finally:
        with contextlib.suppress(Exception):  # closing a client that never connected
            await client.close()


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


async def _leader(node: Node, endpoints: Sequence[str], role: str) -> pb.LeaderStatus:
    status = pb.LeaderStatus(role=role)
    try:
        status.newest_token_in_log = await asyncio.wait_for(
            node.log.fencing_token(role), PROBE_TIMEOUT_S
        )
    except Exception as exc:
        status.error = f"event log: {_why(exc)}"
    if not endpoints:
        status.term = status.newest_token_in_log
        return status
    elector = EtcdElector(
        list(endpoints), role, f"observer-{NODE_ID}", death_signal=False, rpc_timeout_s=1.0
    )
    try:
        leadership = await asyncio.wait_for(elector.observe(), PROBE_TIMEOUT_S * 2)
        if leadership is not None:
            status.holder = leadership.holder
            status.term = leadership.token
            status.since = leadership.since.isoformat()
    except Exception as exc:
        status.error = f"etcd: {_why(exc)}"
    finally:
        await elector.close()
    return status


async def _agent(endpoints: Sequence[str], hostname: str, state: str) -> pb.AgentStatus:
    status = pb.AgentStatus(hostname=hostname, host_state=state)
    if not endpoints:
        status.alive = state in {host_domain.HostState.UP, host_domain.HostState.MAINTENANCE}
        return status
    try:
        record = await asyncio.wait_for(
            read_liveness(endpoints, hostname, rpc_timeout_s=1.0), PROBE_TIMEOUT_S * 2
        )
    except Exception:
        return status
    if record is not None:
        status.alive = True
        status.pid = int(record.pid)
        status.boot_id = record.boot_id
        status.started_at = record.started_at
    return status


async def cluster_status(node: Node, etcd_endpoints: Sequence[str]) -> pb.ClusterStatus:
    log_status = pb.EventLogStatus(backend=_backend(node))
    try:
        log_status.head = await asyncio.wait_for(node.log.head(), PROBE_TIMEOUT_S)
        log_status.reachable = True
    except Exception as exc:
        log_status.error = _why(exc)
    hosts = [
        (e.state.hostname, str(e.state.state))
        for _, e in node.model.of_kind(host_domain.KIND)
        if e.state is not None
    ]
    members, leaders, agents = await asyncio.gather(
        asyncio.gather(*(_etcd_member(e) for e in etcd_endpoints)),
        asyncio.gather(*(_leader(node, etcd_endpoints, r) for r in ROLES)),
        asyncio.gather(*(_agent(etcd_endpoints, h, s) for h, s in sorted(hosts))),
    )
    return pb.ClusterStatus(
        node=pb.ApiNodeStatus(
            node_id=NODE_ID,
            read_model_position=node.model.position,
            uptime_s=time.monotonic() - STARTED,
        ),
        event_log=log_status,
        coordination="etcd" if etcd_endpoints else "embedded",
        etcd=members,
        leaders=leaders,
        agents=agents,
    )


def _backend(node: Node) -> str:
    name = type(getattr(node.log, "_backend", node.log)).__name__
    for known in ("postgres", "sqlite"):
        if known in name.lower():
            return "postgresql" if known == "postgres" else known
    return name
