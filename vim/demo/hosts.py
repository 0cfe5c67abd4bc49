"""Simulated compute hosts for the embedded demo, and the simulated BMC that fences them.

A `SimulatedHost` is what a compute host is to the control plane: a libvirt
node (its own `test:///ABS/node.xml`, so its domains exist only on it), a real
`vim.agent.service.Agent` that registers the host and reconciles its domains
through the API over gRPC with its own agent token, and a liveness record in
the in-process registry the fault manager watches (`LocalLiveness`, the
embedded stand-in for the etcd lease). The agent runs without a switch (OVS
"none": network plans are read and recorded in the log, not applied).

Powering a host off (`power_off`, what a BMC does, and what the tour does to
cause a failure) takes the whole host away, abruptly and for good: its agent's
tasks are cancelled mid-flight (no clean stop, nothing reported), every domain
on its node is destroyed and the node itself is dropped (the libvirt test node
lives only as long as its connection), and its liveness record is lost. It is
idempotent and serialised by a lock, so the tour and the fault manager may ask
at the same time.

`SimulatedBmc` is the fencing driver (`ha.fencing.FencingDriver`) the demo's
fault manager uses for endpoints `<BMC_SCHEME>://<hostname>`: the BMC always
answers (so a failed demo host is a compute-node failure), and `power_off`
confirms only after it has observed the host OFF.

Invariants: the hypervisor outlives the agent (the agent closing its driver is
a no-op; only power-off closes it), so a crashed agent never takes the domains
with it; OFF is final for a `SimulatedHost` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ha.fencing import FenceResult, FenceTarget, PowerState
from ha.liveness import LivenessRecord
from vim.agent.drivers import DomainPower
from vim.agent.libvirt_driver import LibvirtDriver
from vim.agent.sdnotify import Notifier
from vim.agent.service import Agent, AgentConfig
from vim.api import hosts as hosts_api
from vim.faultd.liveness import LocalLiveness
from vim.harness.testnode import write_test_node

log = logging.getLogger(__name__)

BMC_SCHEME = "sim" if "sim" in hosts_api.BMC_SCHEMES else "netns"
"""The Hosts API accepts only known BMC schemes; until it knows `sim`, the demo hosts
use `netns`, which only this process's fault manager resolves (to `SimulatedBmc`)."""
BMC_METHOD = "sim-bmc"


def bmc_endpoint(hostname: str) -> str:
    return f"{BMC_SCHEME}://{hostname}"


class HostPower(enum.StrEnum):
    ON = "ON"
    OFF = "OFF"


@dataclass(frozen=True, slots=True)
class HostPlan:
    """One simulated host: its name, zone, size and management address."""

    hostname: str
    zone: str
    cpus: int
    memory_mib: int
    address: str


@dataclass(frozen=True, slots=True)
class PowerOff:
    """What powering a host off did."""

    hostname: str
    domains_destroyed: int
    at: float
    """`time.monotonic()` when the host was off."""
    already_off: bool = False


class _HostHypervisor(LibvirtDriver):
    """The host's hypervisor: the agent uses it but does not own it (its `close` is a
    no-op); `power_off` destroys every domain and drops the node."""

    async def close(self) -> None:
        return None

    async def power_off(self) -> int:
        destroyed = 0
        with contextlib.suppress(Exception):
            destroyed = await self.destroy_all()
        await super().close()
        return destroyed


