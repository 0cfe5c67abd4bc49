"""A compute host partitioned by nftables (not killed): self-fence, recovery, no restart.

Real pieces (`vim.harness.hostlab`): PostgreSQL, etcd, `vim-api`, `vim-scheduler`
and `vim-faultd` processes, three namespace hosts each with its own `vim-agent`
on its own libvirt `test:///` node. Inside host1's namespace an nftables table
drops everything in and out; its agent keeps running and cannot renew its lease.

host1 is registered WITHOUT a BMC endpoint, on purpose: with `netns://` the
fault manager's `NetnsPowerDriver` would SIGKILL every process in the namespace
(the agent included) about as soon as the lease is gone, so nothing would be
left to show that the agent fences itself and holds after the partition heals.
Without an endpoint the fault manager can only rely on self-fencing: it
confirms the fence at lease loss + TTL + margin (`SelfFenceTimeout`), and only
then evacuates. The other two hosts have `netns://` endpoints, as in the
benchmark.

Evidence asserted:

* the agent self-fences (its log says so) while it is still alive, and the
  fault manager confirms the fence and evacuates only after the agent's
  recorded fence time: the servers never run on two hosts;
* host1's servers become ACTIVE on other hosts, their domains running there;
* after the partition heals (the table is deleted), host1's agent records
  `HostSelfFenced` (with the destroyed domains counted) and the host returns
  to UP, yet its libvirt node never runs the evacuated servers again, watched
  across the post-fence hold and beyond, while they stay ACTIVE elsewhere.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.waiting import until
from vim._gen.vim.v1 import (
    compute_pb2,
    compute_pb2_grpc,
    flavours_pb2,
    flavours_pb2_grpc,
    hosts_pb2,
    hosts_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
)
from vim.domain import host as dhost
from vim.eventlog.sql import SqlEventLog
from vim.harness.hostlab import HostLab, LabAgent

pytestmark = [pytest.mark.postgres, pytest.mark.etcd, pytest.mark.slow]

HOSTS = ("host1", "host2", "host3")
VICTIM = "host1"
TTL_S = 2
POST_FENCE_HOLD_S = 2 * TTL_S  # the agent's default


@pytest.fixture
async def lab(pg_url: str, tmp_path: Path) -> AsyncIterator[HostLab]:
    the_lab = await asyncio.to_thread(
        HostLab.start,
        tmp_path / "lab",
        pg_url,
        HOSTS,
        agent_ttl_s=TTL_S,
        bmc_hosts=[h for h in HOSTS if h != VICTIM],
    )
    try:
        yield the_lab
    finally:
        await asyncio.to_thread(the_lab.stop)


@pytest.fixture
async def log(pg_url: str) -> AsyncIterator[SqlEventLog]:
    event_log = await SqlEventLog.open(pg_url, migrate=False)
    yield event_log
    await event_log.close()


def _wall(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _active(s: compute_pb2.Server) -> bool:
    return bool(s.host and s.state == compute_pb2.SERVER_STATE_ACTIVE and not s.task)


async def test_partitioned_host_self_fences_is_recovered_and_does_not_restart_after_healing(
    lab: HostLab, log: SqlEventLog
) -> None:
    admin, member = lab.admin_metadata(), lab.member_metadata()
    async with grpc.aio.insecure_channel(lab.api_address) as ch:
        compute = compute_pb2_grpc.ComputeStub(ch)
        hosts = hosts_pb2_grpc.HostsStub(ch)
        endpoints = {
            h: (
                await hosts.GetHost(hosts_pb2.GetHostRequest(hostname=h), metadata=admin)
            ).bmc_endpoint
            for h in HOSTS
        }
        # host1: self-fencing only (see the module docstring); the others: netns power.
        assert endpoints == {
            h: "" if h == VICTIM else f"netns://{lab.lab.host(h).netns}" for h in HOSTS
        }

        sids = await _allocate(ch, admin, member, 6)

        async def servers() -> dict[str, compute_pb2.Server]:
            got = await asyncio.gather(
                *(
                    compute.GetServer(compute_pb2.GetServerRequest(server_id=s), metadata=member)
                    for s in sids
                )
            )
            return dict(zip(sids, got, strict=True))

        async def all_running() -> dict[str, compute_pb2.Server] | None:
            now = await servers()
            ok = all(_active(s) and sid in lab.agents[s.host].running() for sid, s in now.items())
            return now if ok else None

        placed = await until("every server ACTIVE and running", all_running)
        doomed = sorted(sid for sid, s in placed.items() if s.host == VICTIM)
        assert doomed, "the scheduler spreads: host1 must run servers"
        agent = lab.agents[VICTIM]
        pid = agent.proc.pid if agent.proc else 0

        # The partition: nothing in or out of host1; its agent keeps running.
        partitioned_at = time.time()
        await asyncio.to_thread(lab.partition, VICTIM)
        partitioned = time.monotonic()
        await until(
            "the agent's self-fence",
            lambda: "self-fenced" in agent.log_path.read_text(errors="replace"),
            timeout_s=4 * TTL_S,
        )
        assert agent.alive() and agent.proc is not None and agent.proc.pid == pid

        async def recovered() -> dict[str, compute_pb2.Server] | None:
            now = await servers()
            moved = {sid: now[sid] for sid in doomed}
            ok = all(
                _active(s) and s.host != VICTIM and sid in lab.agents[s.host].running()
                for sid, s in moved.items()
            )
            return moved if ok else None

        moved = await until("host1's servers ACTIVE elsewhere", recovered, timeout_s=30)
        recovered_in = time.monotonic() - partitioned
        assert agent.alive()  # nobody killed it: it fenced itself

        # Heal: the agent proves its lease again, records the fence and holds.
        passes_before = (agent.status() or {}).get("passes", 0)
        await asyncio.to_thread(lab.heal, VICTIM)
        healed_at = time.monotonic()

        async def self_fence_recorded() -> dict[str, Any] | None:
            for e in await log.read_stream(dhost.stream(VICTIM)):
                if e.type == "HostSelfFenced":
                    return dict(e.data)
            return None

        record = await until("HostSelfFenced in the log", self_fence_recorded, timeout_s=20)
        recorded_in = time.monotonic() - healed_at
        assert record["domains_destroyed"] >= len(doomed)
        assert _wall(record["fenced_at"]) >= partitioned_at

        async def up() -> bool:
            h = await hosts.GetHost(hosts_pb2.GetHostRequest(hostname=VICTIM), metadata=admin)
            return h.state == hosts_pb2.HOST_STATE_UP

        await until("host1 UP again", up, timeout_s=20)
        # The status file is written by passes; none runs while the agent is cut off, so
        # wait for one after the healing before reading what its node runs.
        await until(
            "a pass after the healing",
            lambda: (agent.status() or {}).get("passes", 0) > passes_before,
            timeout_s=20,
        )
        # Watch across the post-fence hold and a few passes more: host1's node never runs
        # the evacuated servers, which stay ACTIVE where they were rebuilt.
        await _never_runs(agent, doomed, max(healed_at + POST_FENCE_HOLD_S, time.monotonic()) + 3)
        status = agent.status()
        assert status is not None and status["passes"] > passes_before  # it kept reconciling
        assert not status["fenced"] and not set(status["domains"]) & set(doomed)
        now = await servers()
        for sid in doomed:
            assert _active(now[sid]) and now[sid].host == moved[sid].host

    await _check_order(log, record, doomed)
    print(
        f"\n[partition] {len(doomed)} servers ACTIVE elsewhere {recovered_in:.2f}s after the"
        f" partition; HostSelfFenced recorded {recorded_in:.2f}s after healing"
    )


async def _never_runs(agent: LabAgent, sids: list[str], deadline: float) -> None:
    """Until ``deadline``: the agent lives and its node runs none of ``sids``."""
    while time.monotonic() < deadline:
        assert agent.alive()
        assert not agent.running() & set(sids), agent.status()
        await asyncio.sleep(0.1)


async def _allocate(ch: grpc.aio.Channel, admin: Any, member: Any, count: int) -> list[str]:
    """A public flavour and image, then ``count`` servers without NICs; their ids."""
    flavour = await flavours_pb2_grpc.FlavoursStub(ch).CreateFlavour(
        flavours_pb2.CreateFlavourRequest(
            request_id="f", name="m1.tiny", vcpus=1, ram_mb=256, disk_gb=1, is_public=True
        ),
        metadata=admin,
    )
    image = await images_pb2_grpc.ImagesStub(ch).AddImage(
        images_pb2.AddImageRequest(
            request_id="i",
            name="cirros",
            disk_format=images_pb2.DISK_FORMAT_QCOW2,
            size_bytes=1024,
            checksum="a" * 64,
            visibility=images_pb2.VISIBILITY_PUBLIC,
        ),
        metadata=admin,
    )
    compute = compute_pb2_grpc.ComputeStub(ch)
    sids = []
    for i in range(count):
        made = await compute.AllocateCompute(
            compute_pb2.AllocateComputeRequest(
                request_id=str(uuid.uuid4()),
                name=f"vm{i}",
                flavour_id=flavour.flavour_id,
                image_id=image.image_id,
            ),
            metadata=member,
        )
        sids.append(made.server_id)
    return sids


async def _check_order(log: SqlEventLog, record: dict[str, Any], doomed: list[str]) -> None:
    """The fault manager confirmed the fence, and evacuated, only after the agent had
    destroyed its domains (so the servers never ran on two hosts)."""
    records = await log.read_all(after=0, limit=100_000)
    fenced = [e for e in records if e.type == "HostFenceConfirmed" and e.data["hostname"] == VICTIM]
    evacuations = [
        e
        for e in records
        if e.type == "ServerEvacuationRequested" and e.data["server_id"] in doomed
    ]
    assert len(fenced) == 1 and len(evacuations) == len(doomed)
    fenced_at = _wall(record["fenced_at"])
    for e in [*fenced, *evacuations]:
        assert e.recorded_at.timestamp() > fenced_at, e.type
    assert all(e.position > fenced[0].position for e in evacuations)
