"""`vim-agent`: the compute agent of one host (docs/AGENT.md).

What it does, in order:

1. connects to the hypervisor (`LibvirtDriver`) and, unless `--ovs none`, the
   switch (`OvsDriver`); with `--ovs none` the network plan is only read and
   logged as not applied (said so at start and in every pass's log line);
2. registers its host through the API (capacity from libvirt's node info unless
   given), retrying until an API node answers;
3. starts its liveness lease (`ha.liveness.LivenessKeeper`, key
   `/vim/hosts/<hostname>/liveness`, TTL 2 s) and the self-fencing watchdog
   thread (`vim.agent.fencing`), which the keeper refreshes on every renewal;
4. reconciles (`vim.agent.reconcile`), level-triggered: on every snapshot from
   `WatchHostDesiredState`, on every driver event, after a supervised daemon
   recovered, and at least every `--resync` seconds from a fresh
   `GetHostDesiredState` (a missed event is repaired by the next pass);
5. translates driver events into reports (watchdog fired, unexpected stop);
6. supervises libvirtd / ovs-vswitchd / ovsdb-server when asked (`--supervise`);
7. tells systemd READY=1 after the first pass and WATCHDOG=1 from the event
   loop (`vim.agent.sdnotify`), so a stuck loop gets the agent restarted.

After a self-fence the agent starts nothing (`hold`) until it has recorded the
fence through the API and then seen, in a snapshot taken after that record and
after `--post-fence-hold` seconds, that its host is UP again; servers that the
fault manager moved elsewhere are no longer in that snapshot, and are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import importlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ha.liveness import DEFAULT_TTL_S, LivenessKeeper, LivenessRecord
from vim import telemetry
from vim._gen.vim.v1 import hosts_pb2
from vim.agent import heartbeat, observe, reports
from vim.agent import reconcile as rc
from vim.agent.apiclient import AgentApi
from vim.agent.drivers import DomainEvent, DomainEventKind, DomainPower, HypervisorDriver
from vim.agent.fencing import Fence, FenceWatchdog, libvirt_destroyer
from vim.agent.sdnotify import Notifier
from vim.agent.supervisor import SupervisedService, Supervisor

log = logging.getLogger("vim.agent")
PHYSNET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
"""A physical network's name, as the Networks API accepts it (`vim.domain.network`)."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """See `vim-agent --help`."""

    hostname: str
    api_endpoints: tuple[str, ...]
    token: str
    zone: str = ""
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    etcd_endpoints: tuple[str, ...] = ()
    libvirt_uri: str = "test:///default"
    state_dir: Path = Path("var/agent")
    ovs: str = "none"
    """`none`, or the OVS database socket (`/path/db.sock` or `unix:/path/db.sock`)."""
    ovs_run_dir: Path = Path("/var/run/openvswitch")
    underlay_device: str | None = None
    """The data link given to br-phy (None: no br-phy)."""
    physical_network: str = "physnet1"
    """The provider network br-phy's link is on: only its flat and vlan networks
    are bridged there."""
    underlay_ip: str = ""
    management_address: str = ""
    ttl_s: int = DEFAULT_TTL_S
    resync_s: float = 10.0
    heartbeat_ms: int = 2000
    vcpus: int = 0
    ram_mb: int = 0
    disk_gb: int = 100
    image_dir: Path | None = None
    post_fence_hold_s: float | None = None
    supervise: tuple[SupervisedService, ...] = field(default_factory=tuple)
    status_file: Path | None = None
    """Written (atomically) after every pass: what the agent sees and does (JSON)."""
    metrics_listen: str | None = None
    """Serve Prometheus metrics on HOST:PORT (`vim.agent.observe`); None: no endpoint."""
    metrics_port_file: Path | None = None
    heartbeat_listen: str | None = None
    """Answer the fault manager's UDP heartbeats on HOST:PORT (`vim.agent.heartbeat`);
    None: no heartbeat endpoint (the lease only)."""