class SimulatedHost:
    """A compute host in this process; see the module docstring."""

    def __init__(
        self,
        plan: HostPlan,
        directory: Path,
        *,
        api_endpoint: str,
        token: str,
        tls_ca: Path | None,
        liveness: LocalLiveness,
    ) -> None:
        self.plan = plan
        self.directory = directory
        self._liveness = liveness
        self.uri = write_test_node(
            directory / "node.xml", cpus=plan.cpus, memory_mib=plan.memory_mib
        )
        self.hypervisor = _HostHypervisor(self.uri, directory / "state")
        self.agent = Agent(
            AgentConfig(
                hostname=plan.hostname,
                api_endpoints=(api_endpoint,),
                token=token,
                zone=plan.zone,
                tls_ca=tls_ca,
                libvirt_uri=self.uri,
                state_dir=directory / "state",
                ovs="none",
                management_address=plan.address,
                resync_s=5.0,
                heartbeat_ms=1000,
                disk_gb=200,
            ),
            self.hypervisor,
            None,
            notifier=Notifier(None),
        )
        self.power = HostPower.ON
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.off: PowerOff | None = None

    @property
    def hostname(self) -> str:
        return self.plan.hostname

    async def start(self, within_s: float) -> None:
        """Run the agent until its first reconcile pass, then hold the host's liveness."""
        self._task = asyncio.create_task(self.agent.run(), name=f"demo-agent-{self.hostname}")
        ready = asyncio.ensure_future(self.agent.ready.wait())
        try:
            done, _ = await asyncio.wait(
                {ready, self._task}, timeout=within_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
        if self._task in done:
            self._task.result()  # raises what stopped it
            raise RuntimeError(f"the agent of {self.hostname} stopped before its first pass")
        if not self.agent.ready.is_set():
            raise TimeoutError(f"the agent of {self.hostname} made no pass in {within_s:.0f} s")
        self._liveness.beat(LivenessRecord.here(self.hostname, self.plan.address))
        self._task.add_done_callback(self._agent_ended)

    def _agent_ended(self, task: asyncio.Task[None]) -> None:
        """An agent that dies by itself takes its liveness with it, as an expired lease."""
        if task is self._task and not task.cancelled():
            log.error("the agent of %s stopped: %r", self.hostname, task.exception())
            self._liveness.lose(self.hostname)

    async def domains(self) -> dict[str, str]:
        """server id -> power of each domain on this host's node ({} when the host is off)."""
        if self.power is HostPower.OFF:
            return {}
        return {d.server_id: d.power.value for d in await self.hypervisor.list_domains()}

    async def running(self) -> set[str]:
        return {sid for sid, p in (await self.domains()).items() if p == DomainPower.RUNNING}

    async def power_off(self) -> PowerOff:
        """Cut the host's power: agent gone, domains destroyed, node dropped, lease lost."""
        async with self._lock:
            if self.off is not None:
                return PowerOff(self.hostname, 0, self.off.at, already_off=True)
            await self._kill_agent()
            destroyed = await self.hypervisor.power_off()
            self.power = HostPower.OFF
            self._liveness.lose(self.hostname)
            self.off = PowerOff(self.hostname, destroyed, time.monotonic())
            log.warning("simulated host %s powered off (%d domains)", self.hostname, destroyed)
            return self.off

    async def _kill_agent(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def stop(self) -> None:
        """Shut down at the end of the demo (not a failure: the liveness stays)."""
        async with self._lock:
            task, self._task = self._task, None
            if task is not None:
                await self.agent.stop()
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5.0):
                        await asyncio.shield(task)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.power is HostPower.ON:
                with contextlib.suppress(Exception):
                    await LibvirtDriver.close(self.hypervisor)


class SimulatedBmc:
    """`ha.fencing.FencingDriver` for the simulated hosts (see the module docstring)."""

    def __init__(self, hosts: Mapping[str, SimulatedHost]) -> None:
        self._hosts = hosts
        self.power_offs: list[str] = []
        """Hosts this BMC was asked to power off, in order."""

    @property
    def method(self) -> str:
        return BMC_METHOD

    def _host(self, target: FenceTarget) -> SimulatedHost | None:
        url = urlsplit(target.endpoint)
        if url.scheme != BMC_SCHEME or url.hostname != target.hostname:
            return None
        return self._hosts.get(target.hostname)

    async def answers(self, target: FenceTarget) -> bool:
        return self._host(target) is not None

    async def status(self, target: FenceTarget) -> PowerState:
        found = self._host(target)
        if found is None:
            return PowerState.UNKNOWN
        return PowerState.OFF if found.power is HostPower.OFF else PowerState.ON

    async def power_off(self, target: FenceTarget) -> FenceResult:
        found = self._host(target)
        if found is None:
            return FenceResult(False, BMC_METHOD, reason=f"no simulated host at {target.endpoint}")
        self.power_offs.append(target.hostname)
        done = await found.power_off()
        if await self.status(target) is not PowerState.OFF:
            return FenceResult(False, BMC_METHOD, reason=f"{target.hostname} is still on")
        detail = (
            f"{target.hostname} observed OFF (it was already off)"
            if done.already_off
            else f"{target.hostname} powered off: {done.domains_destroyed} domains destroyed"
        )
        return FenceResult(True, BMC_METHOD, detail=detail)
