"""`vimctl` verbs that need a running cluster with real agents: server power
operations and migration, maintenance drain, and IFA005 alarms.

One cluster serves the module: a real etcd member; one SQLite event log shared
by a `vim-api` node (it reads agents' liveness from etcd), a `vim-scheduler` and
a `vim-faultd` (which runs the alarm reactor); three real `vim-agent` processes,
each on its own libvirt `test:///PATH` node with `--ovs none`, so servers really
become ACTIVE, stop, pause, suspend, reboot and move. Everything is driven and
read through the real `vimctl -o json` console script (`tests.e2e.test_vimctl`);
what the agents run is read from their status files. The last test SIGKILLs an
agent: a real host failure, whose alarm a `vimctl alarm watch` started before the
kill prints live.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest

from tests.e2e.test_vimctl import AUTH, READER, VIMCTL, Cli
from tests.e2e.test_vimctl_evacuate import BIN, Lab
from tests.integration.test_agent import AgentProcess
from tests.waiting import until_sync as until
from vim.cli.failures import Exit
from vim.harness.etcd import EtcdCluster

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

HOSTS = ("cmp-1", "cmp-2", "cmp-3")
VICTIM = "cmp-3"
"""The host whose agent the alarm test kills (the last test: it leaves the host failed)."""


@dataclass
class Ops:
    lab: Lab
    cli: Cli
    agents: dict[str, AgentProcess]
    flavour: str = ""
    image: str = ""
    network: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def domains(self, hostname: str) -> dict[str, str]:
        """What the host's agent last saw in its libvirt node: server id -> power."""
        status = self.agents[hostname].status()
        return {} if status is None else dict(status["domains"])

    def runs(self, hostname: str, sid: str) -> bool:
        return self.domains(hostname).get(sid) == "RUNNING"

    def server(self, sid: str) -> dict[str, Any]:
        shown: dict[str, Any] = self.cli.json("server", "show", sid)
        return shown

    def settled(self, sid: str, state: str) -> dict[str, Any] | None:
        """The server once it is in `state` with no task in progress (polled by `server show`)."""
        s = self.server(sid)
        return s if s["state"] == f"SERVER_STATE_{state}" and not s["task"] else None

    def create(self, name: str, *extra: str) -> dict[str, Any]:
        made: dict[str, Any] = self.cli.json(
            "server",
            "create",
            name,
            *("--flavour", self.flavour, "--image", self.image, "--network", self.network),
            *extra,
        )
        return made


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ops]:
    workdir = tmp_path_factory.mktemp("vimctl-ops")
    started = time.monotonic()
    with EtcdCluster.start(size=1, base_dir=workdir / "etcd") as etcd:
        lab = Lab(workdir, etcd)
        agents: dict[str, AgentProcess] = {}
        try:
            common = ["--eventlog-url", lab.url, "--etcd", etcd.endpoints[0]]
            lab.spawn("scheduler", [str(BIN / "vim-scheduler"), *common])
            lab.spawn("faultd", [str(BIN / "vim-faultd"), *common, "--self-fence-margin", "0.5"])
            lab.api.start()
            for hostname in HOSTS:
                token = workdir / f"{hostname}.token"
                token.write_text(AUTH.mint_agent(hostname), encoding="utf-8")
                agent = AgentProcess(hostname, workdir / hostname, lab.api.address, etcd.endpoints)
                agent.extra = ["--token-file", str(token)]
                agents[hostname] = agent
                agent.start()
            o = Ops(lab, Cli(lab.api.address), agents)

            def agents_alive() -> bool:
                rows = o.cli.json("cluster", "status")
                alive = {
                    r["endpoint"] for r in rows if r["member"] == "agent" and r["health"] == "ALIVE"
                }
                up = {
                    h["hostname"]
                    for h in o.cli.json("host", "list")
                    if h["state"] == "HOST_STATE_UP"
                }
                return alive >= set(HOSTS) and up >= set(HOSTS)

            o.flavour = o.cli.json(
                "flavour", "create", "m1.tiny", "--vcpus", "1", "--ram-mb", "256"
            )["flavour_id"]
            o.image = o.cli.json(
                "image",
                "add",
                "tiny",
                *("--location", "https://images.example/tiny.qcow2"),
                *("--checksum", "ab" * 32, "--size-bytes", "4096"),
            )["image_id"]
            o.network = o.cli.json("network", "create", "ops-net")["network_id"]
            o.cli.json(
                "subnet", "create", "ops-v4", "--network", o.network, "--cidr", "10.7.0.0/24"
            )
            # The catalogue was made while the agents started; now wait for them.
            until(lambda: all(a.status() for a in agents.values()), 30, "agents' first pass")
            until(agents_alive, 30, "three live agents and UP hosts")
            o.timings["cluster up"] = time.monotonic() - started
            yield o
            print(" ".join(f"{k}: {v:.1f} s;" for k, v in o.timings.items()))
        finally:
            for agent in agents.values():
                agent.kill()
            lab.close()


