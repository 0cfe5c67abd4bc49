"""The local cluster's configuration: a TOML file, every key optional, with defaults.

    config = load_config(Path("cluster.toml"), hosts=3)

Invariants: :func:`load_config` either returns a fully validated
:class:`ClusterConfig` or raises :class:`ConfigError` naming the offending key
(``section.key``) and why; unknown sections and keys are errors, never ignored
(a typo must not silently fall back to a default). The defaults are the shape
the issue asks for: 3 etcd members, a PostgreSQL primary with a streaming
standby, 3 API nodes, 2 schedulers, 2 fault managers, 2 SDN controllers, TLS on
(mutual TLS: every client, agents included, presents a certificate). The file
format is documented in docs/DEPLOY.md; keep both in step.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["ClusterConfig", "ConfigError", "load_config"]

MAX_HOSTS = 50
MAX_COUNT = 9


class ConfigError(ValueError):
    """The configuration file is unreadable or a value is invalid (the message says which)."""


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Every setting of a local cluster; see docs/DEPLOY.md for each key."""

    # [cluster]
    base_port: int = 0
    """0: every listener on a kernel-chosen free port; else consecutive ports from here."""
    tls: bool = True
    log_level: str = "INFO"
    # [etcd]
    etcd_members: int = 3
    etcd_tuned: bool = True
    # [postgres]
    pg_standby: bool = True
    pg_fsync: bool = False
    # [api]
    api_nodes: int = 3
    api_workers: int = 1
    # [scheduler] / [faultd] / [sdn]
    schedulers: int = 2
    scheduler_lease_ttl_s: int = 2
    faultds: int = 2
    sdns: int = 2
    # [agents]
    hosts: int = 2
    zones: tuple[str, ...] = ("zone-a", "zone-b")
    agent_ttl_s: int = 2
    agent_resync_s: float = 5.0
    host_vcpus: int = 8
    host_ram_mb: int = 16384
    ovs: bool = True
    metrics: bool = True
    """Ask every service for a metrics endpoint (those whose CLI has ``--metrics-listen``)."""

    def zone_of(self, index: int) -> str:
        """Hosts are spread over the zones round-robin (host ``i`` in ``zones[i % n]``)."""
        return self.zones[index % len(self.zones)]

    def validate(self) -> ClusterConfig:
        """Return self, or raise :class:`ConfigError` for the first invalid value."""
        counts = {
            "etcd.members": self.etcd_members,
            "api.nodes": self.api_nodes,
            "scheduler.count": self.schedulers,
            "faultd.count": self.faultds,
            "sdn.count": self.sdns,
        }
        for key, value in counts.items():
            if not 0 <= value <= MAX_COUNT:
                raise ConfigError(f"{key}: must be 0-{MAX_COUNT}, got {value}")
        if self.etcd_members not in (1, 3, 5):
            raise ConfigError(f"etcd.members: must be 1, 3 or 5, got {self.etcd_members}")
        if self.api_nodes < 1:
            raise ConfigError("api.nodes: at least one API node is needed")
        if not 0 <= self.hosts <= MAX_HOSTS:
            raise ConfigError(f"agents.hosts: must be 0-{MAX_HOSTS}, got {self.hosts}")
        if not 1 <= self.api_workers <= 8:
            raise ConfigError(f"api.workers: must be 1-8, got {self.api_workers}")
        if self.base_port and not 1024 <= self.base_port <= 65000:
            raise ConfigError(f"cluster.base_port: 0 or 1024-65000, got {self.base_port}")
        if not self.zones or any(not z or not z.replace("-", "").isalnum() for z in self.zones):
            raise ConfigError("agents.zones: a non-empty list of names ([A-Za-z0-9-])")
        for key, ttl in (("scheduler.lease_ttl_s", self.scheduler_lease_ttl_s),
                         ("agents.ttl_s", self.agent_ttl_s)):  # fmt: skip
            if not 1 <= ttl <= 60:
                raise ConfigError(f"{key}: must be 1-60 seconds, got {ttl}")
        if not 0.5 <= self.agent_resync_s <= 600:
            raise ConfigError(f"agents.resync_s: must be 0.5-600, got {self.agent_resync_s}")
        if self.host_vcpus < 1 or self.host_ram_mb < 256:
            raise ConfigError("agents.vcpus must be >= 1 and agents.ram_mb >= 256")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(
                f"cluster.log_level: DEBUG, INFO, WARNING or ERROR, got {self.log_level}"
            )
        return self


