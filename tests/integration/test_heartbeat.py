"""Heartbeat suspicion against real agents in namespaces, before the etcd lease expires.

Real pieces (`vim.harness.hostlab`): PostgreSQL, etcd, `vim-api`, `vim-scheduler`,
`vim-faultd` (heartbeats on by default: 0.2 s, suspect after 0.8 s) and two
namespace hosts, each with its own `vim-agent` answering heartbeats on its
management address (the default). host1 is registered with `netns://` power (a
usable BMC driver), host2 without any (self-fencing only).

Evidence asserted:

* each agent publishes ``udp://<management ip>:<port>`` in its liveness record;
* host1's links cut: a `HeartbeatMonitor` in this process (the fault manager's
  own class) suspects it within suspect_after + interval (bounded by LIMIT_S), while its
  liveness key is still in etcd; the real `vim-faultd` records
  `HostFailureDetected` "no heartbeat answer (lease still held)" within LIMIT_S of
  the cut and fences it;
* host2's agent SIGSTOPped (a stuck agent): it stops answering and is suspected
  while its key is still in etcd; SIGCONT: it answers again. The real
  `vim-faultd` records nothing for host2: without a BMC driver a host is judged
  by its lease alone.

The agents run with a lease TTL of 3 s (not the default 2 s) so that "the key
still exists when the heartbeat suspects" does not depend on how late etcd
happens to expire a lease on the loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ha.liveness import LivenessRecord, parse_udp_endpoint, read_liveness
from tests import waiting
from vim.domain import host as dhost
from vim.eventlog.sql import SqlEventLog
from vim.faultd.heartbeat import HeartbeatMonitor
from vim.harness.hostlab import HostLab

pytestmark = [pytest.mark.postgres, pytest.mark.etcd, pytest.mark.slow]

HOSTS = ("host1", "host2")
TTL_S = 3
INTERVAL_S, SUSPECT_AFTER_S = 0.2, 0.8
# Suspicion is due within SUSPECT_AFTER_S + INTERVAL_S (1.0 s); the bound leaves a loaded
# 2-core machine a second of slack and stays below the lease (TTL_S: at least 2 s).
LIMIT_S = 2.0


async def until(what: str, check: Any, timeout_s: float = 30.0, every_s: float = 0.01) -> Any:
    """`tests.waiting.until`, polling faster by default: these waits are timed."""
    return await waiting.until(what, check, timeout_s, every_s)


@pytest.fixture
async def lab(pg_url: str, tmp_path: Path) -> AsyncIterator[HostLab]:
    the_lab = await asyncio.to_thread(
        HostLab.start, tmp_path / "lab", pg_url, HOSTS, agent_ttl_s=TTL_S, bmc_hosts=["host1"]
    )
    try:
        yield the_lab
    finally:
        for agent in the_lab.agents.values():  # never leave a stopped process behind
            if agent.alive() and agent.proc is not None:
                agent.proc.send_signal(signal.SIGCONT)
        await asyncio.to_thread(the_lab.stop)


async def test_heartbeats_suspect_a_cut_host_and_a_stuck_agent_before_the_lease_expires(
    lab: HostLab, pg_url: str
) -> None:
    etcd = lab.etcd_endpoints().split(",")
    records: dict[str, LivenessRecord] = {}
    for name in HOSTS:
        got = await until(f"{name}'s liveness record", lambda n=name: read_liveness(etcd, n))
        assert parse_udp_endpoint(got.agent_endpoint) is not None, got
        assert got.agent_endpoint.startswith(f"udp://{lab.lab.host(name).mgmt_ip}:")
        records[name] = got

    monitor = HeartbeatMonitor(INTERVAL_S, SUSPECT_AFTER_S)
    monitor.set_targets(records)
    task = asyncio.create_task(monitor.run())
    log = await SqlEventLog.open(pg_url, migrate=False)
    try:
        for name in HOSTS:
            await until(f"{name} answering", lambda n=name: monitor.table.last_proof(n))
        # vim-faultd suspects only hosts that answered it once: wait for its word on host1.
        faultd_log = lab.workdir / "faultd.log"
        await until(
            "vim-faultd hearing host1",
            lambda: "agent of host1 answers heartbeats" in faultd_log.read_text(errors="replace"),
        )

        # A cut host: suspected fast, while its lease is still held in etcd.
        cut_wall, cut = time.time(), time.monotonic()
        await asyncio.to_thread(lab.cut, "host1")
        await until("host1 suspected", lambda: "host1" in monitor.suspected(), 5)
        suspected_s = time.monotonic() - cut
        still = await read_liveness(etcd, "host1")
        assert suspected_s < LIMIT_S, suspected_s
        assert still is not None and still.pid == records["host1"].pid
        assert "host2" not in monitor.suspected()

        async def detected() -> Any:
            for e in await log.read_stream(dhost.stream("host1")):
                if e.type == "HostFailureDetected":
                    return e
            return None

        fact = await until("vim-faultd's HostFailureDetected", detected, 10, 0.05)
        assert fact.data["detail"].startswith("no heartbeat answer (lease still held)")
        assert fact.recorded_at.timestamp() - cut_wall < LIMIT_S

        # A stuck agent: SIGSTOP, silent, suspected; its lease still there; SIGCONT: back.
        proc = lab.agents["host2"].proc
        assert proc is not None
        stopped = time.monotonic()
        proc.send_signal(signal.SIGSTOP)
        try:
            await until("host2 suspected", lambda: "host2" in monitor.suspected(), 5)
            assert time.monotonic() - stopped < LIMIT_S
            assert await read_liveness(etcd, "host2") is not None
        finally:
            proc.send_signal(signal.SIGCONT)
        await until("host2 answering again", lambda: "host2" not in monitor.suspected(), 5)
        types = [e.type for e in await log.read_stream(dhost.stream("host2"))]
        assert "HostFailureDetected" not in types  # no BMC driver: the lease alone decides
        await until(
            "host1 fenced",
            lambda: _has(log, "host1", "HostFenceConfirmed"),
            10,
            0.05,
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await log.close()


async def _has(log: SqlEventLog, hostname: str, event_type: str) -> bool:
    return any(e.type == event_type for e in await log.read_stream(dhost.stream(hostname)))
