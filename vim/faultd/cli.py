"""The `vim-faultd` console script: one fault manager, elected like the scheduler.

```
vim-faultd --eventlog-url postgresql://... --etcd 10.0.0.1:2379,10.0.0.2:2379 \\
    --credentials-file /etc/vim/fencing.yaml --zone-policy edge=reserved_host:cmp-9 \\
    --zone-policy lab=none
```

With `--etcd` the fault manager is elected through etcd (role `faultd`) and
watches the agents' liveness keys there; while it leads it also probes every
agent's UDP heartbeat endpoint every `--heartbeat-interval` (0.2 s) and
suspects a host with a BMC driver whose agent has been silent for
`--suspect-after` (0.8 s; 0: the lease only), see `vim.faultd.heartbeat`.
Without it (the embedded default) it uses the in-process elector and an
in-process liveness registry: nothing fails then, because no agent holds a
lease, and hosts without a lease are not suspected (`unleased_grace_s=None`).

It logs JSON lines, serves Prometheus metrics on `--metrics-listen`
(`vim_faultd_*` from the manager's `Stats`, `vim_faultd_is_leader`,
`vim_faultd_term`, `vim_faultd_build_info`, the cross-service `vim_service_*`)
and tells systemd READY=1 once its read model has caught up and it campaigns,
then WATCHDOG=1 from its event loop (`vim.sdnotify`).

The credentials file (YAML or JSON) maps hostnames to BMC logins, with an
optional `default`; it is the only place they live (never the event log):

```yaml
default: {username: admin, password: secret, verify_tls: true}
hosts:
  cmp-1: {username: root, password: other, ca_file: /etc/vim/bmc-ca.pem}
```
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ha.election import Elector, EtcdElector, Leadership, LocalElector
from ha.fencing import Credentials
from vim import telemetry
from vim.domain import evacuation as ev
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import EventLog
from vim.faultd.heartbeat import DEFAULT_INTERVAL_S, DEFAULT_SUSPECT_AFTER_S, HeartbeatMonitor
from vim.faultd.liveness import EtcdLiveness, LivenessSource, LocalLiveness
from vim.faultd.service import ROLE, STATS_HELP, CompanionFactory, FaultdConfig, FaultManager
from vim.projections.readmodel import Projector, ReadModel
from vim.sdnotify import Notifier, keep_pinging, stop_on_signals

log = logging.getLogger(__name__)


def parse_zone_policy(text: str) -> tuple[str, ev.ZonePolicy]:
    """`ZONE=auto`, `ZONE=none` or `ZONE=reserved_host:HOST[+HOST...]`."""
    zone, sep, spec = text.partition("=")
    name, _, hosts = spec.partition(":")
    if not sep or not zone:
        raise argparse.ArgumentTypeError(f"expected ZONE=POLICY, got {text!r}")
    try:
        policy = ev.RecoveryPolicy(name)
    except ValueError:
        choices = ", ".join(p.value for p in ev.RecoveryPolicy)
        raise argparse.ArgumentTypeError(f"policy must be one of {choices}, got {name!r}") from None
    reserved = tuple(h for h in hosts.split("+") if h)
    if policy is ev.RecoveryPolicy.RESERVED_HOST and not reserved:
        raise argparse.ArgumentTypeError(f"{text!r}: reserved_host needs :HOST[+HOST...]")
    return zone, ev.ZonePolicy(policy, reserved)


def _credentials(raw: Any) -> Credentials:
    if not isinstance(raw, Mapping):
        raise ValueError("each credentials entry must be a mapping")
    return Credentials(
        username=str(raw.get("username", "")),
        password=str(raw.get("password", "")),
        verify_tls=bool(raw.get("verify_tls", True)),
        ca_file=str(raw.get("ca_file", "")),
    )


def load_credentials(path: str) -> Callable[[str], Credentials]:
    """A lookup by hostname from the credentials file ('' : no credentials at all)."""
    if not path:
        return lambda _h: Credentials()
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping with 'default' and/or 'hosts'")
    default = _credentials(data.get("default") or {})
    hosts = {str(k): _credentials(v) for k, v in (data.get("hosts") or {}).items()}
    return lambda hostname: hosts.get(hostname, default)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="vim-faultd", description="Run one VIM fault manager.")
    p.add_argument(
        "--eventlog-url",
        default=env("VIM_EVENTLOG_URL", "sqlite:///./var/eventlog.db"),
        help="postgresql://... or sqlite:///PATH (env VIM_EVENTLOG_URL)",
    )
    p.add_argument(
        "--etcd",
        default=env("VIM_ETCD_ENDPOINTS", ""),
        help="comma-separated etcd host:port list (env VIM_ETCD_ENDPOINTS); "
        "empty: in-process elector and liveness (embedded)",
    )
    p.add_argument("--election-prefix", default=env("VIM_ELECTION_PREFIX", ""))
    p.add_argument("--liveness-prefix", default=env("VIM_LIVENESS_PREFIX", "/vim/hosts/"))
    p.add_argument("--lease-ttl", type=float, default=2.0, help="agents' liveness TTL (s)")
    p.add_argument("--self-fence-margin", type=float, default=3.0)
    p.add_argument("--unleased-grace", type=float, default=6.0)
    p.add_argument("--fence-retry", type=float, default=5.0)
    p.add_argument("--credentials-file", default=env("VIM_FENCING_CREDENTIALS", ""))
    p.add_argument(
        "--zone-policy",
        type=parse_zone_policy,
        action="append",
        default=[],
        metavar="ZONE=auto|none|reserved_host:HOST[+HOST]",
    )
    p.add_argument("--default-policy", choices=[p.value for p in ev.RecoveryPolicy], default="auto")
    p.add_argument("--flap-window", type=float, default=600.0)
    p.add_argument("--flap-max-failures", type=int, default=2)
    p.add_argument("--evacuation-interval", type=float, default=0.0)
    p.add_argument(
        "--max-migrations-per-group",
        type=int,
        default=1,
        help="maintenance: simultaneous migrations per affinity group (one VNF)",
    )
    p.add_argument(
        "--migration-timeout",
        type=float,
        default=300.0,
        help="seconds a migration may wait for its source host to release the server "
        "before it is abandoned (the server stays on the source)",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=DEFAULT_INTERVAL_S,
        help="while leading, probe every agent's UDP heartbeat endpoint this often (s); "
        "costs hosts/interval probes per second",
    )
    p.add_argument(
        "--suspect-after",
        type=float,
        default=DEFAULT_SUSPECT_AFTER_S,
        help="suspect a host (with a BMC driver) whose agent has not answered for this long (s); "
        "0: no heartbeat suspicion, the lease only",
    )
    p.add_argument("--name", default="")
    p.add_argument("--log-level", default=env("VIM_LOG_LEVEL", "INFO"))
    telemetry.add_metrics_arguments(p)
    a = p.parse_args(argv)
    a.metrics_listen = telemetry.metrics_listen(p, a.metrics_listen)
    if a.heartbeat_interval <= 0:
        p.error("--heartbeat-interval must be > 0")
    if a.suspect_after < 0 or 0 < a.suspect_after < 2 * a.heartbeat_interval:
        p.error("--suspect-after must be 0 (disabled) or at least 2 heartbeat intervals")
    if not a.migration_timeout > 0:
        p.error("--migration-timeout must be > 0 seconds")
    return a


def alarm_companion() -> CompanionFactory | None:
    """The alarm reactor (`vim.alarms.AlarmReactor`) if this build has it; see docs/FAULTS.md.

    Hook: it is constructed with (event log, read model, leadership callable)
    and run while this fault manager leads.
    """
    try:
        module = importlib.import_module("vim.alarms")
    except ImportError:
        return None
    return getattr(module, "AlarmReactor", None)


async def serve(
    url: str,
    elector: Elector,
    liveness: LivenessSource,
    config: FaultdConfig,
    credentials_file: str,
    *,
    metrics: telemetry.ServiceMetrics | None = None,
    notifier: Notifier | None = None,
    heartbeat: HeartbeatMonitor | None = None,
) -> None:
    """Open the log, follow it into a read model, and manage faults until cancelled."""
    notifier = notifier or Notifier.from_env()
    event_log = await SqlEventLog.open(url)
    projector = Projector(event_log)
    companions: list[CompanionFactory] = []
    reactor = alarm_companion()
    if reactor is not None:
        companions.append(_bind(reactor, event_log, projector.model))
    manager = FaultManager(
        event_log,
        projector.model,
        liveness,
        elector=elector,
        credentials=load_credentials(credentials_file),
        config=config,
        companions=companions,
        heartbeat=heartbeat,
    )
    if metrics is not None:
        metrics.track_stats(manager.stats, descriptions=STATS_HELP)
    pings: asyncio.Task[None] | None = None
    try:
        await projector.catch_up()
        projector.start()
        tick = telemetry.leader_tick(metrics, elector)
        pings = asyncio.create_task(keep_pinging(notifier, tick=tick))
        stop_on_signals(manager.stop)
        notifier.ready(f"campaigning as {config.name}")
        await manager.run()
    finally:
        notifier.stopping()
        if pings is not None:
            pings.cancel()
        await manager.stop()
        await projector.stop()
        await liveness.close()
        await elector.close()
        await event_log.close()


def _bind(factory: Any, event_log: EventLog, model: ReadModel) -> CompanionFactory:
    def make(leadership: Callable[[], Leadership | None]) -> Any:
        return factory(event_log, model, leadership)

    return make


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `vim-faultd`."""
    a = _parse(argv)
    telemetry.configure_logging(a.log_level)
    endpoints = [e.strip() for e in a.etcd.split(",") if e.strip()]
    base = FaultdConfig()
    config = FaultdConfig(
        lease_ttl_s=a.lease_ttl,
        self_fence_margin_s=a.self_fence_margin,
        unleased_grace_s=a.unleased_grace if endpoints else None,
        fence_retry_s=a.fence_retry,
        zone_policies=dict(a.zone_policy),
        default_policy=ev.ZonePolicy(ev.RecoveryPolicy(a.default_policy)),
        flap=ev.FlapPolicy(a.flap_window, a.flap_max_failures),
        evacuation_interval_s=a.evacuation_interval,
        drain=ev.DrainPolicy(max(1, a.max_migrations_per_group)),
        migration_release_timeout_s=a.migration_timeout,
        name=a.name or base.name,
    )
    elector: Elector
    liveness: LivenessSource
    heartbeat = None
    if endpoints:
        if a.suspect_after > 0:
            heartbeat = HeartbeatMonitor(a.heartbeat_interval, a.suspect_after)
        kw = {"prefix": a.election_prefix} if a.election_prefix else {}
        elector = EtcdElector(endpoints, ROLE, config.name, **kw)
        liveness = EtcdLiveness(endpoints, prefix=a.liveness_prefix)
    else:
        elector = LocalElector(ROLE, config.name)
        liveness = LocalLiveness()
    metrics = telemetry.ServiceMetrics(ROLE) if a.metrics_listen else None
    endpoint = metrics.serve(a.metrics_listen, a.metrics_port_file) if metrics else None
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(
                serve(
                    a.eventlog_url,
                    elector,
                    liveness,
                    config,
                    a.credentials_file,
                    metrics=metrics,
                    heartbeat=heartbeat,
                )
            )
    finally:
        if endpoint is not None:
            endpoint.close()


if __name__ == "__main__":
    main()
