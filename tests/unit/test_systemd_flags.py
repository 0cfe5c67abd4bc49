"""The systemd units start the services with flags the services really have.

For each unit in deploy/systemd/: every `--flag` of its ExecStart= appears in
the console script's own `--help`; every `${VAR}` it uses has a default in an
Environment= line of the unit; the watchdog period leaves room for the
services' one-second pings; and the module the console script names runs with
`python -m` (it has a `__main__` block).
"""

from __future__ import annotations

import configparser
import contextlib
import importlib
import io
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
SERVICES = ["api", "scheduler", "faultd", "sdn", "agent"]


def _unit(service: str) -> configparser.SectionProxy:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((UNITS / f"vim-{service}.service").read_text())
    return unit["Service"]


def _help(service: str) -> str:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module_name, _, func = scripts[f"vim-{service}"].partition(":")
    module = importlib.import_module(module_name)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        getattr(module, func)(["--help"])
    return out.getvalue()


@pytest.mark.parametrize("service", SERVICES)
def test_unit_flags_exist_and_variables_have_defaults(service: str) -> None:
    section = _unit(service)
    argv = section["ExecStart"].split()
    flags = [a for a in argv[1:] if a.startswith("--")]
    assert "--metrics-listen" in flags, argv
    text = _help(service)
    assert [f for f in flags if f not in text] == []
    defaults = dict(
        line.split("=", 1) for line in section.get("Environment", "").split() if "=" in line
    )
    for var in re.findall(r"\$\{(\w+)\}", section["ExecStart"]):
        assert re.fullmatch(r"[\w.\[\]:]+:\d+", defaults.get(var, "")), (var, defaults)
    watchdog_s = int(section["WatchdogSec"].removesuffix("s"))
    assert watchdog_s >= 3  # pings every second (or every WATCHDOG_USEC/2 when shorter)
    assert section["NotifyAccess"] == "main"


@pytest.mark.parametrize("service", SERVICES)
def test_service_module_runs_with_python_m(service: str) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module = scripts[f"vim-{service}"].partition(":")[0]
    source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
    assert re.search(r'^if __name__ == "__main__":\n\s+(sys\.exit\()?main\(\)', source, re.M)


def test_the_check_catches_a_flag_the_service_lacks() -> None:
    assert "--metrics-listen" in _help("scheduler")
    assert "--no-such-flag" not in _help("scheduler")
