"""A paused `vim-scheduler` leader is refused by the event log and steps down.

Real PostgreSQL (the session's) and a real 1-member etcd; two real
``vim-scheduler`` processes. Scheduler A runs with the test-only fault
injection ``VIM_SCHEDULER_FAULT_APPEND_DELAY_S``: each of its appends waits
after its leadership check and says so on stderr. The test SIGSTOPs A inside
that window (a leader paused between deciding and writing), lets its lease
expire, sees B take over and place servers, then SIGCONTs A. A's write, decided
under its old term, must be refused (``FencedOut``), and A must step down.
The verdict comes from the log itself: every placement once, none with A's
token after B's first write.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vim.eventlog.sql import SqlEventLog
from vim.harness.etcd import EtcdCluster
from vim.harness.placement import placements, register_hosts, request_server
from vim.harness.processes import ServiceProcess

pytestmark = [pytest.mark.postgres, pytest.mark.etcd, pytest.mark.slow]

TTL = 2
DELAY_S = 3.0
SCHEDULER = str(Path(sys.executable).parent / "vim-scheduler")
LEADS = r"scheduler (\S+) leads with token (\d+)"


@pytest.fixture
async def log(pg_url: str) -> AsyncIterator[SqlEventLog]:
    opened = await SqlEventLog.open(pg_url, migrate=False)
    yield opened
    await opened.close()


async def _placed(log: SqlEventLog, server_id: str, within: float) -> int | None:
    """The token ``server_id`` was placed with, polling the log until ``within``."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        found = [p for p in await placements(log) if p.server_id == server_id]
        if found:
            return found[0].token
        await asyncio.sleep(0.05)
    pytest.fail(f"{server_id} was not placed within {within}s")


async def test_paused_scheduler_leader_is_fenced_out_and_steps_down(
    pg_url: str, log: SqlEventLog
) -> None:
    await register_hosts(log, 3)
    procs: list[ServiceProcess] = []
    with EtcdCluster.start(size=1) as etcd:
        common = ["--eventlog-url", pg_url, "--etcd", etcd.endpoints[0], "--lease-ttl", str(TTL)]
        try:
            a = await ServiceProcess.start(
                [SCHEDULER, *common],
                name="scheduler-a",
                env={"VIM_SCHEDULER_FAULT_APPEND_DELAY_S": str(DELAY_S)},
            )
            procs.append(a)
            _, _, led = await a.wait_for(LEADS, 30)
            old_token = int(led[2])
            b = await ServiceProcess.start([SCHEDULER, *common], name="scheduler-b")
            procs.append(b)
            await b.wait_for(r"campaigns for scheduler", 30)

            # A decides to place s1, then is paused before its write leaves.
            await request_server(log, "s1")
            await a.wait_for(rf"fault injection: append with token {old_token}\b", 30)
            a.signal(signal.SIGSTOP)
            stopped = time.monotonic()

            # B takes over by lease expiry (A's connection stays up: no fast signal).
            _, led_at, b_led = await b.wait_for(LEADS, TTL + 10)
            new_token = int(b_led[2])
            assert new_token > old_token
            took_over = led_at - stopped
            print(f"\n[paused leader] B leads {took_over:.2f}s after A was stopped")
            assert took_over <= TTL + 2.0  # lease expiry (TTL) + B's next try; loose on load
            assert await _placed(log, "s1", 30) == new_token
            await request_server(log, "s2")
            assert await _placed(log, "s2", 30) == new_token

            # A resumes: its pending write is refused and it stops leading.
            seen = len(a.lines)
            a.signal(signal.SIGCONT)
            await a.wait_for(r"scheduler fenced out, stepping down", 30, after=seen)
            await a.wait_for(r"stops leading scheduler", 30, after=seen)
            refused = a.count(r"scheduler fenced out")
            print(f"[paused leader] writes refused: {refused}")
            assert refused >= 1
            assert b.count(r"scheduler fenced out") == 0

            # B still leads and keeps placing; A never wrote with its old token again.
            await request_server(log, "s3")
            assert await _placed(log, "s3", 30) == new_token
            assert a.count(LEADS) == 1
            done = await placements(log)
            assert Counter(p.server_id for p in done) == {"s1": 1, "s2": 1, "s3": 1}
            assert {p.token for p in done} == {new_token}
            assert await log.fencing_token("scheduler") == new_token
        finally:
            for proc in procs:
                proc.signal(signal.SIGCONT)
                await proc.close()
