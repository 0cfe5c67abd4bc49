"""Host failover benchmark: power loss of a compute host -> alarm, servers ACTIVE elsewhere.

Run ``python -m bench.host_failover --quick`` (5 rounds) or without ``--quick`` (20).
Method:

* One PostgreSQL 15 (``vim.harness.postgres``, ``fsync`` on) holds the event log;
  :class:`vim.harness.hostlab.HostLab` starts one etcd member, one ``vim-api``,
  one ``vim-scheduler`` and one ``vim-faultd`` process in the root namespace and
  three namespace hosts, each with its own ``vim-agent`` (etcd liveness lease,
  ``--ttl``, default 2 s) on its own libvirt ``test:///`` node, registered with
  ``bmc_endpoint=netns://<namespace>`` so the fault manager fences with
  ``NetnsPowerDriver``. No Open vSwitch and no SDN controller (servers have no
  NICs): the data path plays no part in detection and recovery, and three
  userspace switches cost CPU the 2-core machine needs for the measurement.
* ``--servers`` servers (default 9) are allocated through the API; the scheduler
  spreads them over the hosts.
* Each round (``--rounds``: quick 5, full 20) waits for a steady state (three
  hosts UP, every server ACTIVE and its domain running on its host), picks the
  host with the most servers and powers it off as power loss looks from outside:
  FIRST its links go down inside its namespace (nothing it sends afterwards, a
  TCP reset included, leaves it), THEN its agent is SIGKILLed, and with it the
  agent's ``test:///`` node and the domains in it. From the cut it measures:

  - ``alarm``: the host-failure alarm (``COMPUTE_NODE_FAILURE`` or
    ``HOST_HARDWARE_FAILURE``, RAISED) arriving at an independent subscriber, a
    ``vim.v1.Alarms/SubscribeAlarms`` stream held open on the API all along;
  - ``recovered``: every server of the host ACTIVE on another host, by polling
    ``Compute/GetServer`` every 20 ms.

  A sampler reads every 50 ms which servers each host's libvirt node runs (the
  agent's status file, rewritten after every reconcile pass; a dead agent's node
  died with it) and counts samples where one server runs on two hosts. Then the
  host is brought back: links up, a fresh agent, its BMC endpoint registered
  again, until the API says it is UP.
* The fault manager runs with ``--flap-max-failures 1000`` (a host failing every
  round would otherwise be held FENCED after its second failure, by design) and
  otherwise its defaults: heartbeat suspicion on (``--heartbeat-interval`` 0.2 s,
  ``--suspect-after`` 0.8 s; the agents answer on their management address);
  ``--suspect-after 0`` is the lease alone; ``--compare-lease-only`` runs the
  same rounds again in a fresh lab with ``--suspect-after 0`` and reports them
  under ``lease_only`` in the same JSON line; ``--etcd-tuned`` with ``--ttl 1``
  shows the shorter lease.

Progress goes to stderr; the last stdout line is one JSON object with
``alarm_p50_s``, ``alarm_p99_s``, ``recovered_p50_s``, ``recovered_p99_s``,
``vm_on_two_hosts_samples``, ``lost_servers``, ``rounds`` and the split of the
recovery (detected, fenced, evacuated, scheduled, ACTIVE) from the log's facts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench._common import emit_result, percentile, progress
from vim._gen.vim.v1 import (
    alarms_pb2,
    alarms_pb2_grpc,
    compute_pb2,
    compute_pb2_grpc,
    flavours_pb2,
    flavours_pb2_grpc,
    hosts_pb2,
    hosts_pb2_grpc,
    images_pb2,
    images_pb2_grpc,
)
from vim.eventlog import migrating
from vim.eventlog.sql import SqlEventLog
from vim.harness.hostlab import HostLab
from vim.harness.postgres import PostgresServer

HOSTS = ("host1", "host2", "host3")
FAILURE_TYPES = ("COMPUTE_NODE_FAILURE", "HOST_HARDWARE_FAILURE")
ROUND_TIMEOUT_S = 60.0
STEADY_TIMEOUT_S = 60.0
GOALS = {"alarm_p99_s": 1.5, "recovered_p99_s": 3.0}


@dataclass
class Alarms:
    """Host-failure alarms as the independent subscriber received them."""

    raised: list[tuple[str, float]] = field(default_factory=list)
    """(hostname, monotonic arrival) of each RAISED host-failure alarm."""
    error: str = ""

    async def follow(self, ch: grpc.aio.Channel, md: Any) -> None:
        stub = alarms_pb2_grpc.AlarmsStub(ch)
        request = alarms_pb2.SubscribeAlarmsRequest(
            filter=alarms_pb2.AlarmFilter(resource_type=alarms_pb2.RESOURCE_TYPE_HOST),
            heartbeat_interval_ms=1000,
        )
        try:
            async for msg in stub.SubscribeAlarms(request, metadata=md):
                if not msg.HasField("notification"):
                    continue
                note = msg.notification
                if (
                    note.change == alarms_pb2.ALARM_CHANGE_RAISED
                    and note.alarm.fault_type in FAILURE_TYPES
                ):
                    self.raised.append((note.alarm.managed_object_id, time.monotonic()))
        except grpc.aio.AioRpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"

    def first_after(self, host: str, t0: float) -> float | None:
        return next((at for h, at in self.raised if h == host and at >= t0), None)


@dataclass
class Sampler:
    """Every 50 ms: does any server run on two hosts' libvirt nodes?"""

    lab: HostLab
    samples: int = 0
    on_two_hosts: int = 0
    seen: list[str] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            count: Counter[str] = Counter()
            for agent in self.lab.agents.values():
                count.update(agent.running())
            self.samples += 1
            doubled = sorted(sid for sid, n in count.items() if n > 1)
            if doubled:
                self.on_two_hosts += 1
                self.seen.extend(doubled)
            await asyncio.sleep(0.05)


