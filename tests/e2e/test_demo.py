"""The one-command demo, run as a person (and CI) runs it: through the console scripts.

* `vimctl demo --tour-only` in a fresh directory exits 0, and its final JSON line
  says every step passed: the host of the priority-900 group member was powered
  off, an alarm was raised, the host was fenced by the simulated BMC, and the
  server was rebuilt on another host with the same id, MAC and IP addresses
  while the anti-affinity group stayed on different hosts; the demo's files
  (log, CA, 0600 token, vimctl profile) are where it says.
* `vim-demo --insecure` (no `--tour-only`) keeps serving after the tour: vimctl,
  pointed at it with nothing but the profile file the demo wrote, lists the
  three servers and the raised alarm; SIGINT then stops it with exit 0.

The demo starts real components only (SQLite log, gRPC with TLS, libvirt test
nodes, real agents); everything lives under the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TOUR_TIMEOUT_S = 120.0
STEPS = [
    "health",
    "hosts",
    "catalogue",
    "anti-affinity group",
    "servers",
    "subscriptions",
    "power off",
    "failure + alarm",
    "fenced",
    "evacuated",
    "anti-affinity",
    "event log",
    "bad input",
    "metrics",
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIM_", "VIMCTL_"))}
    return {**env, "COLUMNS": "120", "HOME": env.get("HOME", "/root")}


def _script(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{path} is missing: install the project (make venv)"
    return str(path)


def _summary(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert lines, "no output"
    summary: dict[str, Any] = json.loads(lines[-1])
    return summary


def _check_summary(summary: dict[str, Any]) -> None:
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert all(s["ok"] for s in summary["steps"]), summary["steps"]
    assert summary["ok"] is True
    failed = summary["failed_host"]
    servers = {s["name"]: s for s in summary["servers"]}
    victim = servers["vnf-a-0"]
    assert summary["recovered"] == [victim["server_id"]]
    assert summary["identity_kept"] is True
    before, after = victim["before"], victim["after"]
    assert before["host"] == failed and after["host"] not in ("", failed)
    assert after["macs"] == before["macs"] and after["ips"] == before["ips"]
    assert before["macs"] and before["ips"]
    # Three servers on three hosts before; the others did not move; the group is apart.
    assert len({s["before"]["host"] for s in servers.values()}) == 3
    for name in ("vnf-a-1", "web-0"):
        assert servers[name]["after"] == servers[name]["before"]
    group = [s["after"]["host"] for s in servers.values() if s["affinity_group"]]
    assert len(set(group)) == len(group) == 2 and failed not in group
    assert summary["alarm"]["managed_object_id"] == failed
    assert summary["alarm"]["fault_type"] == "COMPUTE_NODE_FAILURE"
    assert summary["alarm"]["state"] == "ALARM_STATE_FIRED"
    assert summary["fence"]["method"] == "sim-bmc"
    assert isinstance(summary["recovery_s"], float) and summary["recovery_s"] > 0


def _run(argv: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """Run to completion; on a timeout, SIGABRT it (faulthandler dumps every thread's
    stack to stderr) and fail with its output."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_env(), "PYTHONFAULTHANDLER": "1"},
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"{argv} hung:\n{out[-4000:]}\n{err[-12000:]}") from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def test_vimctl_demo_tour_only(tmp_path: Path) -> None:
    proc = _run([_script("vimctl"), "demo", "--tour-only"], tmp_path, TOUR_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    summary = _summary(proc.stdout)
    _check_summary(summary)
    assert not [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    for shown in ("HostFailureDetected", "HostFenceConfirmed", "ServerEvacuationRequested"):
        assert shown in proc.stdout
    assert "alarm RAISED" in proc.stdout
    assert "vimctl --endpoint" in proc.stdout and "authorization: Bearer" in proc.stdout
    demo = tmp_path / "var" / "demo"
    assert (demo / "eventlog.db").exists()
    assert (demo / "tls" / "ca.pem").exists()
    assert (demo / "admin.token").stat().st_mode & 0o077 == 0
    profile = (demo / "vimctl.toml").read_text()
    assert summary["endpoint"] in profile and str(demo / "tls" / "ca.pem") in profile


class _Lines:
    """The demo's stdout, read by a thread so the test can wait on it with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line)

    def wait_for(self, predicate: Any, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if self._proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError("not seen in the demo's output:\n" + "".join(self.lines)[-6000:])


def _vimctl(profile: Path, *args: str) -> Any:
    proc = subprocess.run(
        [_script("vimctl"), "--config", str(profile), "--profile", "demo", "-o", "json", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_vim_demo_serves_until_interrupted(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [_script("vim-demo"), "--insecure"],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    try:
        out = _Lines(proc)
        summary = _summary(out.wait_for(lambda line: line.startswith("{"), TOUR_TIMEOUT_S))
        _check_summary(summary)
        out.wait_for(lambda line: "press Ctrl-C" in line, 30)
        profile = Path(summary["profile"])
        assert "insecure = true" in profile.read_text()

        servers = _vimctl(profile, "server", "list")
        items = servers["items"] if isinstance(servers, dict) else servers
        by_name = {s["name"]: s for s in items}
        assert set(by_name) == {"vnf-a-0", "vnf-a-1", "web-0"}
        assert by_name["vnf-a-0"]["host"] != summary["failed_host"]
        alarms = _vimctl(profile, "alarm", "list")
        text = json.dumps(alarms)
        assert summary["alarm"]["alarm_id"] in text and summary["failed_host"] in text

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=15)


async def test_simulated_bmc_fences_only_its_hosts_and_is_idempotent(tmp_path: Path) -> None:
    """The demo's fencing driver, in process against a started cluster: it answers only
    for its own hosts, confirms a power-off only once the host is observed off (domains
    destroyed, liveness lost), and confirms again (already off) when asked twice."""
    from ha.fencing import FenceTarget, PowerState
    from vim.demo.cluster import EmbeddedCluster
    from vim.demo.files import prepare
    from vim.demo.hosts import BMC_METHOD, bmc_endpoint

    cluster = EmbeddedCluster(prepare(tmp_path, insecure=True))
    await cluster.start()
    try:
        bmc = cluster.bmc
        target = FenceTarget("cmp-02", bmc_endpoint("cmp-02"))
        stranger = FenceTarget("cmp-09", bmc_endpoint("cmp-09"))
        mismatch = FenceTarget("cmp-02", bmc_endpoint("cmp-03"))
        assert await bmc.answers(target) and await bmc.status(target) is PowerState.ON
        assert not await bmc.answers(stranger) and not await bmc.answers(mismatch)
        refused = await bmc.power_off(mismatch)
        assert not refused.confirmed and refused.reason
        assert cluster.hosts["cmp-03"].power == "ON"

        lost: list[str] = []
        watching, gone = asyncio.Event(), asyncio.Event()

        async def watch() -> None:
            async for view in cluster.liveness.watch():
                watching.set()  # the first view is the complete one
                lost.extend(sorted(view.lost))
                if "cmp-02" in lost:
                    gone.set()

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(watching.wait(), 10)
        first = await bmc.power_off(target)
        assert first.confirmed and first.method == BMC_METHOD, first
        assert "already off" not in first.detail
        assert await bmc.status(target) is PowerState.OFF
        assert await cluster.hosts["cmp-02"].domains() == {}
        second = await bmc.power_off(target)
        assert second.confirmed and "already off" in second.detail
        await asyncio.wait_for(gone.wait(), 10)
        watcher.cancel()
        assert lost == ["cmp-02"]
        assert cluster.hosts["cmp-01"].power == "ON"
    finally:
        await cluster.stop()