def hypervisor_type(uri: str) -> int:
    if uri.startswith("test:"):
        return hosts_pb2.HYPERVISOR_TYPE_TEST
    return hosts_pb2.HYPERVISOR_TYPE_QEMU


def make_fence(uri: str, driver: object) -> Fence:
    """A synchronous fence for the watchdog thread.

    A `test:///PATH` node exists only inside the connection that opened it, so
    the driver's own connection is used (libvirt connections are thread-safe);
    any other URI gets a connection of its own, independent of the driver.
    """
    if uri.startswith("test:///") and uri != "test:///default":
        blocking = getattr(driver, "destroy_all_blocking", None) or getattr(
            driver, "_destroy_all_sync", None
        )
        if blocking is not None:
            return blocking  # type: ignore[no-any-return]
    return libvirt_destroyer(uri)


class Agent:
    """One host's agent; `run()` until `stop()` (or SIGTERM in `main`)."""

    def __init__(
        self,
        config: AgentConfig,
        hypervisor: HypervisorDriver,
        switch: Any = None,
        *,
        fence: Fence | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.hypervisor = hypervisor
        self.switch = switch
        self.api = AgentApi(
            config.api_endpoints,
            config.hostname,
            config.token,
            tls_ca=config.tls_ca,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            image_dir=config.image_dir,
        )
        self.reconciler = rc.Reconciler(hypervisor, switch, self.api)
        self.notifier = notifier or Notifier.from_env()
        self.watchdog = FenceWatchdog(config.ttl_s, fence or (lambda: 0))
        self.keeper: LivenessKeeper | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._latest: rc.Desired | None = None
        self._fence_recorded_at: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.passes = 0
        self.fences = 0
        """Self-fences recorded through the API by this process."""
        self.last_pass: rc.PassResult | None = None
        self.ready = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        await self._retry("connect to the hypervisor", self.hypervisor.connect)
        if self.switch is not None:
            await self._retry("connect to the switch", self.switch.connect)
        else:
            log.warning("no switch (--ovs none): network plans are read but NOT applied")
        await self._retry("register the host", self._register)
        if cfg.etcd_endpoints:
            endpoint = cfg.management_address
            if cfg.heartbeat_listen:
                responder, published = await heartbeat.start_for_agent(
                    cfg.hostname,
                    cfg.heartbeat_listen,
                    cfg.management_address,
                    lambda: self.keeper is not None and self.keeper.proven_alive(),
                )
                if responder is not None:
                    self._spawn(heartbeat.serve_until_cancelled(responder), "heartbeat")
                    endpoint = published or endpoint
            record = LivenessRecord.here(cfg.hostname, endpoint)
            self.keeper = LivenessKeeper(
                cfg.etcd_endpoints, record, ttl_s=cfg.ttl_s, on_renewed=self.watchdog.renewed
            )
            self.watchdog.start()
            self._spawn(self.keeper.run(), "liveness")
        else:
            log.warning("no etcd endpoints: no liveness lease, no self-fencing")
        self._spawn(self._follow(), "follow")
        self._spawn(self._driver_events(), "driver events")
        if cfg.supervise:
            supervisor = Supervisor(cfg.supervise, self.api, on_recovered=self._recovered)
            self._spawn(supervisor.run(), "supervisor")
        if self.notifier.watchdog_interval_s:
            self._spawn(self._sd_watchdog(self.notifier.watchdog_interval_s), "sd watchdog")
        try:
            await self._loop()
        finally:
            await self._shutdown()

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.keeper is not None:
            await self.keeper.close()
        self.watchdog.stop()
        await self.api.close()
        with contextlib.suppress(Exception):
            await self.hypervisor.close()
        if self.switch is not None:
            with contextlib.suppress(Exception):
                await self.switch.close()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"vim-agent {name}")
        task.add_done_callback(_report_death)
        self._tasks.append(task)

    async def _retry(self, what: str, fn: Any) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                await fn()
                return
            except Exception as exc:
                log.warning("cannot %s yet: %r; retrying in %.1fs", what, exc, delay)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                delay = min(delay * 2, 5.0)

    async def _register(self) -> None:
        cfg = self.config
        vcpus, ram_mb = cfg.vcpus, cfg.ram_mb
        if not (vcpus and ram_mb):
            node_vcpus, node_ram = await self.hypervisor.node_capacity()
            vcpus, ram_mb = vcpus or node_vcpus, ram_mb or node_ram
        state = await self.api.register(
            zone=cfg.zone,
            vcpus=vcpus,
            ram_mb=ram_mb,
            disk_gb=cfg.disk_gb,
            management_address=cfg.management_address or cfg.underlay_ip or "127.0.0.1",
            hypervisor_type=hypervisor_type(cfg.libvirt_uri),
        )
        log.info("registered %s (%s, %d vCPUs, %d MiB)", cfg.hostname, state, vcpus, ram_mb)

    # -- the reconcile loop ----------------------------------------------------------------

    async def _loop(self) -> None:
        cfg = self.config
        next_resync = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            desired = self._latest
            if desired is None or now >= next_resync:
                try:
                    desired = await self.api.desired()
                except Exception as exc:
                    log.warning("cannot read the desired state: %r", exc)
                    desired = None
                next_resync = now + cfg.resync_s
            if desired is not None:
                await self._record_fence()
                await self._pass(desired)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, next_resync - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()

    def holding(self, desired: rc.Desired) -> bool:
        """Start nothing: the lease is not proven alive, or fenced and not yet recorded,
        or recorded too recently. (A host that cannot prove it is alive may already be
        declared failed and its servers rebuilt elsewhere.)"""
        if self.keeper is not None and not self.keeper.proven_alive():
            return True
        if self.watchdog.fenced:
            return True
        if self._fence_recorded_at is None:
            return False
        hold_s = self.config.post_fence_hold_s
        if hold_s is None:
            hold_s = 2.0 * self.config.ttl_s
        if time.monotonic() - self._fence_recorded_at < hold_s:
            return True
        self._fence_recorded_at = None  # from now on the snapshot decides (host must be UP)
        return not desired.host_up

    async def _pass(self, desired: rc.Desired) -> None:
        plan = desired.plan
        if plan is not None and not plan.local_ip and self.config.underlay_ip:
            desired = replace(desired, plan=replace(plan, local_ip=self.config.underlay_ip))
        hold = self.holding(desired)
        try:
            result = await self.reconciler.run_once(desired, hold=hold)
        except Exception as exc:  # the drivers may be away; the next pass retries
            log.warning("reconcile pass failed: %r", exc)
            return
        self.passes += 1
        self.last_pass = result
        self._write_status(desired, result, hold)
        if result.changed or result.failed:
            log.info(
                "pass %d: %d actions, %d failed, %d reported%s%s",
                self.passes,
                len(result.actions),
                len(result.failed),
                len(result.reported),
                " (holding: self-fenced)" if hold else "",
                "" if self.switch is not None else " (network plan not applied: --ovs none)",
            )
        if not self.ready.is_set():
            self.ready.set()
            self.notifier.ready(f"serving {len(desired.servers)} servers")

    def _write_status(self, desired: rc.Desired, result: rc.PassResult, hold: bool) -> None:
        path = self.config.status_file
        if path is None or result.after is None:
            return
        after = result.after
        status = {
            "hostname": self.config.hostname,
            "pid": os.getpid(),
            "passes": self.passes,
            "position": desired.position,
            "desired": sorted(s.spec.server_id for s in desired.servers),
            "domains": {d.server_id: d.power.value for d in after.domains},
            "ports": None if after.ports is None else sorted(p.port_id for p in after.ports),
            "holding": hold,
            "fenced": self.watchdog.fenced,
            "fences": self.fences,
            "failed": [reason for _, reason in result.failed],
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(status, sort_keys=True), encoding="utf-8")
        tmp.replace(path)

    async def _record_fence(self) -> None:
        record = self.watchdog.pending()
        if record is None or self.keeper is None or not self.keeper.proven_alive():
            return
        try:
            await self.api.report_self_fence(record)
        except Exception as exc:
            log.warning("cannot record the self-fence yet: %r", exc)
            return
        self.watchdog.acknowledge(record)
        self.fences += 1
        self._fence_recorded_at = time.monotonic()
        self._latest = None  # the next pass reads a snapshot taken after the record
        log.warning("self-fence recorded (%d domains destroyed)", record.domains_destroyed)

    # -- inputs ----------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Follow the watch stream; a stream silent for 3 heartbeats counts as broken
        (a stopped API node keeps the connection open but sends nothing)."""
        delay = 0.1
        silence_s = 3 * self.config.heartbeat_ms / 1000
        while not self._stop.is_set():
            stream = self.api.watch(self.config.heartbeat_ms)
            try:
                while True:
                    async with asyncio.timeout(silence_s):
                        desired = await anext(stream)
                    delay = 0.1
                    if self._latest is None or desired != self._latest:
                        self._latest = desired
                        self._wake.set()
            except Exception as exc:  # StopAsyncIteration and TimeoutError included
                log.debug("desired-state stream broke: %r", exc)
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()
            self._latest = None  # unknown until the stream (or a resync) says again
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _driver_events(self) -> None:
        while not self._stop.is_set():
            try:
                async for event in self.hypervisor.events():
                    await self._on_event(event)
            except Exception as exc:
                log.warning("hypervisor events broke: %r", exc)
            await asyncio.sleep(0.2)

    async def _on_event(self, event: DomainEvent) -> None:
        """Faults are reported at once (`vim.agent.reports`, plus a stop nobody asked
        for); the state follows from the reconcile pass the event triggers."""
        if event.kind is DomainEventKind.CONNECTION_LOST:
            log.warning("hypervisor connection lost; reconnecting")
            await self._retry("reconnect to the hypervisor", self.hypervisor.connect)
        elif not self.watchdog.fenced:
            fault = reports.fault_report(event)
            if fault is None and self._unexpected_stop(event):
                fault = reports.ServerFaultReport(event.server_id, False, event.detail or "stopped")
            if fault is not None:
                await self._report_fault(fault.server_id, fault.watchdog, fault.detail)
        self._wake.set()

    def _unexpected_stop(self, event: DomainEvent) -> bool:
        """A domain stopped while the control plane wants it running, with no task."""
        if event.kind is not DomainEventKind.LIFECYCLE or event.power is not DomainPower.SHUTDOWN:
            return False
        if self._latest is None:
            return False
        for s in self._latest.servers:
            if s.spec.server_id == event.server_id:
                return s.power is DomainPower.RUNNING and not s.task
        return False

    async def _report_fault(self, server_id: str, watchdog: bool, detail: str) -> None:
        try:
            await self.api.report_server_fault(server_id, watchdog, detail)
        except Exception as exc:
            log.warning("cannot report the fault of %s: %r", server_id, exc)

    def _recovered(self, service: str) -> None:
        log.info("%s recovered: reconciling (flows are lost when ovs-vswitchd restarts)", service)
        self._wake.set()

    async def _sd_watchdog(self, interval_s: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)


def _report_death(task: asyncio.Task[None]) -> None:
    """A background task must not end quietly: log how it ended."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("%s died: %r", task.get_name(), exc, exc_info=exc)
    else:
        log.warning("%s ended", task.get_name())


