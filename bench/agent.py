"""Agent benchmark: create accepted -> domain running, reconcile after a restart, agent memory.

Run ``python -m bench.agent --quick`` (about a minute) or ``python -m bench.agent``.
Method:

* One in-process API node on a SQLite log in a temporary directory, with the
  scheduler beside it (in-process, placing as soon as the read model moves), and
  four ``vim-agent`` processes, each on its own libvirt ``test:///PATH`` node
  (no daemon; ``--ovs none``, no etcd): three hosts in zone ``za`` for the
  latency phase, one large host in zone ``zb`` for the reconcile phase.
* Latency: ``--creates`` servers (no NICs) are allocated in zone ``za``, one every
  ``--interval`` seconds (open loop: the schedule is fixed in advance, so a slow
  control plane is charged for it), each timed from the AllocateCompute answer
  (accepted, durable) to ``ServerScheduled`` (the scheduler placed it) and to the
  agent's ``ServerStateReported`` ACTIVE (its domain is running: the agent reports
  only after libvirt says so), both seen by following the log in process.
  Side by side: the scheduler's share and the agent's share of the total.
* Reconcile: 200 servers in zone ``zb`` (all on the large host), then the agent is
  SIGKILLed and started again. A ``test:///PATH`` node lives only inside its
  libvirt connection, so the restarted agent finds an empty node and must define
  and start all 200 domains again: the time from its start to its status file
  showing 200 running domains is ``reconcile_200_s`` (its initial convergence of
  the same 200, from the first allocation, is shown beside it). No report is
  appended on the restart (the control plane already knows they run): checked.
* Memory: the agent's VmRSS with 200 servers, from /proc.

Progress goes to stderr; the last stdout line is one JSON object with
``create_to_running_p50_s``, ``create_to_running_p99_s``, ``reconcile_200_s``,
``agent_rss_mb`` and the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench._common import emit_result, percentile, progress, ratio
from vim._gen.vim.v1 import (
    compute_pb2,
    compute_pb2_grpc,
    flavours_pb2,
    flavours_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
)
from vim.api.auth import Authenticator
from vim.api.server import ApiConfig, ApiNode
from vim.harness.testnode import write_test_node
from vim.scheduler.service import SchedulerConfig, SchedulerService

SECRET = b"b" * 32
AUTH = Authenticator(SECRET)
ADMIN = (("authorization", "Bearer " + AUTH.mint("ops", "ops", ["admin"])),)
MEMBER = (("authorization", "Bearer " + AUTH.mint("bench", "t1", ["member"])),)
ROOT = Path(__file__).resolve().parents[1]
RECONCILE_SERVERS = 200


@dataclass
class Agent:
    hostname: str
    zone: str
    workdir: Path
    api: str
    cpus: int
    memory_mib: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.status_file.unlink(missing_ok=True)
        uri = write_test_node(self.workdir / "node.xml", cpus=self.cpus, memory_mib=self.memory_mib)
        argv = [
            sys.executable,
            "-m",
            "vim.agent.service",
            "--hostname",
            self.hostname,
            "--zone",
            self.zone,
            "--api",
            self.api,
            "--libvirt-uri",
            uri,
            "--state-dir",
            str(self.workdir / "state"),
            "--ovs",
            "none",
            "--resync",
            "5",
            "--status-file",
            str(self.status_file),
            "--vcpus",
            str(self.cpus),
            "--ram-mb",
            str(self.memory_mib),
            "--disk-gb",
            str(self.cpus * 10),
            "--log-level",
            "WARNING",
        ]
        env = {**os.environ, "VIM_AGENT_TOKEN": AUTH.mint_agent(self.hostname)}
        log = (self.workdir / "agent.log").open("ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return started

    @property
    def status_file(self) -> Path:
        return self.workdir / "status.json"

    def running(self) -> int:
        try:
            status = json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return 0
        return sum(1 for p in status["domains"].values() if p == "RUNNING")

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=15)


class Timeline:
    """First time each server was scheduled and reported ACTIVE, from the log."""

    def __init__(self) -> None:
        self.scheduled: dict[str, float] = {}
        self.active: dict[str, float] = {}
        self.reports = 0

    async def follow(self, node: ApiNode) -> None:
        assert node.node is not None
        async for e in node.node.log.subscribe(after=await node.node.log.head()):
            now = time.perf_counter()
            sid = str(e.data.get("server_id", ""))
            if e.type == "ServerScheduled":
                self.scheduled.setdefault(sid, now)
            elif e.type == "ServerStateReported":
                self.reports += 1
                if e.data.get("state") == "ACTIVE":
                    self.active.setdefault(sid, now)


async def wait_for(what: str, check: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def agents_stopped(agents: list[Agent]) -> Iterator[None]:
    try:
        yield
    finally:
        for a in agents:
            with contextlib.suppress(Exception):
                a.kill()


async def run(creates: int, interval_s: float, workdir: Path) -> dict[str, Any]:
    node = ApiNode(
        ApiConfig(
            listen="127.0.0.1:0",
            eventlog_url=f"sqlite:///{workdir}/log.db",
            metrics_listen=None,
            auth_secret=SECRET,
        )
    )
    await node.start()
    assert node.node is not None
    scheduler = SchedulerService(
        node.node.log, node.node.model, config=SchedulerConfig(idle_wait_s=0.2)
    )
    timeline = Timeline()
    tasks = [asyncio.create_task(scheduler.run()), asyncio.create_task(timeline.follow(node))]
    small = [
        Agent(f"cmp-{i}", "za", workdir / f"cmp-{i}", node.address, 64, 65536) for i in (1, 2, 3)
    ]
    big = Agent("big-1", "zb", workdir / "big-1", node.address, 128, 131072)
    agents = [*small, big]
    try:
        with agents_stopped(agents):
            for a in agents:
                a.start()
            await wait_for(
                "agents' first pass", lambda: all(a.status_file.exists() for a in agents), 60
            )
            async with grpc.aio.insecure_channel(node.address) as ch:
                flavour_id, image_id = await catalogue(ch)
                compute = compute_pb2_grpc.ComputeStub(ch)
                latency = await latency_phase(
                    compute, timeline, flavour_id, image_id, creates, interval_s
                )
                recon = await reconcile_phase(compute, timeline, big, flavour_id, image_id)
    finally:
        await scheduler.stop()
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await node.stop()
    return {**latency, **recon}


async def catalogue(ch: grpc.aio.Channel) -> tuple[str, str]:
    flavour = await flavours_pb2_grpc.FlavoursStub(ch).CreateFlavour(
        flavours_pb2.CreateFlavourRequest(
            request_id="f", name="m1.tiny", vcpus=1, ram_mb=256, disk_gb=1, is_public=True
        ),
        metadata=ADMIN,
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
        metadata=ADMIN,
    )
    return flavour.flavour_id, image.image_id


async def allocate(
    compute: compute_pb2_grpc.ComputeStub, flavour_id: str, image_id: str, zone: str, name: str
) -> tuple[str, float]:
    made = await compute.AllocateCompute(
        compute_pb2.AllocateComputeRequest(
            request_id=str(uuid.uuid4()),
            name=name,
            flavour_id=flavour_id,
            image_id=image_id,
            zone=zone,
        ),
        metadata=MEMBER,
    )
    return made.server_id, time.perf_counter()


async def latency_phase(
    compute: compute_pb2_grpc.ComputeStub,
    timeline: Timeline,
    flavour_id: str,
    image_id: str,
    creates: int,
    interval_s: float,
) -> dict[str, Any]:
    progress(f"latency: {creates} creates, one every {interval_s * 1000:.0f} ms, 3 hosts")
    start = time.perf_counter()
    accepted: dict[str, float] = {}

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i * interval_s - time.perf_counter()))
        sid, at = await allocate(compute, flavour_id, image_id, "za", f"lat{i}")
        accepted[sid] = at

    await asyncio.gather(*(one(i) for i in range(creates)))
    await wait_for("every server ACTIVE", lambda: all(s in timeline.active for s in accepted), 120)
    total = [timeline.active[s] - t for s, t in accepted.items()]
    sched = [timeline.scheduled[s] - t for s, t in accepted.items()]
    agent_part = [timeline.active[s] - timeline.scheduled[s] for s in accepted]
    result = {
        "creates": creates,
        "create_to_running_p50_s": round(percentile(total, 50), 4),
        "create_to_running_p99_s": round(percentile(total, 99), 4),
        "create_to_scheduled_p50_s": round(percentile(sched, 50), 4),
        "scheduled_to_running_p50_s": round(percentile(agent_part, 50), 4),
        "scheduled_to_running_p99_s": round(percentile(agent_part, 99), 4),
        "agent_share_of_p50": round(ratio(percentile(agent_part, 50), percentile(total, 50)), 3),
    }
    progress(f"latency: {result}")
    return result


async def reconcile_phase(
    compute: compute_pb2_grpc.ComputeStub,
    timeline: Timeline,
    big: Agent,
    flavour_id: str,
    image_id: str,
) -> dict[str, Any]:
    progress(f"reconcile: {RECONCILE_SERVERS} servers on one host")
    first = time.perf_counter()
    sids = [
        (await allocate(compute, flavour_id, image_id, "zb", f"big{i}"))[0]
        for i in range(RECONCILE_SERVERS)
    ]
    await wait_for(
        "200 ACTIVE", lambda: all(s in timeline.active for s in sids) and big.running() == 200, 300
    )
    initial_s = time.perf_counter() - first
    reports = timeline.reports
    big.kill()
    started = big.start()
    await wait_for("200 running again", lambda: big.running() == RECONCILE_SERVERS, 300)
    reconcile_s = time.perf_counter() - started
    rss = big.rss_mb()
    await asyncio.sleep(0.5)  # let any report the restart might (wrongly) send reach the log
    result = {
        "reconcile_200_s": round(reconcile_s, 3),
        "initial_converge_200_s": round(initial_s, 3),
        "reconcile_vs_initial": round(ratio(reconcile_s, initial_s), 3),
        "agent_rss_mb": round(rss, 1),
        "reports_after_restart": timeline.reports - reports,
    }
    progress(f"reconcile: {result}")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="30 creates instead of 150")
    p.add_argument("--creates", type=int, default=None)
    p.add_argument("--interval", type=float, default=0.1, help="seconds between creates")
    a = p.parse_args(argv)
    creates = a.creates or (30 if a.quick else 150)

    # SIGTERM unwinds like Ctrl-C, so the agent processes are killed on the way out;
    # a second SIGTERM (e.g. from `timeout` forwarding it) must not cut that short.
    def terminate(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sys.exit(143)

    signal.signal(signal.SIGTERM, terminate)
    with tempfile.TemporaryDirectory(prefix="vim-bench-agent-") as tmp:
        result = asyncio.run(run(creates, a.interval, Path(tmp)))
    emit_result({"benchmark": "agent", "quick": a.quick, **result})


if __name__ == "__main__":
    main()