# (section, key) in the file -> (field name, expected type)
_KEYS: dict[tuple[str, str], tuple[str, type | tuple[type, ...]]] = {
    ("cluster", "base_port"): ("base_port", int),
    ("cluster", "tls"): ("tls", bool),
    ("cluster", "log_level"): ("log_level", str),
    ("cluster", "metrics"): ("metrics", bool),
    ("etcd", "members"): ("etcd_members", int),
    ("etcd", "tuned"): ("etcd_tuned", bool),
    ("postgres", "standby"): ("pg_standby", bool),
    ("postgres", "fsync"): ("pg_fsync", bool),
    ("api", "nodes"): ("api_nodes", int),
    ("api", "workers"): ("api_workers", int),
    ("scheduler", "count"): ("schedulers", int),
    ("scheduler", "lease_ttl_s"): ("scheduler_lease_ttl_s", int),
    ("faultd", "count"): ("faultds", int),
    ("sdn", "count"): ("sdns", int),
    ("agents", "hosts"): ("hosts", int),
    ("agents", "zones"): ("zones", list),
    ("agents", "ttl_s"): ("agent_ttl_s", int),
    ("agents", "resync_s"): ("agent_resync_s", (int, float)),
    ("agents", "vcpus"): ("host_vcpus", int),
    ("agents", "ram_mb"): ("host_ram_mb", int),
    ("agents", "ovs"): ("ovs", bool),
}
_FIELDS = {f.name for f in fields(ClusterConfig)}
assert {name for name, _ in _KEYS.values()} == _FIELDS, "every field has exactly one key"


def _typed(key: str, value: Any, expected: type | tuple[type, ...]) -> Any:
    # bool is an int in Python: never accept true for a count, nor 1 for a flag.
    if isinstance(value, bool) and expected is not bool:
        raise ConfigError(f"{key}: expected {_name(expected)}, got a boolean")
    if not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {_name(expected)}, got {type(value).__name__}")
    checked: Any = value
    if expected is list:
        if not all(isinstance(v, str) for v in checked):
            raise ConfigError(f"{key}: expected a list of strings")
        return tuple(checked)
    if expected == (int, float):
        return float(checked)
    return checked


def _name(expected: type | tuple[type, ...]) -> str:
    if isinstance(expected, tuple):
        return "a number"
    return {bool: "true/false", int: "an integer", str: "a string", list: "a list"}[expected]


def from_mapping(data: Mapping[str, Any]) -> ClusterConfig:
    """A validated config from parsed TOML (sections of keys)."""
    values: dict[str, Any] = {}
    sections = {s for s, _ in _KEYS}
    for section, table in data.items():
        if section not in sections:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(sorted(sections))})")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{section}: expected a table")
        for key, value in table.items():
            spec = _KEYS.get((section, key))
            if spec is None:
                known = sorted(k for s, k in _KEYS if s == section)
                raise ConfigError(f"{section}.{key}: unknown key (known: {', '.join(known)})")
            name, expected = spec
            values[name] = _typed(f"{section}.{key}", value, expected)
    return ClusterConfig(**values).validate()


def load_config(path: Path | None = None, *, hosts: int | None = None) -> ClusterConfig:
    """The defaults, overridden by the TOML file at ``path`` (if any), then by ``hosts``."""
    config = ClusterConfig()
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        config = from_mapping(data)
    if hosts is not None:
        config = replace(config, hosts=hosts)
    return config.validate()


def overrides(**changes: Any) -> ClusterConfig:
    """The defaults with some fields changed (for tests and benchmarks), validated."""
    unknown = set(changes) - _FIELDS
    if unknown:
        raise ConfigError(f"unknown settings: {sorted(unknown)}")
    return replace(ClusterConfig(), **changes).validate()
