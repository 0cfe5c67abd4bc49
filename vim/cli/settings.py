"""Where `vimctl` finds its endpoints and credentials.

Each setting comes from the first of: a command-line flag, an environment
variable, the config file, a default. The config file is TOML, at `--config`,
`$VIMCTL_CONFIG`, or `~/.config/vimctl/config.toml`; it holds named profiles
(`--profile`, `$VIMCTL_PROFILE`, default `default`):

    [default]
    endpoints = ["10.0.0.1:50051", "10.0.0.2:50051"]
    token_file = "/etc/vim/operator.token"
    ca = "/etc/vim/pki/ca.pem"

Keys: endpoints (list or comma-separated string), token, token_file, ca, cert,
key, insecure (bool), output (table|json|yaml), timeout_s. A file that does not
parse, or a profile that is not in it, is an error (exit 2), never ignored.
"""

from __future__ import annotations

import enum
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class Output(enum.StrEnum):
    TABLE = "table"
    JSON = "json"
    YAML = "yaml"


class SettingsError(Exception):
    """The settings are unusable (bad file, missing endpoint, unreadable token)."""


@dataclass(frozen=True, slots=True)
class Settings:
    endpoints: tuple[str, ...]
    token: str | None
    ca: Path | None
    cert: Path | None
    key: Path | None
    insecure: bool
    output: Output
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Flags:
    """What the command line said (None: not given)."""

    endpoints: list[str] | None = None
    token: str | None = None
    token_file: Path | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool | None = None
    output: Output | None = None
    timeout_s: float | None = None
    config: Path | None = None
    profile: str | None = None


DEFAULT_CONFIG = Path("~/.config/vimctl/config.toml")
DEFAULT_ENDPOINT = "127.0.0.1:50051"


def _profile(flags: Flags, env: Mapping[str, str]) -> Mapping[str, Any]:
    explicit = flags.config or (Path(env["VIMCTL_CONFIG"]) if env.get("VIMCTL_CONFIG") else None)
    path = (explicit or DEFAULT_CONFIG).expanduser()
    name = flags.profile or env.get("VIMCTL_PROFILE") or "default"
    if not path.exists():
        if explicit is not None:
            raise SettingsError(f"config file {path} does not exist")
        if name != "default":
            raise SettingsError(f"profile {name!r} asked for, but there is no config file")
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path}: {exc}") from exc
    profile = data.get(name)
    if not isinstance(profile, dict):
        raise SettingsError(f"config file {path} has no profile [{name}]")
    return profile


def _endpoints(value: object) -> list[str]:
    if isinstance(value, str):
        return [e.strip() for e in value.split(",") if e.strip()]
    if isinstance(value, list) and all(isinstance(e, str) for e in value):
        return [e.strip() for e in value if e.strip()]
    raise SettingsError("endpoints must be a list of host:port strings")


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in {"1", "true", "yes", "on"}


def _path(value: object) -> Path | None:
    return Path(str(value)).expanduser() if value not in (None, "") else None


def resolve(flags: Flags, env: Mapping[str, str] | None = None) -> Settings:
    """The settings for one invocation; raises SettingsError with the reason."""
    env = os.environ if env is None else env
    file = _profile(flags, env)

    def pick(flag: object, env_key: str, file_key: str) -> object:
        if flag is not None:
            return flag
        if env.get(env_key):
            return env[env_key]
        return file.get(file_key)

    endpoints = _endpoints(pick(flags.endpoints, "VIM_ENDPOINTS", "endpoints") or DEFAULT_ENDPOINT)
    if not endpoints:
        raise SettingsError("no API endpoint given (--endpoint, VIM_ENDPOINTS or the config)")
    token = pick(flags.token, "VIM_TOKEN", "token")
    token_file = _path(pick(flags.token_file, "VIM_TOKEN_FILE", "token_file"))
    if token is None and token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise SettingsError(f"cannot read the token file {token_file}: {exc}") from exc
    output = pick(flags.output, "VIM_OUTPUT", "output") or Output.TABLE
    try:
        output = Output(str(output))
    except ValueError as exc:
        raise SettingsError(f"output must be one of table, json, yaml (got {output!r})") from exc
    timeout = pick(flags.timeout_s, "VIM_TIMEOUT", "timeout_s") or 10.0
    try:
        timeout_s = float(str(timeout))
    except ValueError as exc:
        raise SettingsError(f"timeout must be a number of seconds (got {timeout!r})") from exc
    if timeout_s <= 0:
        raise SettingsError("timeout must be positive")
    return Settings(
        endpoints=tuple(endpoints),
        token=str(token) if token else None,
        ca=_path(pick(flags.ca, "VIM_CA", "ca")),
        cert=_path(pick(flags.cert, "VIM_CERT", "cert")),
        key=_path(pick(flags.key, "VIM_KEY", "key")),
        insecure=_truthy(pick(flags.insecure, "VIM_INSECURE", "insecure") or False),
        output=output,
        timeout_s=timeout_s,
    )
