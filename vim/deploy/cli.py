"""`vim-cluster`: start, inspect and stop the local multi-host cluster.

    vim-cluster up --dir var/cluster --hosts 3 [--config cluster.toml] [--detach]
    vim-cluster status --dir var/cluster
    vim-cluster down --dir var/cluster

``up`` returns to the prompt only once every member is healthy (API nodes serving,
event log, etcd, a leader per elected role, every agent alive), then stays in the
foreground until Ctrl-C or SIGTERM and stops everything.
With ``--detach`` it starts the same command as a background supervisor
(output in ``DIR/vim-cluster.log``), waits until the cluster is up and
returns; ``down`` stops that supervisor (which stops its members) and sweeps
anything left over. Exit codes: 0 success, 1 the cluster failed to start or
stop cleanly, 2 bad usage or configuration, 3 (status) a member is not running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vim.deploy.config import ConfigError, load_config
from vim.deploy.state import (
    member_running,
    pid_alive,
    read_state,
    recorded_members,
    teardown,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
DETACH_TIMEOUT_S = 300.0
HEALTHY_TIMEOUT_S = 120.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vim-cluster", description="The VIM's real topology on one machine (docs/DEPLOY.md)."
    )
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster (foreground unless --detach)")
    up.add_argument("--dir", type=Path, required=True, help="state, logs, PKI and tokens go here")
    up.add_argument("--hosts", type=int, default=None, help="agent hosts (overrides the file)")
    up.add_argument("--config", type=Path, default=None, help="TOML file (docs/DEPLOY.md)")
    up.add_argument("--detach", action="store_true", help="run in the background and return")
    for name, text in (("status", "show every member's liveness"), ("down", "stop the cluster")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--dir", type=Path, required=True)
    sub.choices["status"].add_argument("-o", "--output", choices=["table", "json"], default="table")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `vim-cluster`."""
    args = _parser().parse_args(argv)
    if args.command == "up":
        return _up(args, list(sys.argv[1:] if argv is None else argv))
    if args.command == "status":
        return _status(args.dir, args.output)
    return _down(args.dir)


def _running_supervisor(directory: Path) -> int:
    with contextlib.suppress(OSError, ValueError):
        pid = int(read_state(directory).get("supervisor_pid") or 0)
        if pid and pid_alive(pid):
            return pid
    return 0


def _up(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        config = load_config(args.config, hosts=args.hosts)
    except ConfigError as exc:
        print(f"vim-cluster: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if os.geteuid() != 0 and config.hosts:
        print("vim-cluster: agent hosts need network namespaces: run as root", file=sys.stderr)
        return EXIT_USAGE
    directory: Path = args.dir.resolve()
    if pid := _running_supervisor(directory):
        print(f"vim-cluster: a cluster already runs in {directory} (pid {pid})", file=sys.stderr)
        return EXIT_USAGE
    if args.detach:
        return _detach(directory, [a for a in argv if a != "--detach"])
    from vim.deploy.cluster import ClusterError, LocalCluster

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    cluster = LocalCluster(directory, config)
    try:
        cluster.start()
        started = time.monotonic()
        cluster.wait_healthy(HEALTHY_TIMEOUT_S)
        cluster.timings["healthy"] = round(time.monotonic() - started, 2)
        cluster.write_files(state="running")
    except (ClusterError, OSError) as exc:
        print(f"vim-cluster: start failed: {exc}", file=sys.stderr)
        with contextlib.suppress(ClusterError):
            cluster.stop()
        return EXIT_FAILED
    print(_usage(cluster), flush=True)
    reported: set[str] = set()
    code = 0
    try:
        while not stop.wait(1.0):
            for dead in set(cluster.dead_children()) - reported:
                print(f"vim-cluster: member exited: {dead}", file=sys.stderr, flush=True)
                reported.add(dead)
    finally:
        print("vim-cluster: stopping", flush=True)
        try:
            cluster.stop()
            print("vim-cluster: stopped", flush=True)
        except ClusterError as exc:
            print(f"vim-cluster: {exc}", file=sys.stderr)
            code = EXIT_FAILED
    return code


def _usage(cluster: object) -> str:
    from vim.deploy.cluster import LocalCluster

    assert isinstance(cluster, LocalCluster)
    d = cluster.dir
    lines = [
        f"vim-cluster: up in {d} ({len(cluster.members())} processes)",
        f"  API nodes:  {', '.join(cluster.api_endpoints)}",
        f"  members:    {d / 'cluster.json'}   logs: {cluster.logs}",
        f"  operator:   vimctl --config {d / 'vimctl.toml'} cluster status",
        f"  Prometheus: file_sd {d / 'prometheus-targets.json'} (deploy/prometheus/prometheus.yml)",
    ]
    if cluster.without_metrics:
        lines.append(f"  no metrics endpoint yet: {', '.join(cluster.without_metrics)}")
    lines.append("  stop with Ctrl-C, SIGTERM, or `vim-cluster down --dir DIR` when detached")
    return "\n".join(lines)


def _detach(directory: Path, argv: list[str]) -> int:
    """Start ``vim-cluster up`` (without --detach) as a background session; wait for it."""
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / "vim-cluster.log"
    with contextlib.suppress(FileNotFoundError):
        (directory / "cluster.json").unlink()
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vim.deploy.cli", *argv],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + DETACH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"vim-cluster: start failed (exit {proc.returncode}); see {log}", file=sys.stderr)
            print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            return EXIT_FAILED
        with contextlib.suppress(OSError, ValueError):
            state = read_state(directory)
            if state.get("state") == "running" and state.get("supervisor_pid") == proc.pid:
                print(f"vim-cluster: up (supervisor pid {proc.pid}); log {log}")
                print(f"  vimctl --config {directory / 'vimctl.toml'} cluster status")
                print(f"  vim-cluster down --dir {directory}")
                return 0
        time.sleep(0.2)
    proc.kill()
    print(f"vim-cluster: not up within {DETACH_TIMEOUT_S:.0f} s; see {log}", file=sys.stderr)
    return EXIT_FAILED


def _status(directory: Path, output: str) -> int:
    try:
        data = read_state(directory)
    except (OSError, ValueError) as exc:
        print(f"vim-cluster: no cluster state in {directory}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rows = [
        {
            "kind": m.kind,
            "name": m.name,
            "pid": m.pid,
            "running": member_running(m),
            "endpoint": m.endpoint,
            "metrics": m.metrics,
            "netns": m.netns,
        }
        for m in recorded_members(data)
    ]
    supervisor = int(data.get("supervisor_pid") or 0)
    if output == "json":
        sup = {"pid": supervisor, "running": bool(supervisor) and pid_alive(supervisor)}
        print(json.dumps({"state": data.get("state"), "supervisor": sup, "members": rows}))
    else:
        print(f"state: {data.get('state')}  supervisor pid: {supervisor or '-'}")
        print(f"{'KIND':<10} {'NAME':<18} {'PID':>8} {'RUNNING':<8} {'ENDPOINT':<22} METRICS")
        for r in rows:
            print(
                f"{r['kind']:<10} {r['name']:<18} {r['pid'] or '-':>8} "
                f"{'yes' if r['running'] else 'NO':<8} {r['endpoint']:<22} {r['metrics']}"
            )
    return 0 if rows and all(r["running"] for r in rows) else EXIT_NOT_RUNNING


def _down(directory: Path) -> int:
    try:
        swept = teardown(directory)
    except (OSError, ValueError) as exc:
        print(f"vim-cluster: no cluster state in {directory}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for what in swept:
        print(f"vim-cluster: swept {what}")
    print("vim-cluster: down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