def pause_and_suspend(ops: Ops, sid: str, home: str) -> None:
    """pause, unpause, suspend, resume, each waited for; the domain follows on `home`."""
    cli = ops.cli
    paused = cli.json("server", "pause", sid, "--wait", "--wait-timeout", "30")
    assert paused["state"] == "SERVER_STATE_PAUSED"
    until(lambda: ops.domains(home).get(sid) == "PAUSED", 10, "the domain paused")
    assert cli.json("server", "unpause", sid, "--wait")["state"] == "SERVER_STATE_ACTIVE"
    suspended = cli.json("server", "suspend", sid, "--wait", "--wait-timeout", "30")
    assert suspended["state"] == "SERVER_STATE_SUSPENDED"
    until(lambda: ops.domains(home).get(sid) == "SUSPENDED", 10, "the domain saved")
    assert cli.json("server", "resume", sid, "--wait")["state"] == "SERVER_STATE_ACTIVE"
    until(lambda: ops.domains(home).get(sid) == "RUNNING", 10, "the domain resumed")


def test_server_power_operations_and_offline_migration(ops: Ops) -> None:
    cli = ops.cli
    started = time.monotonic()
    made = ops.create("vm-ops")
    sid = made["server_id"]
    assert made["state"] == "SERVER_STATE_BUILDING"
    active = until(lambda: ops.settled(sid, "ACTIVE"), 30, "vm-ops ACTIVE")
    home = active["host"]
    assert home in HOSTS and active["power_state"] == "POWER_STATE_RUNNING"
    until(lambda: ops.domains(home).get(sid) == "RUNNING", 10, "the domain running on its host")
    nic = active["nics"][0]
    assert nic["mac_address"] and nic["ip_addresses"][0].startswith("10.7.0.")

    # Refused by state (exit 6), with the reason: start needs a STOPPED server.
    assert "START needs STOPPED" in cli.fails(Exit.CONFLICT, "server", "start", sid)

    stopped = cli.json("server", "stop", sid, "--wait", "--wait-timeout", "30")
    assert stopped["state"] == "SERVER_STATE_STOPPED" and stopped["task"] == ""
    assert stopped["power_state"] == "POWER_STATE_SHUTDOWN"
    until(lambda: ops.domains(home).get(sid) == "SHUTDOWN", 10, "the domain shut off")
    cli.fails(Exit.CONFLICT, "server", "reboot", sid)  # only ACTIVE (or ERROR) reboots

    # `server start` on a STOPPED server, polled by `server show` (no --wait).
    starting = cli.json("server", "start", sid)
    assert starting["task"] == "STARTING"
    until(lambda: ops.settled(sid, "ACTIVE"), 30, "vm-ops ACTIVE again")
    until(lambda: ops.domains(home).get(sid) == "RUNNING", 10, "the domain running again")

    rebooted = cli.json("server", "reboot", sid, "--wait", "--wait-timeout", "30")
    assert rebooted["state"] == "SERVER_STATE_ACTIVE" and rebooted["task"] == ""
    history = [
        e
        for e in cli.json(
            *("events", "tail", "-n", "200"),
            *("--type", "ServerOperationRequested", "--type", "ServerStateReported"),
        )
        if e["data"]["server_id"] == sid
    ]
    reboot = max(i for i, e in enumerate(history) if e["data"].get("operation") == "REBOOT")
    # The REBOOTING task ends only on the agent's report, made after the reset.
    assert [e["type"] for e in history[reboot + 1 :]] == ["ServerStateReported"]

    pause_and_suspend(ops, sid, home)
    ops.timings["power operations"] = time.monotonic() - started

    # Refusals of a migration: to the host it is on, to an unknown host.
    cli.fails(Exit.CONFLICT, "server", "migrate", sid, "--offline", "--target", home)
    cli.fails(Exit.NOT_FOUND, "server", "migrate", sid, "--offline", "--target", "no-such-host")

    moving = time.monotonic()
    moved = cli.json("server", "migrate", sid, "--offline", "--wait", "--wait-timeout", "60")
    ops.timings["offline migration"] = time.monotonic() - moving
    assert moved["server_id"] == sid and moved["host"] in HOSTS and moved["host"] != home
    assert moved["state"] == "SERVER_STATE_ACTIVE" and moved["task"] == ""
    assert moved["nics"][0]["mac_address"] == nic["mac_address"]
    assert moved["nics"][0]["ip_addresses"] == nic["ip_addresses"]
    until(lambda: ops.domains(moved["host"]).get(sid) == "RUNNING", 10, "running on the target")
    until(lambda: sid not in ops.domains(home), 10, "gone from the source")
    requested = cli.json("events", "tail", "-n", "5", "--type", "ServerMigrationRequested")
    assert [e["data"]["migration_type"] for e in requested if e["data"]["server_id"] == sid] == [
        "OFFLINE"
    ]

    cli.json("server", "delete", sid, "--yes")
    until(lambda: sid not in ops.domains(moved["host"]), 10, "the domain removed")


