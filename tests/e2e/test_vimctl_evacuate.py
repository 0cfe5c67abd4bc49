"""`vimctl host evacuate` as an operator runs it, against real processes.

A real etcd; one SQLite event log shared by a `vim-api` node (which reads agents'
liveness from etcd), a `vim-scheduler` and a `vim-faultd` whose zone `lab` has
recovery policy `none`; three hosts whose liveness leases are held by child
processes (`ha.liveness.LivenessKeeper`, as an agent holds it). The lease holder
of cmp-a is SIGKILLed: the fault manager fences cmp-a (no BMC: by TTL + margin)
and, policy none, leaves its two servers there. The operator's `vimctl host
evacuate cmp-a` then has them rebuilt on the other hosts, with the same ids,
and reports the final state as JSON; refusals come back with their exit codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.e2e.test_vimctl import ADMIN, SECRET, Cli
from tests.unit.test_faultd import Srv, seed
from tests.waiting import until_sync as until
from vim._gen.vim.v1 import hosts_pb2, hosts_pb2_grpc
from vim.cli.failures import Exit
from vim.eventlog.sql import SqlEventLog
from vim.harness.apinode import ApiNodeProcess
from vim.harness.etcd import EtcdCluster

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEEPER = """
import asyncio, sys
from ha.liveness import LivenessKeeper, LivenessRecord
async def main():
    keepers = [LivenessKeeper([sys.argv[1]], LivenessRecord.here(h)) for h in sys.argv[2:]]
    await asyncio.gather(*(k.run() for k in keepers))
asyncio.run(main())
"""
VM1, VM2 = str(uuid.uuid4()), str(uuid.uuid4())
HOSTS = {name: ("lab", "") for name in ("cmp-a", "cmp-b", "cmp-c")}


class Lab:
    def __init__(self, workdir: Path, etcd: EtcdCluster) -> None:
        self.workdir = workdir
        self.etcd = etcd
        self.url = f"sqlite:///{workdir / 'log.db'}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        secret = workdir / "secret"
        secret.write_bytes(SECRET)
        secret.chmod(0o600)
        self.api = ApiNodeProcess(
            "api", workdir, self.url, secret, env={"VIM_ETCD_ENDPOINTS": etcd.endpoints[0]}
        )

    def spawn(self, name: str, argv: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIM_")}
        env["PYTHONPATH"] = str(REPO)
        with (self.workdir / f"{name}.log").open("ab") as sink:
            self.procs[name] = subprocess.Popen(
                argv, env=env, cwd=self.workdir, stdout=sink, stderr=subprocess.STDOUT
            )

    def keep(self, name: str, *hostnames: str) -> None:
        self.spawn(name, [sys.executable, "-c", KEEPER, self.etcd.endpoints[0], *hostnames])

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        self.api.kill()

    def host(self, hostname: str) -> hosts_pb2.Host:
        with grpc.insecure_channel(self.api.address) as channel:
            reply: hosts_pb2.Host = hosts_pb2_grpc.HostsStub(channel).GetHost(
                hosts_pb2.GetHostRequest(hostname=hostname),
                metadata=[("authorization", f"Bearer {ADMIN}")],
                timeout=5,
            )
            return reply


async def _seed(url: str) -> None:
    log = await SqlEventLog.open(url)
    try:
        await seed(log, HOSTS, [Srv(VM1, "cmp-a", 10), Srv(VM2, "cmp-a", 0)])
    finally:
        await log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("evacuate")
    with EtcdCluster.start(size=1) as etcd:
        lab = Lab(workdir, etcd)
        try:
            asyncio.run(_seed(lab.url))
            lab.keep("keeper-a", "cmp-a")
            lab.keep("keeper-bc", "cmp-b", "cmp-c")
            common = ["--eventlog-url", lab.url, "--etcd", etcd.endpoints[0]]
            lab.spawn("scheduler", [str(BIN / "vim-scheduler"), *common])
            lab.spawn(
                "faultd",
                [
                    *(str(BIN / "vim-faultd"), *common, "--zone-policy", "lab=none"),
                    *("--self-fence-margin", "0.5", "--unleased-grace", "30"),
                ],
            )
            lab.api.start()
            yield lab
        finally:
            lab.close()


def test_evacuate_a_failed_host_under_policy_none(lab: Lab) -> None:
    cli = Cli(lab.api.address)
    alive = lambda: {  # noqa: E731
        r["endpoint"]: r["health"] for r in cli.json("cluster", "status") if r["member"] == "agent"
    }
    until(lambda: set(alive().values()) == {"ALIVE"} and len(alive()) == 3, 30, "3 live agents")

    # Refusals, each with the exit code scripts rely on.
    err = cli.fails(Exit.CONFLICT, "host", "evacuate", "cmp-b", "--yes")
    assert "agent is alive" in err and "maintenance enable cmp-b" in err
    cli.fails(Exit.NOT_FOUND, "host", "evacuate", "no-such-host", "--yes")
    err = cli.fails(Exit.INVALID, "host", "evacuate", "", "--yes")
    assert "hostname:" in err  # the field violation is printed
    cli.fails(Exit.NOT_CONFIRMED, "host", "evacuate", "cmp-a")  # no --yes, no terminal

    # cmp-a's agent dies: fenced, and policy none leaves its servers for an operator.
    lab.kill("keeper-a")
    until(lambda: lab.host("cmp-a").state == hosts_pb2.HOST_STATE_FENCED, 30, "cmp-a fenced")
    assert {s["server_id"] for s in cli.json("host", "servers", "cmp-a")} == {VM1, VM2}

    started = time.monotonic()
    done = cli.run("-o", "json", "host", "evacuate", "cmp-a", "--reason", "psu dead", "--yes")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout)
    assert final["done"] is True and final["servers_moved"] == 2 and final["servers_failed"] == 0
    assert final["state"] == "HOST_STATE_FENCED" and final["evacuation_requested"] is False
    moved = {s["server_id"]: s for s in final["servers"]}
    assert set(moved) == {VM1, VM2}  # the same servers, rebuilt with their identity
    assert {s["host"] for s in moved.values()} <= {"cmp-b", "cmp-c"}
    assert all(s["outcome"] == "MOVED" for s in moved.values())
    assert cli.json("host", "servers", "cmp-a") == []
    for sid in (VM1, VM2):
        shown = cli.json("server", "show", sid)  # the rebuild is visible on the server
        assert shown["recovery"] == "PLACED" and shown["evacuated_from"] == "cmp-a", shown
    ended = cli.json("events", "tail", "--type", "HostEvacuationEnded")
    assert [e["data"]["outcome"] for e in ended] == ["DONE"], ended
    requested = cli.json("events", "tail", "--type", "ServerEvacuationRequested")
    assert [e["data"]["server_id"] for e in requested] == [VM1, VM2]  # priority order
    assert all("psu dead" in e["data"]["reason"] for e in requested)
    print(f"evacuate of a fenced host with 2 servers: {took:.1f} s")
