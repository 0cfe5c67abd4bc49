"""`vimctl` as an operator runs it: the real console script, as a subprocess, against a
real `vim-api` node process, its JSON (or YAML) output parsed.

One node (SQLite event log, plaintext, a token secret file) serves the module;
each test drives one resource's verbs end to end, checks what the API then
holds, and checks the exit codes scripts rely on (3 not found, 4 denied,
5 invalid, 6 refused by state, 7 unavailable, 9 not confirmed, 2 usage).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from vim._gen.vim.v1 import hosts_pb2, hosts_pb2_grpc
from vim.api.auth import Authenticator
from vim.cli.failures import Exit
from vim.harness.apinode import ApiNodeProcess
from vim.harness.ports import free_port

SECRET = b"vimctl-test-secret-of-at-least-32-bytes!"
AUTH = Authenticator(SECRET)
ADMIN = AUTH.mint("ops", "ops", ["admin"])
READER = AUTH.mint("viewer", "ops", ["reader"])
VIMCTL = shutil.which("vimctl", path=str(Path(sys.executable).parent)) or "vimctl"


@dataclass
class Cli:
    endpoint: str
    token: str = ADMIN

    def run(
        self,
        *args: str,
        token: str | None = None,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("VIM_", "VIMCTL_"))}
        base |= {
            "VIM_ENDPOINTS": self.endpoint,
            "VIM_TOKEN": self.token if token is None else token,
            "VIM_INSECURE": "1",
            "VIMCTL_CONFIG": "",
            "HOME": base.get("HOME", "/root"),
        }
        return subprocess.run(
            [VIMCTL, *args],
            capture_output=True,
            text=True,
            env=base | (env or {}),
            input=stdin,
            timeout=60,
            check=False,
        )

    def json(self, *args: str, **kw: Any) -> Any:
        done = self.run("-o", "json", *args, **kw)
        assert done.returncode == 0, f"vimctl {' '.join(args)} -> {done.returncode}\n{done.stderr}"
        return json.loads(done.stdout)

    def fails(self, code: Exit, *args: str, **kw: Any) -> str:
        done = self.run("-o", "json", *args, **kw)
        assert done.returncode == int(code), (
            f"vimctl {' '.join(args)}: expected exit {int(code)}, got {done.returncode}\n"
            f"{done.stdout}\n{done.stderr}"
        )
        return done.stderr


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiNodeProcess]:
    workdir = tmp_path_factory.mktemp("vimctl")
    secret = workdir / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    api = ApiNodeProcess("api", workdir, f"sqlite:///{workdir / 'log.db'}", secret)
    api.start()
    with grpc.insecure_channel(api.address) as channel:
        stub = hosts_pb2_grpc.HostsStub(channel)
        for name, zone in (("cmp-1", "az-1"), ("cmp-2", "az-2")):
            stub.RegisterHost(
                hosts_pb2.RegisterHostRequest(
                    request_id=f"reg-{name}",
                    hostname=name,
                    zone=zone,
                    vcpus=16,
                    ram_mb=65536,
                    disk_gb=500,
                    management_address="10.0.0.1",
                ),
                metadata=[("authorization", f"Bearer {ADMIN}")],
                timeout=10,
            )
    try:
        yield api
    finally:
        api.kill()


@pytest.fixture
def cli(node: ApiNodeProcess) -> Cli:
    return Cli(node.address)


def test_flavour_and_image_verbs(cli: Cli, tmp_path: Path) -> None:
    flavour = cli.json(
        "flavour", "create", "m1.small", "--vcpus", "2", "--ram-mb", "2048", "--disk-gb", "10"
    )
    assert flavour["vcpus"] == 2 and flavour["name"] == "m1.small"
    assert flavour["flavour_id"] in {f["flavour_id"] for f in cli.json("flavour", "list")}
    assert cli.json("flavour", "show", flavour["flavour_id"])["ram_mb"] == "2048"
    disk = tmp_path / "cirros.qcow2"
    disk.write_bytes(b"QFI\xfb" + bytes(1020))
    image = cli.json("image", "add", "cirros", "--location", str(disk))
    assert image["disk_format"] == "DISK_FORMAT_QCOW2" and image["size_bytes"] == "1024"
    assert image["checksum"] == hashlib.sha256(disk.read_bytes()).hexdigest()
    listed = cli.json("image", "list", "--filter", "name=cirros")
    assert [i["image_id"] for i in listed] == [image["image_id"]]
    assert cli.json("image", "show", image["image_id"])["location"] == disk.as_uri()
    cli.json("image", "delete", image["image_id"], "--yes")
    cli.fails(Exit.NOT_FOUND, "image", "show", image["image_id"])
    cli.json("flavour", "delete", flavour["flavour_id"], "--yes")
    cli.fails(Exit.NOT_FOUND, "flavour", "show", flavour["flavour_id"])


def test_network_subnet_port_verbs(cli: Cli) -> None:
    net = cli.json("network", "create", "data", "--type", "vxlan")
    assert net["network_type"] == "NETWORK_TYPE_VXLAN" and int(net["segmentation_id"]) > 0
    subnet = cli.json(
        "subnet", "create", "data-v4", "--network", net["network_id"], "--cidr", "10.9.0.0/24"
    )
    assert subnet["cidr"] == "10.9.0.0/24"
    assert [
        s["subnet_id"]
        for s in cli.json("subnet", "list", "--filter", f"network={net['network_id']}")
    ] == [subnet["subnet_id"]]
    port = cli.json(
        "port", "create", "p1", "--network", net["network_id"], "--ip", subnet["subnet_id"]
    )
    assert port["mac_address"] and port["fixed_ips"][0]["ip_address"].startswith("10.9.0.")
    assert cli.json("port", "show", port["port_id"])["network_id"] == net["network_id"]
    assert port["port_id"] in {
        p["port_id"] for p in cli.json("port", "list", "--filter", f"network={net['network_id']}")
    }
    cli.json("port", "delete", port["port_id"], "-y")
    cli.json("subnet", "delete", subnet["subnet_id"], "-y")
    cli.json("network", "delete", net["network_id"], "-y")
    assert net["network_id"] not in {n["network_id"] for n in cli.json("network", "list")}


def test_server_and_affinity_group_verbs(cli: Cli) -> None:
    flavour = cli.json("flavour", "create", "m1.tiny", "--vcpus", "1", "--ram-mb", "512")
    image = cli.json(
        "image",
        "add",
        "tiny",
        "--location",
        "https://images.example/tiny.qcow2",
        "--checksum",
        "ab" * 32,
        "--size-bytes",
        "4096",
    )
    net = cli.json("network", "create", "srv-net")
    cli.json("subnet", "create", "srv-v4", "--network", net["network_id"], "--cidr", "10.8.0.0/24")
    group = cli.json(
        "affinity-group", "create", "vnf-a", "--policy", "anti-affinity", "--scope", "host"
    )
    assert group["policy"] == "AFFINITY_POLICY_ANTI_AFFINITY"
    server = cli.json(
        "server",
        "create",
        "vm-1",
        "--flavour",
        flavour["flavour_id"],
        "--image",
        image["image_id"],
        "--network",
        net["network_id"],
        "--group",
        group["group_id"],
        "--meta",
        "role=lb",
        "--priority",
        "5",
        "--watchdog",
        "reset",
        "--no-live-migration",
    )
    assert server["state"] == "SERVER_STATE_BUILDING"
    assert server["metadata"] == {"role": "lb"} and server["watchdog"] == "WATCHDOG_POLICY_RESET"
    assert server["migration"]["live_migration_allowed"] is False
    shown = cli.json("server", "show", server["server_id"])
    assert shown["nics"][0]["network_id"] == net["network_id"]
    assert server["server_id"] in {
        s["server_id"] for s in cli.json("server", "list", "--filter", "name=vm-1")
    }
    assert cli.json("affinity-group", "show", group["group_id"])["member_ids"] == [
        server["server_id"]
    ]
    assert group["group_id"] in {g["group_id"] for g in cli.json("affinity-group", "list")}
    # A BUILDING server cannot be started: the API refuses it by state (exit 6).
    cli.fails(Exit.CONFLICT, "server", "start", server["server_id"])
    cli.fails(Exit.CONFLICT, "server", "migrate", server["server_id"])
    cli.json("server", "delete", server["server_id"], "--yes")
    assert cli.json("server", "show", server["server_id"])["state"] == "SERVER_STATE_DELETED"
    cli.json("affinity-group", "delete", group["group_id"], "--yes")


def test_host_verbs(cli: Cli) -> None:
    hosts = cli.json("host", "list")
    assert {h["hostname"] for h in hosts} >= {"cmp-1", "cmp-2"}
    assert [h["hostname"] for h in cli.json("host", "list", "--filter", "zone=az-2")] == ["cmp-2"]
    assert cli.json("host", "show", "cmp-1")["zone"] == "az-1"
    entered = cli.json("host", "maintenance", "enable", "cmp-1", "--reason", "bios", "--wait")
    assert entered["maintenance"] is True and entered["empty"] is True
    assert cli.json("host", "show", "cmp-1")["state"] == "HOST_STATE_MAINTENANCE"
    left = cli.json("host", "maintenance", "disable", "cmp-1")
    assert left["maintenance"] is False and left["state"] == "HOST_STATE_UP"
    zones = {z["name"]: z for z in cli.json("host", "zones")}
    assert set(zones) >= {"az-1", "az-2"}
    report = cli.json("host", "capacity", "--zone", "az-1")
    assert [h["hostname"] for h in report["hosts"]] == ["cmp-1"]
    assert cli.json("host", "servers", "cmp-2") == []
    cli.fails(Exit.NOT_FOUND, "host", "show", "no-such-host")


def test_quota_and_reservation_verbs(cli: Cli) -> None:
    quota = cli.json("quota", "set", "tenant-q", "--cores", "8", "--instances", "4")
    assert quota["limits"]["cores"] == "8" and quota["limits"]["ram_mb"] == "-1"
    quota = cli.json("quota", "set", "tenant-q", "--cores", "16")
    assert cli.json("quota", "show", "tenant-q")["limits"]["cores"] == "16"
    assert "tenant-q" in {q["tenant_id"] for q in cli.json("quota", "list")}
    cli.json("quota", "delete", "tenant-q", "--yes")
    reservation = cli.json(
        "reservation",
        "create",
        "--zone",
        "az-1",
        "--vcpus",
        "4",
        "--ram-mb",
        "4096",
        "--instances",
        "2",
    )
    assert reservation["status"] == "RESERVATION_STATUS_RESERVED"
    rid = reservation["reservation_id"]
    assert cli.json("reservation", "show", rid)["vcpus"] == 4
    assert rid in {
        r["reservation_id"] for r in cli.json("reservation", "list", "--filter", "status=reserved")
    }
    cli.json("reservation", "delete", rid, "--yes")
    assert cli.json("reservation", "show", rid)["status"] == "RESERVATION_STATUS_TERMINATED"


def test_events_projections_and_cluster(cli: Cli, node: ApiNodeProcess) -> None:
    cli.json("flavour", "create", "ev.flavour", "--vcpus", "1", "--ram-mb", "256")
    tail = cli.json("events", "tail", "-n", "5")
    assert 0 < len(tail) <= 5 and "FlavorCreated" in {e["type"] for e in tail}
    positions = [int(e["position"]) for e in tail]
    assert positions == sorted(positions)
    typed = cli.json("events", "tail", "-n", "2", "--type", "HostRegistered")
    assert [e["type"] for e in typed] == ["HostRegistered", "HostRegistered"]
    watched = cli.run(
        "-o",
        "json",
        "events",
        "watch",
        "--from",
        "0",
        "--count",
        "2",
        "--kind",
        "host",
        "--seconds",
        "30",
    )
    assert watched.returncode == 0, watched.stderr
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(lines) == 2 and all(e["stream_id"].startswith("host-") for e in lines)
    # Without --from it follows from now: nothing old is printed.
    now_only = cli.run("-o", "json", "events", "watch", "--seconds", "1")
    assert now_only.returncode == 0, now_only.stderr
    assert now_only.stdout.strip() == ""
    status = cli.json("projections", "status")
    rebuilt = cli.json("projections", "rebuild")
    assert rebuilt["identical"] is True and rebuilt["digest_after"] == status["digest"]
    rows = cli.json("cluster", "status")
    by_member = {(r["member"], r["endpoint"]): r["health"] for r in rows}
    assert by_member[("api", node.address)] == "SERVING"
    assert by_member[("eventlog", "sqlite")] == "OK"
    # Embedded coordination: an agent counts as alive while its host is UP.
    assert by_member[("agent", "cmp-1")] == "ALIVE" and by_member[("agent", "cmp-2")] == "ALIVE"
    leaders = {r["role"]: r for r in cli.json("leader")}
    assert set(leaders) == {"scheduler", "faultd", "sdn"}
    assert all(r["coordination"] == "embedded" and r["holder"] == "" for r in leaders.values())
    dead = f"127.0.0.1:{free_port()}"
    done = cli.run(
        "-o", "json", "--endpoint", node.address, "--endpoint", dead, "cluster", "status"
    )
    assert done.returncode == int(Exit.UNAVAILABLE)
    health = {r["endpoint"]: r["health"] for r in json.loads(done.stdout)}
    assert health[node.address] == "SERVING" and health[dead].startswith("UNREACHABLE")


def test_output_formats_and_exit_codes(cli: Cli, tmp_path: Path) -> None:
    as_yaml = cli.run("--output", "yaml", "host", "show", "cmp-2")
    assert as_yaml.returncode == 0 and yaml.safe_load(as_yaml.stdout)["hostname"] == "cmp-2"
    table = cli.run("host", "list")
    assert table.returncode == 0 and "cmp-1" in table.stdout
    err = cli.fails(Exit.INVALID, "flavour", "create", "", "--vcpus", "1", "--ram-mb", "1")
    assert "name" in err  # the field violation is printed
    cli.fails(Exit.DENIED, "flavour", "list", token="not-a-token")
    cli.fails(Exit.DENIED, "flavour", "create", "x", "--vcpus", "1", "--ram-mb", "1", token=READER)
    cli.fails(Exit.NOT_CONFIRMED, "network", "delete", "whatever")
    cli.fails(
        Exit.USAGE, "server", "create", "x", "--flavour", "f", "--image", "i", "--watchdog", "bark"
    )
    cli.fails(Exit.USAGE, "host", "list", env={"VIMCTL_CONFIG": str(tmp_path / "missing.toml")})
    bad = tmp_path / "bad.toml"
    bad.write_text("[default\nendpoints = 3")
    cli.fails(Exit.USAGE, "host", "list", env={"VIMCTL_CONFIG": str(bad)})
    cli.fails(Exit.USAGE, "host", "list", env={"VIM_INSECURE": ""})  # TLS by default: needs a CA
    config = tmp_path / "vimctl.toml"
    config.write_text(
        f'[lab]\nendpoints = ["{cli.endpoint}"]\ninsecure = true\ntoken = "{ADMIN}"\n'
    )
    done = cli.run(
        "-o",
        "json",
        "--profile",
        "lab",
        "host",
        "show",
        "cmp-1",
        env={
            "VIMCTL_CONFIG": str(config),
            "VIM_ENDPOINTS": "",
            "VIM_TOKEN": "",
            "VIM_INSECURE": "",
        },
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["hostname"] == "cmp-1"
    dead = Cli(f"127.0.0.1:{free_port()}")
    dead.fails(Exit.UNAVAILABLE, "--timeout", "1", "host", "list")
