"""`EmbeddedCluster`: the whole control plane and three simulated hosts in one process.

On one asyncio loop, sharing one SQLite event log (`SqlEventLog`: appends wake
every subscriber in the process at once):

* the API node (`ApiNode`, TLS unless insecure, bearer tokens), on a free port;
* the scheduler (`SchedulerService`), the SDN controller (`SdnService`) and the
  fault manager (`FaultManager`, with the alarm reactor as its companion), each
  campaigning through a `LocalElector` on one shared `LocalElection` (seeded
  with the log's newest fencing token per role), and following one read model
  of their own (`Projector`), apart from the API node's;
* the simulated hosts (`vim.demo.hosts`): each a real agent on its own libvirt
  test node, reaching the API over gRPC with its own agent token, OVS "none";
  their liveness goes to an in-process registry (`LocalLiveness`) that the
  fault manager watches, and the fault manager fences them through the
  simulated BMC.

Start order: log, API node, electors, services, hosts (in parallel, each until
its agent's first pass), then the hosts' BMC endpoints are recorded through the
Hosts API with the admin token (the agents register the hosts themselves,
without one). Stop order is the reverse; `stop()` is idempotent and cleans up
whatever `start()` got to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ha.election import Leadership, LocalElection, LocalElector
from ha.fencing import Drivers
from vim._gen.vim.v1 import hosts_pb2, hosts_pb2_grpc
from vim.alarms import AlarmReactor
from vim.api.server import ApiConfig, ApiNode
from vim.client import VimClient
from vim.demo.files import Setup
from vim.demo.hosts import BMC_SCHEME, HostPlan, PowerOff, SimulatedBmc, SimulatedHost, bmc_endpoint
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import EventLog
from vim.faultd import service as faultd
from vim.faultd.liveness import LocalLiveness
from vim.projections.readmodel import Projector
from vim.scheduler import service as scheduler
from vim.sdn import service as sdn

log = logging.getLogger(__name__)

HOSTS = (
    HostPlan("cmp-01", "az-1", 8, 16384, "127.0.1.1"),
    HostPlan("cmp-02", "az-1", 8, 16384, "127.0.1.2"),
    HostPlan("cmp-03", "az-2", 8, 16384, "127.0.1.3"),
)
AGENT_READY_S = 30.0
STOP_S = 10.0


@dataclass(slots=True)
class _Running:
    """What `start()` got to, for `stop()`."""

    log: EventLog | None = None
    api: ApiNode | None = None
    projector: Projector | None = None
    electors: list[LocalElector] = field(default_factory=list)
    services: list[tuple[Callable[[], Awaitable[None]], asyncio.Task[None]]] = field(
        default_factory=list
    )
    hosts: dict[str, SimulatedHost] = field(default_factory=dict)


class EmbeddedCluster:
    """See the module docstring. `start()`, use, `stop()`."""

    def __init__(
        self, setup: Setup, *, listen: str = "127.0.0.1:0", hosts: tuple[HostPlan, ...] = HOSTS
    ) -> None:
        self.setup = setup
        self.listen = listen
        self.plans = hosts
        self.liveness = LocalLiveness()
        self.election = LocalElection()
        self.hosts: dict[str, SimulatedHost] = {}
        self.bmc = SimulatedBmc(self.hosts)
        self.faultd: faultd.FaultManager | None = None
        self._run = _Running()
        self._stopped = False

    @property
    def api(self) -> ApiNode:
        if self._run.api is None:
            raise RuntimeError("the cluster is not started")
        return self._run.api

    @property
    def address(self) -> str:
        return self.api.address

    def client(self) -> VimClient:
        """An admin client of the cluster's API node (close it after use)."""
        return VimClient([self.address], token=self.setup.token, tls_ca=self.setup.ca)

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        run, setup = self._run, self.setup
        setup.directory.mkdir(parents=True, exist_ok=True)
        run.log = event_log = await SqlEventLog.open(setup.url)
        run.api = ApiNode(
            ApiConfig(
                listen=self.listen,
                eventlog_url=setup.url,
                metrics_listen="127.0.0.1:0",
                auth_secret=setup.secret,
                tls_cert=setup.tls.cert if setup.tls else None,
                tls_key=setup.tls.key if setup.tls else None,
            ),
            log=event_log,
        )
        await run.api.start()
        for role in (scheduler.ROLE, sdn.ROLE, faultd.ROLE):
            self.election.seed(role, await event_log.fencing_token(role))
        run.projector = Projector(event_log)
        await run.projector.catch_up()
        run.projector.start()
        model = run.projector.model

        sched = scheduler.SchedulerService(
            event_log,
            model,
            elector=self._elector(scheduler.ROLE),
            config=scheduler.SchedulerConfig(idle_wait_s=0.5, name="demo-scheduler"),
        )
        self._service("scheduler", sched.run, sched.stop)
        controller = sdn.SdnService(
            event_log,
            model,
            elector=self._elector(sdn.ROLE),
            config=sdn.SdnConfig(idle_wait_s=0.5, name="demo-sdn"),
        )
        self._service("sdn", controller.run, controller.stop)

        def reactor(leadership: Callable[[], Leadership | None]) -> Any:
            return AlarmReactor(event_log, model, leadership)

        self.faultd = manager = faultd.FaultManager(
            event_log,
            model,
            self.liveness,
            elector=self._elector(faultd.ROLE),
            drivers=Drivers({BMC_SCHEME: self.bmc}),
            config=faultd.FaultdConfig(
                unleased_grace_s=None,
                reconcile_interval_s=0.5,
                fence_retry_s=1.0,
                name="demo-faultd",
            ),
            companions=[reactor],
        )
        self._service("faultd", manager.run, manager.stop)

        for plan in self.plans:
            directory = setup.hosts_dir / plan.hostname
            self.hosts[plan.hostname] = run.hosts[plan.hostname] = SimulatedHost(
                plan,
                directory,
                api_endpoint=self.address,
                token=setup.agent_token(plan.hostname),
                tls_ca=setup.ca,
                liveness=self.liveness,
            )
        await asyncio.gather(*(h.start(AGENT_READY_S) for h in self.hosts.values()))
        await self._record_bmcs()

    def _elector(self, role: str) -> LocalElector:
        elector = LocalElector(role, f"demo-{role}", election=self.election)
        self._run.electors.append(elector)
        return elector

    def _service(
        self, name: str, run: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]
    ) -> None:
        task = asyncio.create_task(_logged(name, run), name=f"demo-{name}")
        self._run.services.append((stop, task))

    async def _record_bmcs(self) -> None:
        """Add each host's BMC endpoint to what its agent registered (same spec otherwise)."""
        async with self.client() as vim:
            hosts = vim.stub(hosts_pb2_grpc.HostsStub)
            for name in self.hosts:
                h = await hosts.GetHost(hosts_pb2.GetHostRequest(hostname=name))
                await hosts.RegisterHost(
                    hosts_pb2.RegisterHostRequest(
                        hostname=h.hostname,
                        zone=h.zone,
                        vcpus=h.physical.vcpus,
                        ram_mb=h.physical.ram_mb,
                        disk_gb=h.physical.disk_gb,
                        cpu_allocation_ratio=h.allocation_ratios.cpu,
                        ram_allocation_ratio=h.allocation_ratios.ram,
                        disk_allocation_ratio=h.allocation_ratios.disk,
                        hypervisor_type=h.hypervisor_type,
                        management_address=h.management_address,
                        bmc_endpoint=bmc_endpoint(name),
                        max_instances=h.physical.instances,
                    )
                )

    async def power_off(self, hostname: str) -> PowerOff:
        """Cut a simulated host's power (the failure the tour causes)."""
        return await self.hosts[hostname].power_off()

    async def stop(self) -> None:
        """Stop everything that was started, in reverse order; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        run = self._run
        for stop, _ in run.services:
            with contextlib.suppress(Exception):
                await stop()
        for _, task in run.services:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait({task}, timeout=STOP_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for h in run.hosts.values():  # one at a time: each closes its libvirt connection
            await _bounded(f"stop {h.hostname}", h.stop())
        for elector in run.electors:
            await _bounded("close an elector", elector.close())
        if run.projector is not None:
            await _bounded("stop the projector", run.projector.stop())
        if run.api is not None:
            await _bounded("stop the API node", run.api.stop())
        if run.log is not None:
            await _bounded("close the event log", run.log.close())


async def _bounded(what: str, step: Awaitable[None]) -> None:
    """One shutdown step, within `STOP_S` (then logged and left): stopping never hangs."""
    try:
        async with asyncio.timeout(STOP_S):
            await step
    except TimeoutError:
        log.error("demo: could not %s within %.0f s", what, STOP_S)
    except Exception:
        log.exception("demo: could not %s", what)


async def _logged(name: str, run: Callable[[], Awaitable[None]]) -> None:
    try:
        await run()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("demo %s stopped with an error", name)
        raise
