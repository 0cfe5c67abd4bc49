"""The local multi-host cluster (`vim.deploy.LocalCluster`, `vim-cluster`), for real.

The full shape: 3 etcd members, a PostgreSQL primary with a streaming standby,
3 API nodes (mutual TLS), 2 schedulers, 2 fault managers, 2 SDN controllers and
2 agent hosts, each in its own network namespace with its own Open vSwitch and
libvirt test node. The operator's `vimctl cluster status` (the real console
script, through the generated profile) must report every member healthy; every
metrics endpoint is scraped over HTTP and parsed; after the stop no process,
namespace or listening port of the cluster is left.

A second, smaller cluster goes through the command line: `vim-cluster up
--detach` with a config file, `status`, `down`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vim.deploy import ConfigError, LocalCluster, Member, load_config, overrides
from vim.deploy.state import (
    lab_namespaces,
    member_running,
    pid_alive,
    read_state,
    recorded_members,
)
from vim.harness.ports import is_listening, wait_until

BIN = Path(sys.executable).parent
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Metric names the Grafana dashboard reads from etcd itself (tests/unit/test_dashboard.py
# checks the project's own names against the code; these are checked against a scrape).
ETCD_DASHBOARD_METRICS = {"etcd_server_has_leader", "etcd_server_leader_changes_seen"}


def _console(name: str, module: str) -> list[str]:
    script = BIN / name
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def _scrape(endpoint: str) -> dict[str, dict[str, float]]:
    """family name -> {sample name: sum of its values over label sets}."""
    with _http.open(f"http://{endpoint}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    families: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        samples = families.setdefault(family.name, {})
        for sample in family.samples:
            samples[sample.name] = samples.get(sample.name, 0.0) + sample.value
    return families


def _processes_mentioning(path: Path) -> list[str]:
    """Command lines of running processes that name `path` (every cluster service does:
    its log, port files, state or the supervisor's --dir)."""
    needle = str(path).encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if needle in cmdline:
            argv = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{proc.name}: {argv}")
    return found


def _listening(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    return is_listening(int(port), host)


@pytest.mark.slow
def test_full_shape_cluster_is_healthy_scraped_and_leaves_nothing(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", overrides(hosts=2))
    try:
        cluster.start()
        cluster.wait_healthy(90)
        members = cluster.members()
        kinds = Counter(m.kind for m in members)
        assert kinds == {
            "etcd": 3,
            "postgres": 2,
            "api": 3,
            "scheduler": 2,
            "faultd": 2,
            "sdn": 2,
            "agent": 2,
            "ovs": 2,
        }
        assert all(member_running(m) for m in members), [
            m for m in members if not member_running(m)
        ]
        agents = {m.name: m for m in members if m.kind == "agent"}
        assert all(m.netns for m in agents.values())
        assert cluster.pg_standby is not None and cluster.pg_standby.is_standby()

        state = read_state(cluster.dir)
        assert state["state"] == "started"
        assert {m["name"] for m in state["members"]} == {m.name for m in members}

        # The operator's view, through the real vimctl and the generated profile (mTLS).
        status = subprocess.run(
            [
                *_console("vimctl", "vim.cli.app"),
                *("-o", "json", "--config", str(cluster.dir / "vimctl.toml")),
                *("cluster", "status"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        rows = json.loads(status.stdout)
        by_member = Counter(r["member"] for r in rows)
        assert by_member == {"api": 3, "eventlog": 1, "etcd": 3, "agent": 2}
        assert {r["health"] for r in rows if r["member"] == "api"} == {"SERVING"}
        assert {r["endpoint"] for r in rows if r["member"] == "api"} == set(cluster.api_endpoints)
        assert [r["health"] for r in rows if r["member"] == "eventlog"] == ["OK"]
        assert [r["health"] for r in rows if r["member"] == "etcd"] == ["OK"] * 3
        assert {r["endpoint"]: r["health"] for r in rows if r["member"] == "agent"} == {
            "host1": "ALIVE",
            "host2": "ALIVE",
        }
        # Every elected role has a leader; fault managers and SDN controllers campaign
        # under the names vim-cluster gave them.
        leaders = {leader.role: leader.holder for leader in cluster.cluster_status().leaders}
        assert leaders["scheduler"], leaders
        assert leaders["faultd"] in {"faultd-1", "faultd-2"}, leaders
        assert leaders["sdn"] in {"sdn-1", "sdn-2"}, leaders

        targets = _check_metrics(cluster)
        pids = [m.pid for m in members if m.pid]
        endpoints = [m.endpoint for m in members if m.kind in ("etcd", "postgres", "api")]
        endpoints += [m.metrics for m in targets]
        tag = state["lab_tag"]
        assert lab_namespaces(tag)
    finally:
        cluster.stop()

    assert [p for p in pids if pid_alive(p)] == []
    assert _processes_mentioning(cluster.dir) == []
    assert lab_namespaces(tag) == []
    assert [e for e in endpoints if _listening(e)] == []
    assert read_state(cluster.dir)["state"] == "stopped"


# What each kind of service must export besides the cross-service vim_service_* families
# (its own stats counters, read at scrape time, and its per-service leader/term/build).
SERVICE_FAMILIES = {
    "scheduler": {"vim_scheduler_placed", "vim_scheduler_rounds", "vim_scheduler_fenced"},
    "faultd": {"vim_faultd_detected", "vim_faultd_fenced", "vim_faultd_evacuated"},
    "sdn": {"vim_sdn_written", "vim_sdn_terms", "vim_sdn_segment_clashes"},
    "agent": {
        "vim_agent_reconcile_passes",
        "vim_agent_reconcile_actions",
        "vim_agent_lease_renewals",
        "vim_agent_domains",
        "vim_agent_lease_alive",
    },
}


def _check_metrics(cluster: LocalCluster) -> list[Member]:
    """Scrape and parse every metrics endpoint; return the members that have one."""
    # Every service has a metrics endpoint, and it answers in the Prometheus text format.
    assert cluster.without_metrics == []
    targets = cluster.metrics_targets()
    members = [m for m in cluster.members() if m.kind not in ("postgres", "ovs")]
    assert sorted(m.name for m in targets) == sorted(m.name for m in members)
    for m in targets:
        families = _scrape(m.metrics)
        assert families, f"{m.kind} {m.name}: no metric families"
        if m.kind == "etcd":
            assert set(families) >= ETCD_DASHBOARD_METRICS, m.name
            assert families["etcd_server_has_leader"] == {"etcd_server_has_leader": 1.0}
            continue
        if m.kind == "api":
            # vimctl asked every node on its own (health, log head, read model).
            requests = families["vim_api_requests"]["vim_api_requests_total"]
            assert requests >= 2, (m.name, requests)
            continue
        assert set(families) >= SERVICE_FAMILIES[m.kind], (m.name, sorted(families))
        assert families["vim_service_up"] == {"vim_service_up": 1.0}, m.name
        assert families[f"vim_{m.kind}_build_info"][f"vim_{m.kind}_build_info"] == 1.0
        if m.kind == "agent":
            assert families["vim_agent_lease_alive"] == {"vim_agent_lease_alive": 1.0}, m.name
            passes = families["vim_agent_reconcile_passes"]["vim_agent_reconcile_passes_total"]
            assert passes >= 1, m.name
    # One leader per elected role (the gauges refresh every second: a fresh term may lag);
    # an agent is always active.
    wanted = {"scheduler": 1, "faultd": 1, "sdn": 1, "agent": cluster.config.hosts}
    wait_until(lambda: _leaders(targets) == wanted, 10, what=f"leader gauges {wanted}")
    targets_file = json.loads((cluster.dir / "prometheus-targets.json").read_text())
    assert sorted(t["targets"][0] for t in targets_file) == sorted(m.metrics for m in targets)
    return targets


def _leaders(targets: list[Member]) -> dict[str, int]:
    """Per kind, how many members' `vim_<kind>_is_leader` gauge says they lead."""
    leaders: Counter[str] = Counter()
    for m in targets:
        if m.kind in SERVICE_FAMILIES:
            name = f"vim_{m.kind}_is_leader"
            leaders[m.kind] += int(_scrape(m.metrics)[name][name])
    return dict(leaders)


@pytest.mark.slow
def test_vim_cluster_command_detaches_reports_and_stops(tmp_path: Path) -> None:
    """`up --detach` with a config file, `status`, `down`: the command-line life cycle."""
    directory = tmp_path / "small"
    config = tmp_path / "cluster.toml"
    config.write_text(
        "[etcd]\nmembers = 1\n[postgres]\nstandby = false\n[api]\nnodes = 1\n"
        "[scheduler]\ncount = 1\n[faultd]\ncount = 1\n[sdn]\ncount = 0\n"
        "[agents]\nhosts = 0\n[cluster]\ntls = false\n"
    )
    vim_cluster = _console("vim-cluster", "vim.deploy.cli")
    up = subprocess.run(
        [*vim_cluster, "up", "--dir", str(directory), "--config", str(config), "--detach"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = read_state(directory)
        assert state["state"] == "running" and pid_alive(state["supervisor_pid"])
        assert Counter(m["kind"] for m in state["members"]) == {
            "etcd": 1,
            "postgres": 1,
            "api": 1,
            "scheduler": 1,
            "faultd": 1,
        }
        profile = (directory / "vimctl.toml").read_text()
        assert "insecure = true" in profile
        status = subprocess.run(
            [*vim_cluster, "status", "--dir", str(directory), "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert all(r["running"] for r in json.loads(status.stdout)["members"])
        again = subprocess.run(
            [*vim_cluster, "up", "--dir", str(directory), "--detach"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert again.returncode == 2 and "already runs" in again.stderr
    finally:
        down = subprocess.run(
            [*vim_cluster, "down", "--dir", str(directory)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert down.returncode == 0, down.stdout + down.stderr
    # The supervisor stopped its members itself: nothing needed sweeping.
    assert "swept" not in down.stdout, down.stdout
    after = read_state(directory)
    assert after["state"] == "stopped"
    assert not pid_alive(state["supervisor_pid"])
    assert [m["name"] for m in after["members"] if m["pid"] and pid_alive(m["pid"])] == []
    assert _processes_mentioning(directory) == []
    status = subprocess.run(
        [*vim_cluster, "status", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 3


@pytest.mark.slow
def test_down_sweeps_a_cluster_whose_supervisor_was_killed(tmp_path: Path) -> None:
    """SIGKILL the detached supervisor: its members (in their own sessions) live on,
    and `down` must find and stop every one of them from cluster.json alone."""
    directory = tmp_path / "orphans"
    config = tmp_path / "cluster.toml"
    config.write_text(
        "[etcd]\nmembers = 1\n[postgres]\nstandby = false\n[api]\nnodes = 1\n"
        "[scheduler]\ncount = 0\n[faultd]\ncount = 0\n[sdn]\ncount = 0\n"
        "[agents]\nhosts = 1\n[cluster]\ntls = false\n"
    )
    vim_cluster = _console("vim-cluster", "vim.deploy.cli")
    up = subprocess.run(
        [*vim_cluster, "up", "--dir", str(directory), "--config", str(config), "--detach"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    state = read_state(directory) if (directory / "cluster.json").exists() else {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        supervisor = state["supervisor_pid"]
        os.kill(supervisor, signal.SIGKILL)
        wait_until(lambda: not pid_alive(supervisor), 15, what="the supervisor to die")
        members = recorded_members(state)
        assert {m.kind for m in members} == {"etcd", "postgres", "api", "ovs", "agent"}
        assert all(member_running(m) for m in members)  # orphans, still running
        assert lab_namespaces(state["lab_tag"])
    finally:
        down = subprocess.run(
            [*vim_cluster, "down", "--dir", str(directory)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert down.returncode == 0, down.stdout + down.stderr
    for kind in ("etcd", "api", "agent", "postgres", "netns", "directory"):
        assert f"swept {kind}" in down.stdout, down.stdout
    assert [m.name for m in members if member_running(m)] == []
    assert lab_namespaces(state["lab_tag"]) == []
    assert [d for d in state["temp_dirs"] if Path(d).exists()] == []
    endpoints = [m.endpoint for m in members if m.kind in ("etcd", "postgres", "api")]
    assert [e for e in endpoints if _listening(e)] == []


def test_config_file_errors_name_the_key(tmp_path: Path) -> None:
    bad = {
        "[api]\nnodes = 0\n": "api.nodes",
        "[etcd]\nmembers = 2\n": "etcd.members",
        "[agents]\nhostz = 3\n": "agents.hostz: unknown key",
        "[agent]\nhosts = 3\n": "agent: unknown section",
        "[cluster]\ntls = 1\n": "cluster.tls: expected true/false",
        "[scheduler]\ncount = true\n": "scheduler.count: expected an integer, got a boolean",
        "[agents]\nzones = []\n": "agents.zones",
        "[api\n": "not valid TOML",
    }
    for text, needle in bad.items():
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
            load_config(path)
    path = tmp_path / "ok.toml"
    path.write_text('[agents]\nhosts = 4\nzones = ["a", "b"]\nresync_s = 2\n')
    config = load_config(path, hosts=3)
    assert (config.hosts, config.zones, config.agent_resync_s) == (3, ("a", "b"), 2.0)
    assert [config.zone_of(i) for i in range(3)] == ["a", "b", "a"]
    assert config.tls and config.pg_standby and config.etcd_members == 3


def test_vim_cluster_refuses_a_bad_config_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[api]\nnodes = 99\n")
    argv = ["up", "--dir", str(tmp_path / "d"), "--config", str(path)]
    proc = subprocess.run(
        [*_console("vim-cluster", "vim.deploy.cli"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("VIM_")},
    )
    assert proc.returncode == 2
    assert "api.nodes: must be 0-9, got 99" in proc.stderr
    assert not (tmp_path / "d" / "cluster.json").exists()