async def until(what: str, check: Any, timeout_s: float, every_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(every_s)


class Cloud:
    def __init__(self, lab: HostLab, ch: grpc.aio.Channel) -> None:
        self.lab = lab
        self.admin = lab.admin_metadata()
        self.member = lab.member_metadata()
        self.compute = compute_pb2_grpc.ComputeStub(ch)
        self.hosts = hosts_pb2_grpc.HostsStub(ch)
        self.ch = ch

    async def catalogue(self) -> tuple[str, str]:
        flavour = await flavours_pb2_grpc.FlavoursStub(self.ch).CreateFlavour(
            flavours_pb2.CreateFlavourRequest(
                request_id="f", name="m1.tiny", vcpus=1, ram_mb=256, disk_gb=1, is_public=True
            ),
            metadata=self.admin,
        )
        image = await images_pb2_grpc.ImagesStub(self.ch).AddImage(
            images_pb2.AddImageRequest(
                request_id="i",
                name="cirros",
                disk_format=images_pb2.DISK_FORMAT_QCOW2,
                size_bytes=1024,
                checksum="a" * 64,
                visibility=images_pb2.VISIBILITY_PUBLIC,
            ),
            metadata=self.admin,
        )
        return flavour.flavour_id, image.image_id

    async def servers(self, sids: list[str]) -> dict[str, compute_pb2.Server]:
        got = await asyncio.gather(
            *(
                self.compute.GetServer(
                    compute_pb2.GetServerRequest(server_id=s), metadata=self.member
                )
                for s in sids
            )
        )
        return dict(zip(sids, got, strict=True))

    async def host_states(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in self.lab.agents:
            h = await self.hosts.GetHost(
                hosts_pb2.GetHostRequest(hostname=name), metadata=self.admin
            )
            out[name] = h.state
        return out

    async def steady(self, sids: list[str]) -> dict[str, compute_pb2.Server] | None:
        """Every host UP with a living agent, every server ACTIVE and running on its host."""
        states = await self.host_states()
        if any(s != hosts_pb2.HOST_STATE_UP for s in states.values()):
            return None
        if not all(a.alive() for a in self.lab.agents.values()):
            return None
        servers = await self.servers(sids)
        for sid, s in servers.items():
            if not _active(s) or sid not in self.lab.agents[s.host].running():
                return None
        return servers


def _active(s: compute_pb2.Server) -> bool:
    return bool(s.host and s.state == compute_pb2.SERVER_STATE_ACTIVE and not s.task)


_PHASES = {
    "HostFailureDetected": "detected",
    "HostFenceConfirmed": "fenced",
    "ServerEvacuationRequested": "evacuated",
    "ServerScheduled": "scheduled",
}


async def _phases(log: SqlEventLog, after: int, victim: str, cut_wall: float) -> dict[str, float]:
    """Seconds from the cut to each recovery fact of this round in the log (the last one of
    each kind: the whole host's evacuation and scheduling)."""
    found: dict[str, float] = {}
    for e in await log.read_all(after=after, limit=100_000):
        key = _PHASES.get(e.type)
        if key is None or (key in ("detected", "fenced") and e.data.get("hostname") != victim):
            continue
        found[key] = max(found.get(key, 0.0), e.recorded_at.timestamp() - cut_wall)
    return found


async def one_round(
    r: int, cloud: Cloud, alarms: Alarms, sids: list[str], log: SqlEventLog
) -> dict[str, Any]:
    lab = cloud.lab
    servers = await until("a steady state", lambda: cloud.steady(sids), STEADY_TIMEOUT_S, 0.1)
    per_host = Counter(s.host for s in servers.values())
    victim = max(sorted(lab.agents), key=lambda h: per_host.get(h, 0))
    affected = [sid for sid, s in servers.items() if s.host == victim]
    head = await log.head()
    cut_wall = time.time()
    t0 = time.monotonic()
    await asyncio.to_thread(lab.cut, victim)
    lab.kill_agent(victim)
    killed_s = time.monotonic() - t0

    alarm_s = recovered_s = None
    lost: list[str] = []
    deadline = t0 + ROUND_TIMEOUT_S
    while time.monotonic() < deadline:
        if alarm_s is None and (at := alarms.first_after(victim, t0)) is not None:
            alarm_s = at - t0
        if recovered_s is None:
            now = await cloud.servers(affected)
            if all(_active(s) and s.host != victim for s in now.values()):
                recovered_s = time.monotonic() - t0
        if alarm_s is not None and recovered_s is not None:
            break
        await asyncio.sleep(0.02)
    if recovered_s is None:
        now = await cloud.servers(affected)
        lost = [sid for sid, s in now.items() if not (_active(s) and s.host != victim)]
    phases = await _phases(log, head, victim, cut_wall)
    result = {
        "round": r,
        "victim": victim,
        "servers": len(affected),
        "kill_after_cut_s": round(killed_s, 3),
        "alarm_s": None if alarm_s is None else round(alarm_s, 3),
        "recovered_s": None if recovered_s is None else round(recovered_s, 3),
        "lost": lost,
        **{f"{k}_s": round(v, 3) for k, v in phases.items()},
    }
    progress(f"round {r}: {result}")

    await asyncio.to_thread(lab.restore, victim)
    await asyncio.to_thread(lab.start_agent, victim)
    return result


async def run(
    rounds: int,
    n_servers: int,
    ttl: int,
    tuned: bool,
    workdir: Path,
    heartbeat: tuple[float, float] = (0.2, 0.8),
) -> dict[str, Any]:
    """One lab, `rounds` rounds; `heartbeat` is the fault manager's (interval, suspect
    after), suspect after 0 meaning the lease alone."""
    interval, suspect_after = heartbeat
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # see below: not while namespaces are made
    pg = await asyncio.to_thread(PostgresServer.start, fsync=True)
    lab: HostLab | None = None
    try:
        await asyncio.to_thread(pg.create_database, "vim")
        url = pg.sqlalchemy_url("vim")
        await asyncio.to_thread(migrating.upgrade, url)
        progress("control plane and three namespace hosts starting")
        lab = started = await asyncio.to_thread(
            HostLab.start,
            workdir,
            url,
            HOSTS,
            agent_ttl_s=ttl,
            etcd_tuned=tuned,
            faultd_args=[
                *("--flap-max-failures", "1000"),
                *("--heartbeat-interval", str(interval), "--suspect-after", str(suspect_after)),
            ],
        )
        # Only now: pyroute2 creates namespaces from a forked child, which a Python
        # SIGTERM handler inherited from here breaks.
        signal.signal(signal.SIGTERM, _terminate)
        log = await SqlEventLog.open(url, migrate=False)
        async with grpc.aio.insecure_channel(started.api_address) as ch:
            cloud = Cloud(started, ch)
            alarms = Alarms()
            sampler = Sampler(started)
            tasks = [
                asyncio.create_task(alarms.follow(ch, cloud.admin)),
                asyncio.create_task(sampler.run()),
            ]
            try:
                flavour_id, image_id = await cloud.catalogue()
                sids = []
                for i in range(n_servers):
                    made = await cloud.compute.AllocateCompute(
                        compute_pb2.AllocateComputeRequest(
                            request_id=str(uuid.uuid4()),
                            name=f"vm{i}",
                            flavour_id=flavour_id,
                            image_id=image_id,
                        ),
                        metadata=cloud.member,
                    )
                    sids.append(made.server_id)
                progress(f"{n_servers} servers allocated")
                results = [await one_round(r, cloud, alarms, sids, log) for r in range(rounds)]
                await until("a steady state at the end", lambda: cloud.steady(sids), 60, 0.1)
            finally:
                for t in tasks:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
                await log.close()
    finally:
        if lab is not None:
            await asyncio.to_thread(lab.stop)
        await asyncio.to_thread(pg.cleanup)
    out = summarize(results, sampler, alarms, ttl, tuned)
    out["heartbeat_interval_s"] = interval
    out["suspect_after_s"] = suspect_after
    return out


def summarize(
    results: list[dict[str, Any]], sampler: Sampler, alarms: Alarms, ttl: float, tuned: bool
) -> dict[str, Any]:
    alarm = [r["alarm_s"] for r in results if r["alarm_s"] is not None]
    recovered = [r["recovered_s"] for r in results if r["recovered_s"] is not None]

    def p(values: list[float], q: float) -> float:
        return round(percentile(values, q), 3)

    phases = {
        f"{k}_p50_s": p([r[f"{k}_s"] for r in results if f"{k}_s" in r], 50)
        for k in ("detected", "fenced", "evacuated", "scheduled")
    }
    out: dict[str, Any] = {
        "rounds": len(results),
        "agent_ttl_s": ttl,
        "etcd_tuned": tuned,
        "servers_per_round": [r["servers"] for r in results],
        "alarm_p50_s": p(alarm, 50),
        "alarm_p99_s": p(alarm, 99),
        "alarms_missing": len(results) - len(alarm),
        "recovered_p50_s": p(recovered, 50),
        "recovered_p99_s": p(recovered, 99),
        **phases,
        "vm_on_two_hosts_samples": sampler.on_two_hosts,
        "samples": sampler.samples,
        "lost_servers": sum(len(r["lost"]) for r in results),
        "subscriber_error": alarms.error,
    }
    out["goals_met"] = {
        "alarm_p99_s": out["alarm_p99_s"] <= GOALS["alarm_p99_s"] and not out["alarms_missing"],
        "recovered_p99_s": out["recovered_p99_s"] <= GOALS["recovered_p99_s"],
        "vm_on_two_hosts_samples": out["vm_on_two_hosts_samples"] == 0,
        "lost_servers": out["lost_servers"] == 0,
    }
    return out


def _terminate(*_: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the lab is stopped on the way out; a second
    SIGTERM must not cut that short."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(143)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="5 rounds instead of 20")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--servers", type=int, default=9)
    p.add_argument("--ttl", type=int, default=2, help="the agents' liveness lease TTL (s)")
    p.add_argument(
        "--etcd-tuned",
        action="store_true",
        help="--heartbeat-interval=100 --election-timeout=500 (allows --ttl 1)",
    )
    p.add_argument(
        "--heartbeat-interval", type=float, default=0.2, help="vim-faultd's probe interval (s)"
    )
    p.add_argument(
        "--suspect-after",
        type=float,
        default=0.8,
        help="vim-faultd's heartbeat suspicion (s); 0: the lease alone",
    )
    p.add_argument(
        "--compare-lease-only",
        action="store_true",
        help="then the same rounds in a fresh lab with --suspect-after 0 (JSON: lease_only)",
    )
    a = p.parse_args(argv)
    rounds = a.rounds or (5 if a.quick else 20)
    if not 1 <= rounds <= 200 or not 3 <= a.servers <= 60:
        p.error("--rounds must be 1-200 and --servers 3-60")

    heartbeat = (a.heartbeat_interval, a.suspect_after)
    with tempfile.TemporaryDirectory(prefix="vim-bench-hostfail-") as tmp:
        result = asyncio.run(
            run(rounds, a.servers, a.ttl, a.etcd_tuned, Path(tmp) / "hb", heartbeat)
        )
        if a.compare_lease_only:
            progress("lease-only comparison: the same rounds with --suspect-after 0")
            lease = asyncio.run(
                run(rounds, a.servers, a.ttl, a.etcd_tuned, Path(tmp) / "lease", (0.2, 0.0))
            )
            result["lease_only"] = {k: v for k, v in lease.items() if k != "servers_per_round"}
    emit_result({"benchmark": "host_failover", "quick": a.quick, **result})


if __name__ == "__main__":
    main()