# --- command line -----------------------------------------------------------------------


def supervised(spec: str) -> SupervisedService:
    """A `--supervise` value: JSON {"name", "pidfile", "start": [argv], "probe": [argv]}."""
    try:
        data = json.loads(spec)
        service = SupervisedService(
            name=str(data["name"]),
            pidfile=Path(data["pidfile"]),
            start=tuple(str(x) for x in data["start"]),
            probe=tuple(str(x) for x in data.get("probe", ())),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f'--supervise wants {{"name", "pidfile", "start": [...], "probe": [...]}}: {exc}'
        ) from None
    if not service.start:
        raise ValueError("--supervise: the start command must not be empty")
    return service


def _physical_network(text: str) -> str:
    if not PHYSNET_RE.match(text):
        raise argparse.ArgumentTypeError("1-64 letters, digits, . _ - (as the API accepts)")
    return text


def parse_args(argv: Sequence[str] | None = None) -> tuple[AgentConfig, str]:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="vim-agent", description="Run the compute agent of a host.")
    p.add_argument("--hostname", default=env("VIM_AGENT_HOSTNAME", ""), required=False)
    p.add_argument("--zone", default=env("VIM_AGENT_ZONE", ""))
    p.add_argument(
        "--api",
        default=env("VIM_API_ENDPOINTS", "127.0.0.1:50051"),
        help="comma-separated API endpoints host:port (env VIM_API_ENDPOINTS)",
    )
    p.add_argument("--token-file", type=Path, default=env("VIM_AGENT_TOKEN_FILE"))
    p.add_argument("--tls-ca", type=Path, default=env("VIM_TLS_CA"))
    p.add_argument("--tls-cert", type=Path, default=env("VIM_TLS_CERT"))
    p.add_argument("--tls-key", type=Path, default=env("VIM_TLS_KEY"))
    p.add_argument("--etcd", default=env("VIM_ETCD_ENDPOINTS", ""), help="comma-separated")
    p.add_argument("--libvirt-uri", default=env("VIM_LIBVIRT_URI", "test:///default"))
    p.add_argument("--state-dir", type=Path, default=Path(env("VIM_AGENT_STATE_DIR", "var/agent")))
    p.add_argument("--ovs", default=env("VIM_OVS_DB", "none"), help="'none' or unix:/path/db.sock")
    p.add_argument(
        "--ovs-run-dir", type=Path, default=Path(env("OVS_RUNDIR", "/var/run/openvswitch"))
    )
    p.add_argument("--underlay-device", default=env("VIM_UNDERLAY_DEVICE"))
    p.add_argument("--underlay-ip", default=env("VIM_UNDERLAY_IP", ""))
    p.add_argument(
        "--physical-network",
        type=_physical_network,
        default=env("VIM_PHYSICAL_NETWORK", "physnet1"),
        help="the provider network the underlay device is on: flat and vlan networks of "
        "other physical networks are not bridged to it (their VLAN ids may repeat)",
    )
    p.add_argument("--management-address", default=env("VIM_MANAGEMENT_ADDRESS", ""))
    p.add_argument(
        "--heartbeat-listen",
        default=env("VIM_HEARTBEAT_LISTEN", ""),
        help="answer the fault manager's UDP heartbeats on HOST:PORT, published in the "
        "liveness record (default: the management address, any free port; 'none': the "
        "lease only; env VIM_HEARTBEAT_LISTEN)",
    )
    p.add_argument("--ttl", type=int, default=int(env("VIM_LIVENESS_TTL", str(DEFAULT_TTL_S))))
    p.add_argument("--resync", type=float, default=10.0, help="full resync period, seconds")
    p.add_argument("--vcpus", type=int, default=0, help="override libvirt's node info")
    p.add_argument("--ram-mb", type=int, default=0, help="override libvirt's node info")
    p.add_argument("--disk-gb", type=int, default=100)
    p.add_argument("--image-dir", type=Path, default=env("VIM_IMAGE_DIR"))
    p.add_argument("--post-fence-hold", type=float, default=None)
    p.add_argument(
        "--supervise",
        action="append",
        default=[],
        help='JSON {"name": "ovs-vswitchd", "pidfile": P, "start": [argv], "probe": [argv]} '
        "(repeatable)",
    )
    p.add_argument("--status-file", type=Path, default=env("VIM_AGENT_STATUS_FILE"))
    p.add_argument("--log-level", default=env("VIM_LOG_LEVEL", "INFO"))
    telemetry.add_metrics_arguments(p)
    a = p.parse_args(argv)
    listen = telemetry.metrics_listen(p, a.metrics_listen)
    if not a.hostname:
        p.error("--hostname is required (or VIM_AGENT_HOSTNAME)")
    token = env("VIM_AGENT_TOKEN", "")
    if a.token_file:
        token = Path(a.token_file).read_text(encoding="utf-8").strip()
    if not token:
        p.error("an agent token is required (--token-file or VIM_AGENT_TOKEN)")
    if a.ttl < 1 or a.resync <= 0:
        p.error("--ttl must be >= 1 and --resync > 0")
    try:
        services = tuple(supervised(s) for s in a.supervise)
    except ValueError as exc:
        p.error(str(exc))
    try:
        heartbeat_listen = heartbeat.listen_address(a.heartbeat_listen, a.management_address)
    except ValueError as exc:
        p.error(f"--heartbeat-listen: {exc}")
    config = AgentConfig(
        hostname=a.hostname,
        api_endpoints=tuple(x for x in a.api.split(",") if x),
        token=token,
        zone=a.zone,
        tls_ca=a.tls_ca,
        tls_cert=a.tls_cert,
        tls_key=a.tls_key,
        etcd_endpoints=tuple(x for x in a.etcd.split(",") if x),
        libvirt_uri=a.libvirt_uri,
        state_dir=a.state_dir,
        ovs=a.ovs,
        ovs_run_dir=a.ovs_run_dir,
        underlay_device=a.underlay_device,
        physical_network=a.physical_network,
        underlay_ip=a.underlay_ip,
        management_address=a.management_address,
        ttl_s=a.ttl,
        resync_s=a.resync,
        vcpus=a.vcpus,
        ram_mb=a.ram_mb,
        disk_gb=a.disk_gb,
        image_dir=a.image_dir,
        post_fence_hold_s=a.post_fence_hold,
        supervise=services,
        status_file=a.status_file,
        metrics_listen=listen,
        metrics_port_file=a.metrics_port_file,
        heartbeat_listen=heartbeat_listen,
    )
    return config, a.log_level


