"""`vim-faultd` options: zone policies and the credentials file, with clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from vim.domain import evacuation as ev
from vim.faultd.cli import _parse, load_credentials, parse_zone_policy


def test_zone_policies() -> None:
    assert parse_zone_policy("z1=auto") == ("z1", ev.ZonePolicy())
    assert parse_zone_policy("lab=none") == ("lab", ev.ZonePolicy(ev.RecoveryPolicy.NONE))
    zone, policy = parse_zone_policy("edge=reserved_host:cmp-9+cmp-10")
    assert zone == "edge" and policy.reserved_hosts == ("cmp-9", "cmp-10")
    assert policy.policy is ev.RecoveryPolicy.RESERVED_HOST


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("auto", "ZONE=POLICY"),
        ("z1=sometimes", "policy must be one of"),
        ("z1=reserved_host", "needs :HOST"),
    ],
)
def test_bad_zone_policies_say_why(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_zone_policy(text)


def test_the_command_line_collects_policies() -> None:
    a = _parse(["--zone-policy", "a=none", "--zone-policy", "b=reserved_host:h1"])
    assert dict(a.zone_policy)["a"].policy is ev.RecoveryPolicy.NONE
    assert a.default_policy == "auto" and dict(a.zone_policy)["b"].reserved_hosts == ("h1",)


def test_credentials_file(tmp_path: Path) -> None:
    f = tmp_path / "fencing.yaml"
    f.write_text(
        "default: {username: admin, password: pw}\n"
        "hosts:\n  cmp-1: {username: root, password: other, verify_tls: false}\n"
    )
    lookup = load_credentials(str(f))
    assert (lookup("cmp-1").username, lookup("cmp-1").verify_tls) == ("root", False)
    assert (lookup("cmp-7").username, lookup("cmp-7").password) == ("admin", "pw")
    assert load_credentials("")("any").username == ""
    f.write_text("- just a list\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_credentials(str(f))


def test_migration_timeout_option() -> None:
    assert _parse([]).migration_timeout == 300.0
    assert _parse(["--migration-timeout", "45"]).migration_timeout == 45.0
    with pytest.raises(SystemExit):
        _parse(["--migration-timeout", "0"])
