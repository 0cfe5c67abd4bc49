"""Scheduler benchmark: placement decisions per second and decision latency vs host count.

Run ``python -m bench.scheduler --quick`` (1k and 10k hosts, well under a minute) or
``python -m bench.scheduler`` (``make bench``; adds 100k hosts). Method:

* The real planner, filters and weighers (`vim.scheduler.planner.Planner`), no I/O:
  this measures the decision, not the appends (the event-log benchmark covers those).
* A cluster of N hosts in 10 zones: 32 cores x 4.0, 128 GiB x 1.0,
  2 TB, at most 64 instances; 2 % in maintenance, 1 % FAILED, 0.5 % DOWN; each
  schedulable host already holds 0-3 claims. Hosts are built with the domain's own
  `host.register` / `host.claim` / `host.evolve`.
* Affinity groups of every policy and scope, some with members already placed:
  ANTI_AFFINITY/HOST (size 8), ANTI_AFFINITY/ZONE (size 4), AFFINITY/HOST (size 4),
  AFFINITY/ZONE (size 8), and a few ANTI_AFFINITY/ZONE of 12 (more than the 10 zones
  the requests use, so their last members fail: a failure scans every host to count
  the rejections, the worst case). The requests: about 45 % free, 15 % pinned to a
  zone, 25 % anti-affinity/host, 5 % each anti-affinity/zone, affinity/host,
  affinity/zone, 1 % in the oversized groups;
  flavours of 1, 2, 4 and 8 vCPUs. The same request list (same seed) at every size,
  so the figures compare the cost of one decision as the cluster grows.
* One run at size N: build the snapshot and the planner (its index), then place the
  requests one by one with `Planner.place`, timing each call (`perf_counter`);
  placements/s = decisions / total decision time. Index build time is reported
  apart, as is a "round" rate that charges one build per `batch` (500) decisions,
  which is what the scheduler service pays per round.
* Sizes run interleaved in rounds (1k, 10k, [100k], 1k, 10k, ...); every figure is
  the median over rounds; ratios are ratios of medians. Loops are bounded.

Progress goes to stderr; the last stdout line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench._common import emit_result, median, percentile, progress, ratio
from vim.domain import affinity, host
from vim.scheduler.filters import Request
from vim.scheduler.planner import Failure, Placement, Planner, Snapshot, priority_key

T0 = "2030-01-01T00:00:00.000Z"
FLAVOURS = ((1, 2048, 20), (2, 4096, 40), (4, 8192, 80), (8, 16384, 160))
BATCH = 500


@dataclass(frozen=True, slots=True)
class Settings:
    sizes: tuple[int, ...]
    requests: int
    rounds: int


QUICK = Settings(sizes=(1_000, 10_000), requests=3_000, rounds=3)
FULL = Settings(sizes=(1_000, 10_000, 100_000), requests=10_000, rounds=3)


def _zones(n_hosts: int) -> list[str]:
    """Ten zones at every size, so the workload (and its failures) is the same."""
    return [f"az{i}" for i in range(10)]


def build_hosts(n_hosts: int, seed: int) -> dict[str, tuple[host.Host, int]]:
    """N hosts with a few claims each; some in maintenance, failed or down."""
    rng = random.Random(seed)
    zones = _zones(n_hosts)
    out: dict[str, tuple[host.Host, int]] = {}
    for i in range(n_hosts):
        name = f"cmp-{i:06d}"
        spec = host.HostSpec(zones[i % len(zones)], 32, 131072, 2000, 4.0, 1.0, 1.0)
        spec = host.HostSpec(**(spec.data() | {"max_instances": 64}))
        h = host.evolve(None, host.register(None, name, spec, T0)[0])
        version = 1
        for j in range(rng.randint(0, 3)):
            vcpus, ram, disk = rng.choice(FLAVOURS)
            h = host.evolve(h, host.claim(h, f"old-{i}-{j}", vcpus, ram, disk))
            version += 1
        roll = rng.random()
        if roll < 0.02:
            for e in host.enable_maintenance(h, name, "bench", T0):
                h = host.evolve(h, e)
                version += 1
        elif roll < 0.035:
            to = host.HostState.FAILED if roll < 0.03 else host.HostState.DOWN
            changed = host.change_state(h, name, to, "bench", T0)
            assert changed is not None
            h = host.evolve(h, changed)
            version += 1
        out[name] = (h, version)
    return out


@dataclass(frozen=True, slots=True)
class Workload:
    groups: dict[str, tuple[affinity.AffinityGroup, int]]
    requests: list[Request]
    premembers: dict[str, int]
    """Group id -> members already placed before the run (placed at build time)."""


def build_workload(n_requests: int, seed: int) -> Workload:
    """Groups and requests, independent of the host count (zones az0..az9 only)."""
    rng = random.Random(seed)
    kinds = (
        (affinity.Policy.ANTI_AFFINITY, affinity.Scope.HOST, 8, 0.25),
        (affinity.Policy.ANTI_AFFINITY, affinity.Scope.ZONE, 4, 0.05),
        (affinity.Policy.AFFINITY, affinity.Scope.HOST, 4, 0.05),
        (affinity.Policy.AFFINITY, affinity.Scope.ZONE, 8, 0.05),
        # More members than zones: the last ones fail, after a scan of every host.
        (affinity.Policy.ANTI_AFFINITY, affinity.Scope.ZONE, 12, 0.01),
    )
    groups: dict[str, tuple[affinity.AffinityGroup, int]] = {}
    premembers: dict[str, int] = {}
    slots: list[str] = []
    for policy, scope, size, share in kinds:
        count = max(1, round(n_requests * share / size))
        for g in range(count):
            gid = f"{policy.value.lower()}-{scope.value.lower()}-{g}"
            groups[gid] = (affinity.AffinityGroup(gid, "t1", gid, policy, scope, T0), 1)
            placed = rng.randint(0, 1)  # a member already placed in half the groups
            premembers[gid] = placed
            slots += [gid] * (size - placed)
    rng.shuffle(slots)
    requests: list[Request] = []
    for i in range(n_requests):
        vcpus, ram, disk = rng.choice(FLAVOURS)
        roll = rng.random()
        gid = slots.pop() if roll < 0.41 and slots else ""
        zone = f"az{rng.randrange(10)}" if not gid and roll > 0.85 else ""
        requests.append(
            Request(
                f"srv-{i:06d}",
                "t1",
                vcpus,
                ram,
                disk,
                zone=zone,
                group_id=gid,
                priority=rng.choice((0, 0, 0, 5, 10)),
                created_at=f"2030-01-01T00:{i // 6000:02d}:{(i // 100) % 60:02d}.{i % 100:03d}Z",
            )
        )
    requests.sort(key=priority_key)
    return Workload(groups, requests, premembers)


def premember_placements(
    work: Workload, hosts: dict[str, tuple[host.Host, int]], seed: int
) -> dict[str, list[tuple[str, str]]]:
    """Where the already-placed members are: a random schedulable host each."""
    rng = random.Random(seed)
    names = sorted(n for n, (h, _) in hosts.items() if h.schedulable)
    out: dict[str, list[tuple[str, str]]] = {}
    for gid, count in sorted(work.premembers.items()):
        for _ in range(count):
            name = rng.choice(names)
            out.setdefault(gid, []).append((name, hosts[name][0].spec.zone))
    return out


@dataclass(frozen=True, slots=True)
class Run:
    build_s: float
    latencies: list[float]
    placed: int
    failed: int
    placement_latencies: list[float]
    failure_latencies: list[float]

    @property
    def decide_s(self) -> float:
        return sum(self.latencies)


def run_once(n_hosts: int, work: Workload, seed: int) -> Run:
    hosts = build_hosts(n_hosts, seed)
    members = premember_placements(work, hosts, seed)
    gc.collect()
    gc.disable()  # the collector's pauses are the allocator's noise, not the planner's
    try:
        started = time.perf_counter()
        snapshot = Snapshot(hosts, dict(work.groups), members, [], list(work.requests))
        planner = Planner(snapshot)
        build_s = time.perf_counter() - started
        latencies: list[float] = []
        good: list[float] = []
        bad: list[float] = []
        for req in work.requests:
            t = time.perf_counter()
            outcome = planner.place(req)
            took = time.perf_counter() - t
            latencies.append(took)
            if isinstance(outcome, Placement):
                good.append(took)
            else:
                assert isinstance(outcome, Failure)
                bad.append(took)
    finally:
        gc.enable()
    return Run(build_s, latencies, len(good), len(bad), good, bad)


def _label(n: int) -> str:
    return f"{n // 1000}k"


def measure(settings: Settings) -> dict[str, Any]:
    work = build_workload(settings.requests, seed=11)
    runs: dict[int, list[Run]] = {n: [] for n in settings.sizes}
    for r in range(settings.rounds):
        for n in settings.sizes:
            run = run_once(n, work, seed=1000 + r)
            runs[n].append(run)
            progress(
                f"round {r + 1}/{settings.rounds} {_label(n)} hosts: build {run.build_s:.3f}s, "
                f"{len(run.latencies) / run.decide_s:,.0f} decisions/s, "
                f"p99 {percentile(run.latencies, 99) * 1000:.3f} ms, "
                f"placed {run.placed} failed {run.failed}"
            )
    out: dict[str, Any] = {
        "requests": settings.requests,
        "rounds": settings.rounds,
        "batch": BATCH,
    }
    per_decision: dict[int, float] = {}
    per_placement: dict[int, float] = {}
    build: dict[int, float] = {}
    for n, rs in runs.items():
        k = _label(n)
        rate = median([len(x.latencies) / x.decide_s for x in rs])
        build[n] = median([x.build_s for x in rs])
        per_decision[n] = median([x.decide_s / len(x.latencies) for x in rs])
        per_placement[n] = median([sum(x.placement_latencies) / x.placed for x in rs])
        round_s = build[n] + BATCH * per_decision[n]
        out |= {
            f"placements_per_s_{k}": round(rate, 1),
            f"p50_decision_ms_{k}": round(
                median([percentile(x.latencies, 50) for x in rs]) * 1e3, 4
            ),
            f"p99_decision_ms_{k}": round(
                median([percentile(x.latencies, 99) for x in rs]) * 1e3, 4
            ),
            f"max_decision_ms_{k}": round(median([max(x.latencies) for x in rs]) * 1e3, 3),
            f"p99_placement_ms_{k}": round(
                median([percentile(x.placement_latencies, 99) for x in rs]) * 1e3, 4
            ),
            f"failure_ms_{k}": round(median([median(x.failure_latencies) for x in rs]) * 1e3, 3),
            f"index_build_s_{k}": round(build[n], 4),
            f"round_placements_per_s_{k}": round(BATCH / round_s, 1),
            f"placed_{k}": rs[0].placed,
            f"failed_{k}": rs[0].failed,
        }
    base = settings.sizes[0]
    for n in settings.sizes[1:]:
        k, growth = f"{_label(n)}_vs_{_label(base)}", n / base
        out[f"decision_cost_ratio_{k}"] = round(ratio(per_decision[n], per_decision[base]), 3)
        out[f"placement_cost_ratio_{k}"] = round(ratio(per_placement[n], per_placement[base]), 3)
        out[f"index_build_ratio_{k}"] = round(ratio(build[n], build[base]), 3)
        # Log-linear bounds: n log n / (base log base) for a build, log n / log base per decision.
        out[f"loglinear_bound_{k}"] = round(growth * math.log(n) / math.log(base), 3)
        out[f"log_bound_per_decision_{k}"] = round(math.log(n) / math.log(base), 3)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.scheduler", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1k and 10k hosts only")
    parser.add_argument("--rounds", type=int, help="rounds per size (1-10)")
    parser.add_argument("--requests", type=int, help="requests per run (100-50000)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    if args.rounds is not None:
        settings = Settings(settings.sizes, settings.requests, max(1, min(args.rounds, 10)))
    if args.requests is not None:
        settings = Settings(settings.sizes, max(100, min(args.requests, 50_000)), settings.rounds)
    started = time.perf_counter()
    progress(f"scheduler benchmark ({'quick' if args.quick else 'full'}): {settings}")
    try:
        result = measure(settings)
    except KeyboardInterrupt:
        progress("interrupted")
        return 130
    result["quick"] = bool(args.quick)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["loadavg_1m_end"] = round(os.getloadavg()[0], 2)
    progress(f"done in {result['elapsed_s']} s")
    emit_result(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