def build(config: AgentConfig, metrics: observe.AgentMetrics | None = None) -> Agent:
    """The agent with its real drivers; its reconciler logs each server action under
    the server's correlation id and, with `metrics`, counts (`vim.agent.observe`)."""
    from vim.agent.libvirt_driver import LibvirtDriver

    config.state_dir.mkdir(parents=True, exist_ok=True)
    hv = LibvirtDriver(config.libvirt_uri, config.state_dir)
    switch = None
    if config.ovs != "none":
        switch = _ovs_driver(config)
    fence = make_fence(config.libvirt_uri, hv)
    agent = Agent(config, hv, switch, fence=fence)
    agent.reconciler = observe.ObservedReconciler(hv, switch, agent.api, metrics)
    if metrics is not None:
        agent.watchdog = observe.CountingWatchdog(config.ttl_s, fence, metrics)
        metrics.watch(agent)
        metrics.service.leading(True)
    return agent


def _ovs_driver(config: AgentConfig) -> Any:
    """The OVS adapter (`vim.agent.ovs_driver.OvsDriver`) on the configured database."""
    module = importlib.import_module("vim.agent.ovs_driver")
    return module.OvsDriver(
        config.ovs.removeprefix("unix:"),
        run_dir=config.ovs_run_dir,
        underlay_device=config.underlay_device,
        physical_network=config.physical_network,
    )


async def serve(config: AgentConfig) -> None:
    metrics = observe.AgentMetrics() if config.metrics_listen else None
    endpoint = (
        metrics.service.serve(config.metrics_listen, config.metrics_port_file)
        if metrics is not None and config.metrics_listen
        else None
    )
    try:
        agent = build(config, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(agent.stop()))
        await agent.run()
    finally:
        if endpoint is not None:
            # Blocks for up to the HTTP server's poll interval: keep the loop free.
            await asyncio.to_thread(endpoint.close)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script `vim-agent`."""
    config, level = parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` dumps every thread's stack
    telemetry.configure_logging(level)  # JSON lines; correlation ids from structlog's context
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
