"""vim-agent's command line and its systemd unit."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import pytest

from vim.agent.service import hypervisor_type, parse_args, supervised

ROOT = Path(__file__).resolve().parents[2]


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("tok\n")
    monkeypatch.setenv("VIM_ETCD_ENDPOINTS", "127.0.0.1:2379,127.0.0.1:2381")
    spec = {"name": "ovs-vswitchd", "pidfile": "/run/x.pid", "start": ["a", "unix:/b"]}
    config, level = parse_args(
        [
            "--hostname",
            "cmp-1",
            "--api",
            "10.0.0.1:50051,10.0.0.2:50051",
            "--token-file",
            str(token),
            "--ovs",
            "unix:/run/db.sock",
            "--supervise",
            json.dumps(spec),
        ]
    )
    assert config.token == "tok" and level == "INFO"
    assert config.api_endpoints == ("10.0.0.1:50051", "10.0.0.2:50051")
    assert config.etcd_endpoints == ("127.0.0.1:2379", "127.0.0.1:2381")
    assert config.ttl_s == 2 and config.resync_s == 10.0
    assert config.supervise[0].start == ("a", "unix:/b")
    assert config.physical_network == "physnet1"
    assert hypervisor_type("test:///default") != hypervisor_type("qemu:///system")


@pytest.mark.parametrize(
    "argv",
    [
        ["--token-file", "/dev/null"],  # no hostname
        ["--hostname", "cmp-1"],  # no token
        ["--hostname", "cmp-1", "--ttl", "0"],
        ["--hostname", "cmp-1", "--supervise", "libvirtd=/run/pid:libvirtd -d"],
        ["--hostname", "cmp-1", "--physical-network", "bad name"],
    ],
)
def test_bad_command_lines_are_refused(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("VIM_AGENT_TOKEN", raising=False)
    monkeypatch.delenv("VIM_AGENT_HOSTNAME", raising=False)
    if "--token-file" not in argv and {"--ttl", "--supervise", "--physical-network"} & set(argv):
        monkeypatch.setenv("VIM_AGENT_TOKEN", "tok")
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2
    assert "error" in capsys.readouterr().err


def test_supervise_spec_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="start"):
        supervised(json.dumps({"name": "libvirtd", "pidfile": "/p", "start": []}))
    with pytest.raises(ValueError, match="--supervise"):
        supervised("{not json")


def test_systemd_unit_is_notify_with_a_watchdog() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "deploy" / "systemd" / "vim-agent.service")
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["WatchdogSec"].rstrip("s").isdigit()
    assert service["Restart"] == "on-failure"
    assert "vim-agent" in service["ExecStart"]