def test_maintenance_drains_a_host(ops: Ops) -> None:
    cli = ops.cli
    drained = "cmp-1"
    sids = [
        ops.create(f"vm-drain-{i}", "--wait", "--wait-timeout", "30")["server_id"] for i in (1, 2)
    ]
    for sid in sids:  # both onto cmp-1: an offline migration with an explicit target
        if ops.server(sid)["host"] != drained:
            moved = cli.json("server", "migrate", sid, "--offline", "--target", drained, "--wait")
            assert moved["host"] == drained and moved["state"] == "SERVER_STATE_ACTIVE"
    assert {s["server_id"] for s in cli.json("host", "servers", drained)} == set(sids)
    until(lambda: set(ops.domains(drained)) == set(sids), 10, "both running on cmp-1")

    started = time.monotonic()
    done = cli.run(
        "-o",
        "json",
        *("host", "maintenance", "enable", drained, "--reason", "firmware"),
        *("--wait", "--wait-timeout", "60"),
    )
    ops.timings["maintenance drain of 2"] = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["maintenance"] is True and out["empty"] is True and out["servers_moved"] == 2
    assert out["state"] == "HOST_STATE_MAINTENANCE"
    assert cli.json("host", "servers", drained) == []
    for sid in sids:
        s = until(partial(ops.settled, sid, "ACTIVE"), 30, f"{sid} ACTIVE elsewhere")
        assert s["host"] in HOSTS and s["host"] != drained
        until(partial(ops.runs, s["host"], sid), 10, f"{sid} running on {s['host']}")
    until(lambda: not ops.domains(drained), 10, "no domain left on cmp-1")
    assert cli.json("host", "show", drained)["state"] == "HOST_STATE_MAINTENANCE"
    # Nothing is placed on a host in maintenance, not even on request.
    cli.fails(Exit.CONFLICT, "server", "migrate", sids[0], "--offline", "--target", drained)
    cli.fails(Exit.NOT_FOUND, "host", "maintenance", "enable", "no-such-host")
    assert "hostname" in cli.fails(Exit.INVALID, "host", "maintenance", "enable", "")
    for sid in sids:
        cli.json("server", "delete", sid, "--yes")


def test_maintenance_disable_after_a_drain(ops: Ops) -> None:
    """`host maintenance disable` once the fault manager recorded the host empty."""
    cli = ops.cli
    host = "cmp-2"
    entered = cli.json("host", "maintenance", "enable", host, "--wait", "--wait-timeout", "30")
    assert entered["empty"] is True

    def drained() -> bool:
        tail = cli.json("events", "tail", "-n", "20")
        return "HostDrained" in {e["type"] for e in tail if e["stream_id"] == f"host-{host}"}

    until(drained, 10, "HostDrained recorded by the fault manager")
    # A short deadline: a host stream left behind by an unknown event would time out here.
    done = cli.run("-o", "json", "--timeout", "3", "host", "maintenance", "disable", host)
    assert done.returncode == 0, done.stderr
    left = json.loads(done.stdout)
    assert left["maintenance"] is False and left["state"] == "HOST_STATE_UP"


