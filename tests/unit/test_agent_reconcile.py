"""The reconcile loop against fake drivers with the same interface as the real ones.

`FakeHypervisor` and `FakeSwitch` implement `vim.agent.drivers`' Protocols in
memory (idempotent like the real adapters) and count the calls that change
something, so the tests can assert convergence and "nothing more on a second
pass". Other agent tests import them from here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

import pytest

from vim.agent import reconcile as rc
from vim.agent.drivers import (
    DomainEvent,
    DomainPower,
    DomainSpec,
    DomainStatus,
    HypervisorDriver,
    NetworkPlanEntry,
    NicSpec,
    PortBinding,
    SwitchDriver,
    TunnelSpec,
)


class FakeHypervisor:
    """In-memory domains; `calls` lists the mutating calls made."""

    def __init__(self) -> None:
        self.domains: dict[str, tuple[DomainSpec, DomainPower]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_ensure: set[str] = set()
        self.events_queue: asyncio.Queue[DomainEvent] = asyncio.Queue()

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def node_capacity(self) -> tuple[int, int]:
        return 16, 65536

    async def list_domains(self) -> Sequence[DomainStatus]:
        return [DomainStatus(sid, power) for sid, (_, power) in sorted(self.domains.items())]

    async def ensure_domain(self, spec: DomainSpec, power: DomainPower) -> DomainStatus:
        if spec.server_id in self.fail_ensure:
            raise RuntimeError("no such image")
        have = self.domains.get(spec.server_id)
        if have != (spec, power):
            self.calls.append(("ensure", spec.server_id))
            self.domains[spec.server_id] = (spec, power)
        return DomainStatus(spec.server_id, power)

    async def reboot_domain(self, server_id: str) -> None:
        self.calls.append(("reboot", server_id))

    async def remove_domain(self, server_id: str) -> None:
        if self.domains.pop(server_id, None) is not None:
            self.calls.append(("remove", server_id))

    async def destroy_all(self) -> int:
        running = [k for k, (_, p) in self.domains.items() if p is DomainPower.RUNNING]
        for k in running:
            spec, _ = self.domains[k]
            self.domains[k] = (spec, DomainPower.SHUTDOWN)
        return len(running)

    async def events(self) -> AsyncIterator[DomainEvent]:
        while True:
            yield await self.events_queue.get()


class FakeSwitch:
    """In-memory br-int ports, tunnels and flows (flows can be 'lost' like a restart)."""

    def __init__(self) -> None:
        self.ports: dict[str, tuple[PortBinding, str]] = {}
        self.tunnels: tuple[TunnelSpec, ...] = ()
        self.flows: tuple[NetworkPlanEntry, ...] | None = None
        self.bridges: str | None = None
        self.calls: list[tuple[str, str]] = []

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ensure_bridges(self, local_ip: str) -> None:
        if self.bridges != local_ip:
            self.calls.append(("bridges", local_ip))
            self.bridges = local_ip

    async def ensure_port(self, binding: PortBinding, device: str) -> None:
        if self.ports.get(binding.port_id) != (binding, device):
            self.calls.append(("port", binding.port_id))
            self.ports[binding.port_id] = (binding, device)

    async def remove_port(self, port_id: str) -> None:
        if self.ports.pop(port_id, None) is not None:
            self.calls.append(("unport", port_id))

    async def list_ports(self) -> Sequence[PortBinding]:
        return [b for b, _ in self.ports.values()]

    async def ensure_tunnels(self, tunnels: Sequence[TunnelSpec]) -> None:
        if tuple(tunnels) != self.tunnels:
            self.calls.append(("tunnels", ",".join(t.remote_host for t in tunnels)))
            self.tunnels = tuple(tunnels)

    async def ensure_flows(self, networks: Sequence[NetworkPlanEntry]) -> None:
        if tuple(networks) != self.flows:
            self.calls.append(("flows", ",".join(n.network_id for n in networks)))
            self.flows = tuple(networks)


class Reports:
    def __init__(self) -> None:
        self.sent: list[tuple[str, DomainPower, str]] = []
        self.released: list[str] = []
        self.fail_release = False

    async def report_state(self, server_id: str, power: DomainPower, fault_reason: str) -> None:
        self.sent.append((server_id, power, fault_reason))

    async def release_source(self, server_id: str) -> bool:
        if self.fail_release:
            raise ConnectionError("API away")
        self.released.append(server_id)
        return self.released.count(server_id) == 1


def _typed(h: FakeHypervisor, s: FakeSwitch) -> tuple[HypervisorDriver, SwitchDriver]:
    return h, s  # the fakes satisfy the Protocols (mypy checks this line)


S1, S2, S3 = (f"0000000{i}-0000-4000-8000-000000000000" for i in (1, 2, 3))


def spec(sid: str, ram: int = 512) -> DomainSpec:
    nic = NicSpec(f"p{sid[:8]}", "net-a", "fa:16:3e:00:00:01", ("10.0.0.5",))
    return DomainSpec(sid, rc.domain_name(sid), 1, ram, 1, nics=(nic,))


def want(
    sid: str,
    power: DomainPower = DomainPower.RUNNING,
    task: str = "",
    known: rc.ApiState = rc.ApiState.UNKNOWN,
    known_power: DomainPower | None = None,
) -> rc.DesiredServer:
    return rc.DesiredServer(spec(sid), power, task, known, known_power)


def binding(sid: str, tag: int = 1) -> PortBinding:
    return PortBinding(f"p{sid[:8]}", sid, "net-a", "fa:16:3e:00:00:01", tag)


NET = NetworkPlanEntry("net-a", "vxlan", 1001, 1)
TUN = TunnelSpec("cmp-02", "192.0.2.2")


def status(sid: str, power: DomainPower = DomainPower.RUNNING) -> DomainStatus:
    return DomainStatus(sid, power)


def kinds(actions: Sequence[rc.Action]) -> list[str]:
    out = []
    for a in actions:
        sid = getattr(a, "server_id", "") or getattr(getattr(a, "spec", None), "server_id", "")
        pid = getattr(a, "port_id", "") or getattr(getattr(a, "binding", None), "port_id", "")
        out.append(f"{type(a).__name__}:{sid or pid}".rstrip(":"))
    return out


@pytest.mark.parametrize(
    ("desired", "actual", "hold", "expected"),
    [
        pytest.param((want(S1),), (), False, [f"EnsureDomain:{S1}"], id="missing-is-ensured"),
        pytest.param((want(S1),), (status(S1),), False, [], id="converged-does-nothing"),
        pytest.param((), (status(S1),), False, [f"RemoveDomain:{S1}"], id="unwanted-is-removed"),
        pytest.param(
            (want(S1, DomainPower.SHUTDOWN),),
            (status(S1),),
            False,
            [f"EnsureDomain:{S1}"],
            id="power-mismatch",
        ),
        pytest.param(
            (want(S1, task="REBOOTING"),),
            (status(S1),),
            False,
            [f"RebootDomain:{S1}"],
            id="reboot-once",
        ),
        pytest.param(
            (want(S2),),
            (status(S1),),
            False,
            [f"RemoveDomain:{S1}", f"EnsureDomain:{S2}"],
            id="removals-first",
        ),
        pytest.param((want(S1),), (), True, [], id="hold-starts-nothing"),
        pytest.param((want(S1),), (status(S3),), True, [f"RemoveDomain:{S3}"], id="hold-removes"),
    ],
)
def test_plan_domains(
    desired: tuple[rc.DesiredServer, ...],
    actual: tuple[DomainStatus, ...],
    hold: bool,
    expected: list[str],
) -> None:
    got = rc.plan(rc.Desired("cmp-01", desired), rc.Actual(actual), hold=hold)
    assert kinds(got) == expected


def test_plan_reboots_only_once_per_task() -> None:
    d = rc.Desired("cmp-01", (want(S1, task="REBOOTING"),))
    assert kinds(rc.plan(d, rc.Actual((status(S1),)), rebooted=frozenset({S1}))) == []


def test_host_not_up_holds_like_a_fence() -> None:
    d = rc.Desired("cmp-01", (want(S1),), host_up=False)
    assert rc.plan(d, rc.Actual()) == []


def test_plan_switch() -> None:
    plan = rc.NetworkPlan("192.0.2.1", (NET,), (TUN,), (binding(S1),))
    d = rc.Desired("cmp-01", (want(S1),), plan)
    stale = replace(binding(S2), port_id="p-stale")
    got = rc.plan(d, rc.Actual((status(S1),), (binding(S1, tag=7), stale)))
    assert kinds(got) == [
        "RemovePort:p-stale",
        "EnsureBridges",
        f"EnsurePort:{binding(S1).port_id}",
        "EnsureTunnels",
        "EnsureFlows",
    ]
    ensure = next(a for a in got if isinstance(a, rc.EnsurePort))
    assert ensure.binding.vlan_tag == 1
    assert ensure.device == rc.device_name(binding(S1).port_id)
    assert len(ensure.device) <= 15


def test_no_plan_leaves_the_switch_alone_and_no_switch_too() -> None:
    d = rc.Desired("cmp-01", (), None)
    assert rc.plan(d, rc.Actual((), (binding(S1),))) == []
    d2 = rc.Desired("cmp-01", (), rc.NetworkPlan(ports=(binding(S1),)))
    assert rc.plan(d2, rc.Actual((), None)) == []


def test_empty_plan_tears_the_switch_down() -> None:
    d = rc.Desired("cmp-01", (), rc.NetworkPlan())
    got = rc.plan(d, rc.Actual((), (binding(S1),)))
    assert kinds(got)[0] == f"RemovePort:{binding(S1).port_id}"


@pytest.mark.parametrize(
    ("server", "observed", "reason", "hold", "expected"),
    [
        pytest.param(want(S1, task="SPAWNING"), DomainPower.RUNNING, "", False, True, id="spawned"),
        pytest.param(
            want(S1, known=rc.ApiState.ACTIVE, known_power=DomainPower.RUNNING),
            DomainPower.RUNNING,
            "",
            False,
            False,
            id="known-already",
        ),
        pytest.param(
            want(S1, DomainPower.SHUTDOWN, "STOPPING", rc.ApiState.ACTIVE, DomainPower.RUNNING),
            DomainPower.RUNNING,
            "",
            False,
            False,
            id="task-not-done-yet",
        ),
        pytest.param(
            want(S1, known=rc.ApiState.ACTIVE, known_power=DomainPower.RUNNING),
            DomainPower.CRASHED,
            "",
            False,
            True,
            id="changed-by-itself",
        ),
        pytest.param(
            want(S1, task="SPAWNING"), DomainPower.SHUTDOWN, "boom", False, True, id="err"
        ),
        pytest.param(want(S1, task="SPAWNING"), DomainPower.RUNNING, "", True, False, id="held"),
    ],
)
def test_should_report(
    server: rc.DesiredServer, observed: DomainPower, reason: str, hold: bool, expected: bool
) -> None:
    assert rc.should_report(server, observed, reason, hold=hold) is expected


async def test_pass_converges_and_second_pass_is_a_no_op() -> None:
    hv, sw, reports = FakeHypervisor(), FakeSwitch(), Reports()
    r = rc.Reconciler(*_typed(hv, sw), reports)
    plan = rc.NetworkPlan("192.0.2.1", (NET,), (TUN,), (binding(S1), binding(S2)))
    d = rc.Desired(
        "cmp-01", (want(S1, task="SPAWNING"), want(S2, DomainPower.SHUTDOWN, "SPAWNING")), plan
    )
    hv.domains[S3] = (spec(S3), DomainPower.RUNNING)  # left over from a previous life
    first = await r.run_once(d)
    assert not first.failed
    assert set(hv.domains) == {S1, S2}
    assert hv.domains[S1][1] is DomainPower.RUNNING
    assert hv.domains[S2][1] is DomainPower.SHUTDOWN
    assert set(sw.ports) == {binding(S1).port_id, binding(S2).port_id}
    assert sw.tunnels == (TUN,) and sw.flows == (NET,)
    assert sorted(first.reported) == [
        (S1, DomainPower.RUNNING, ""),
        (S2, DomainPower.SHUTDOWN, ""),
    ]
    # The control plane learnt it: a second pass calls nothing that changes anything.
    known = rc.Desired(
        "cmp-01",
        (
            want(S1, known=rc.ApiState.ACTIVE, known_power=DomainPower.RUNNING),
            want(S2, DomainPower.SHUTDOWN, "", rc.ApiState.STOPPED, DomainPower.SHUTDOWN),
        ),
        plan,
    )
    hv.calls.clear()
    sw.calls.clear()
    second = await r.run_once(known)
    assert hv.calls == [] and sw.calls == []
    assert second.reported == [] and not second.changed


async def test_lost_flows_are_reinstalled_every_pass() -> None:
    hv, sw, reports = FakeHypervisor(), FakeSwitch(), Reports()
    r = rc.Reconciler(hv, sw, reports)
    d = rc.Desired("cmp-01", (), rc.NetworkPlan("192.0.2.1", (NET,), (TUN,), ()))
    await r.run_once(d)
    sw.flows = None  # ovs-vswitchd restarted: ports survive, flows do not
    await r.run_once(d)
    assert sw.flows == (NET,)


async def test_a_failed_action_is_reported_and_does_not_stop_the_others() -> None:
    hv, sw, reports = FakeHypervisor(), FakeSwitch(), Reports()
    hv.fail_ensure.add(S1)
    r = rc.Reconciler(hv, sw, reports)
    result = await r.run_once(rc.Desired("cmp-01", (want(S1, task="SPAWNING"), want(S2))))
    assert [type(a).__name__ for a, _ in result.failed] == ["EnsureDomain"]
    assert S2 in hv.domains
    failed = [x for x in reports.sent if x[0] == S1]
    assert failed and "no such image" in failed[0][2]


async def test_reboot_is_done_once_until_the_task_ends() -> None:
    hv, reports = FakeHypervisor(), Reports()
    r = rc.Reconciler(hv, None, reports)
    d = rc.Desired("cmp-01", (want(S1, task="REBOOTING"),))
    await r.run_once(d)
    await r.run_once(d)  # the report has not landed yet: no second reboot
    assert hv.calls.count(("reboot", S1)) == 1
    await r.run_once(rc.Desired("cmp-01", (want(S1),)))
    await r.run_once(d)  # a new REBOOTING task
    assert hv.calls.count(("reboot", S1)) == 2


# --- migrations: a hand-off, never a server on two hosts -----------------------------------

SOURCE, TARGET = rc.MigrationRole.SOURCE, rc.MigrationRole.TARGET


def moving(
    sid: str,
    role: rc.MigrationRole,
    may_start: bool,
    power: DomainPower = DomainPower.RUNNING,
) -> rc.DesiredServer:
    """A server with a migration in progress, as its source or its target sees it."""
    return replace(
        want(sid, power, "MIGRATING", rc.ApiState.ACTIVE, DomainPower.RUNNING),
        migration_role=role,
        may_start=may_start,
    )


@pytest.mark.parametrize(
    ("server", "actual", "expected"),
    [
        pytest.param(moving(S1, SOURCE, False), (status(S1),), [f"RemoveDomain:{S1}"], id="src"),
        pytest.param(moving(S1, SOURCE, False), (), [], id="src-gone"),
        pytest.param(moving(S1, TARGET, False), (), [], id="tgt-holds"),
        pytest.param(
            moving(S1, TARGET, False), (status(S1),), [f"RemoveDomain:{S1}"], id="tgt-stray-copy"
        ),
        pytest.param(moving(S1, TARGET, True), (), [f"EnsureDomain:{S1}"], id="tgt-released"),
        pytest.param(
            moving(S1, TARGET, False, DomainPower.SHUTDOWN), (), [], id="tgt-holds-stopped"
        ),
        pytest.param(moving(S1, TARGET, True), (status(S1),), [], id="tgt-converged"),
    ],
)
def test_plan_migration_both_sides(
    server: rc.DesiredServer, actual: tuple[DomainStatus, ...], expected: list[str]
) -> None:
    assert kinds(rc.plan(rc.Desired("cmp-01", (server,)), rc.Actual(actual))) == expected


@pytest.mark.parametrize(
    ("server", "observed", "report", "release"),
    [
        pytest.param(moving(S1, SOURCE, False), DomainPower.SHUTDOWN, False, True, id="src-gone"),
        pytest.param(moving(S1, SOURCE, False), DomainPower.RUNNING, False, False, id="src-up"),
        pytest.param(
            moving(S1, TARGET, False, DomainPower.SHUTDOWN),
            DomainPower.SHUTDOWN,
            False,
            False,
            id="tgt-before-release-says-nothing",
        ),
        pytest.param(moving(S1, TARGET, True), DomainPower.RUNNING, True, False, id="tgt-landed"),
    ],
)
def test_migration_reports_and_release(
    server: rc.DesiredServer, observed: DomainPower, report: bool, release: bool
) -> None:
    assert rc.should_report(server, observed, "", hold=False) is report
    assert rc.should_report(server, observed, "boom", hold=False) is server.may_start
    assert rc.should_release(server, observed is not DomainPower.SHUTDOWN) is release


async def test_hand_off_never_runs_the_server_on_both_hosts() -> None:
    src_hv, tgt_hv, src_api, tgt_api = FakeHypervisor(), FakeHypervisor(), Reports(), Reports()
    src, tgt = rc.Reconciler(src_hv, None, src_api), rc.Reconciler(tgt_hv, None, tgt_api)
    src_hv.domains[S1] = (spec(S1), DomainPower.RUNNING)

    def running_on() -> set[str]:
        return {
            name
            for name, hv in (("src", src_hv), ("tgt", tgt_hv))
            if hv.domains.get(S1, (None, None))[1] is DomainPower.RUNNING
        }

    # The target learns of the migration first: it holds and says nothing.
    before = await tgt.run_once(rc.Desired("cmp-02", (moving(S1, TARGET, False),)))
    assert before.actions == [] and tgt_api.sent == [] and running_on() == {"src"}
    # The source removes its copy and reports the release in the same pass.
    src_api.fail_release = True  # the API is away: no release said, retried next pass
    away = await src.run_once(rc.Desired("cmp-01", (moving(S1, SOURCE, False),)))
    assert kinds(away.actions) == [f"RemoveDomain:{S1}"] and away.released == []
    assert running_on() == set()
    src_api.fail_release = False
    gone = await src.run_once(rc.Desired("cmp-01", (moving(S1, SOURCE, False),)))
    assert gone.actions == [] and gone.released == [S1] and src_api.sent == []
    again = await src.run_once(rc.Desired("cmp-01", (moving(S1, SOURCE, False),)))
    assert again.released == []  # said once per process (a repeat would record nothing)
    # Released: the target starts it and its report ends the migration.
    landed = await tgt.run_once(rc.Desired("cmp-02", (moving(S1, TARGET, True),)))
    assert kinds(landed.actions) == [f"EnsureDomain:{S1}"]
    assert running_on() == {"tgt"}
    assert tgt_api.sent == [(S1, DomainPower.RUNNING, "")]
    # A restarted source (no memory) may say it again; the API records nothing then.
    fresh = rc.Reconciler(src_hv, None, src_api)
    assert (await fresh.run_once(rc.Desired("cmp-01", (moving(S1, SOURCE, False),)))).released
    assert src_api.released == [S1, S1] and running_on() == {"tgt"}