def environ(cli: Cli) -> dict[str, str]:
    """The environment `Cli.run` gives vimctl, for a child that runs alongside the test."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VIM_", "VIMCTL_"))}
    return base | {
        "VIM_ENDPOINTS": cli.endpoint,
        "VIM_TOKEN": cli.token,
        "VIM_INSECURE": "1",
        "VIMCTL_CONFIG": "",
        "HOME": base.get("HOME", "/root"),
    }


class Lines:
    """A child's stdout read line by line on a thread, so a read can have a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, within: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=within)
        except queue.Empty:
            raise AssertionError(f"no line from vimctl within {within} s") from None
        assert line is not None, f"vimctl ended: {self.proc.wait(5)}"
        item: dict[str, Any] = json.loads(line)
        return item


def test_alarms_of_a_real_host_failure(ops: Ops) -> None:
    cli = ops.cli
    assert cli.json("alarm", "list", "--object", VICTIM) == []
    watcher = subprocess.Popen(
        [
            VIMCTL,
            *("-o", "json", "alarm", "watch", "--resource-type", "host"),
            *("--severity", "critical", "--heartbeats", "--heartbeat-ms", "200"),
            *("--count", "1", "--seconds", "60"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ(cli),
    )
    try:
        lines = Lines(watcher)
        assert "heartbeat" in lines.next(15)  # the subscription is open before the fault
        started = time.monotonic()
        ops.agents[VICTIM].kill()  # SIGKILL: its liveness lease lapses
        while "heartbeat" in (item := lines.next(30)):
            pass
        ops.timings["kill -> alarm printed"] = time.monotonic() - started
        assert watcher.wait(10) == 0, watcher.stderr.read() if watcher.stderr else ""
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
    assert item["change"] == "ALARM_CHANGE_RAISED" and item["notification_id"] and item["cursor"]
    alarm = item["alarm"]
    assert alarm["managed_object_id"] == VICTIM and alarm["hostname"] == VICTIM
    assert alarm["resource_type"] == "RESOURCE_TYPE_HOST"
    assert alarm["perceived_severity"] == "SEVERITY_CRITICAL"
    # No BMC answers for the host: classified as a hardware failure (docs/ALARMS.md).
    assert alarm["fault_type"] == "HOST_HARDWARE_FAILURE"
    assert alarm["event_type"] == "EVENT_TYPE_EQUIPMENT_ALARM"
    assert alarm["probable_cause"] == "EQUIPMENT_MALFUNCTION"
    alarm_id = alarm["alarm_id"]

    listed = cli.json("alarm", "list", "--object", VICTIM, "--severity", "critical")
    assert alarm_id in {a["alarm_id"] for a in listed}
    assert cli.json("alarm", "list", "--object", VICTIM, "--severity", "minor") == []
    shown = cli.json("alarm", "show", alarm_id)
    for key in ("managed_object_id", "perceived_severity", "fault_type", "probable_cause"):
        assert shown[key] == alarm[key]
    assert shown["state"] in ("ALARM_STATE_FIRED", "ALARM_STATE_UPDATED")
    assert shown["ack_state"] == "ACK_STATE_UNACKNOWLEDGED"
    assert shown["alarm_raised_time"] and shown["event_time"] and shown["is_root_cause"] is True
    assert shown["alarm_acknowledged_time"] == ""
    assert cli.json("alarm", "list", "--object", VICTIM, "--ack", "acknowledged") == []

    cli.fails(Exit.DENIED, "alarm", "ack", alarm_id, token=READER)  # host alarms: admin only
    acked = cli.json("alarm", "ack", alarm_id)
    assert acked["ack_state"] == "ACK_STATE_ACKNOWLEDGED" and acked["alarm_acknowledged_time"]
    again = cli.json("alarm", "ack", alarm_id)  # a repeat changes nothing
    assert again["alarm_acknowledged_time"] == acked["alarm_acknowledged_time"]
    assert alarm_id in {
        a["alarm_id"]
        for a in cli.json("alarm", "list", "--object", VICTIM, "--ack", "acknowledged")
    }
    # Table output drops the enum prefixes.
    table = cli.run("alarm", "list", "--object", VICTIM, env={"COLUMNS": "400"})
    assert (
        table.returncode == 0 and " CRITICAL " in table.stdout and "SEVERITY_" not in table.stdout
    )

    # Refusals with their exit codes.
    cli.fails(Exit.NOT_FOUND, "alarm", "show", "00000000-0000-4000-8000-000000000000")
    cli.fails(Exit.NOT_FOUND, "alarm", "ack", "00000000-0000-4000-8000-000000000000")
    cli.fails(Exit.USAGE, "alarm", "list", "--severity", "apocalyptic")
