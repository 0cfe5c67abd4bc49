"""What a hypervisor event means for the control plane: pure mappings to the agent's reports.

The agent speaks to the control plane only through the Agents API (an import-linter
contract keeps `vim.domain` out of `vim.agent`), so these are plain values shaped
like its two server reports:

- :class:`ServerFaultReport` -> ``Agents.ReportServerFault`` (kind WATCHDOG or
  CRASHED, detail) -> ``vim.app.agents.server_fault`` -> ``ServerWatchdogFired`` /
  ``ServerCrashed`` on the server's stream;
- :class:`ServerStateReport` -> ``Agents.ReportServerState`` (power, fault reason)
  -> ``vim.app.agents.report_state`` -> ``ServerStateReported`` (when it changed).

| driver event                         | fault report              | state report           |
|--------------------------------------|---------------------------|------------------------|
| WATCHDOG (detail = libvirt's action) | watchdog, detail = action | none (LIFECYCLE follows)|
| LIFECYCLE with power CRASHED         | crash, detail = reason    | CRASHED, reason        |
| LIFECYCLE with another power         | none                      | that power             |
| LIFECYCLE with power None (defined)  | none                      | none                   |
| REBOOT                               | none                      | RUNNING                |
| CONNECTION_LOST                      | none                      | none                   |

CONNECTION_LOST is a host fact (the supervisor reports libvirtd's failure). A stop
the control plane did not ask for (power SHUTDOWN while RUNNING is desired) is also
a crash, but telling it apart needs the desired state, which the reconcile loop has
and these functions do not.
"""

from __future__ import annotations

from dataclasses import dataclass

from vim.agent.drivers import DomainEvent, DomainEventKind, DomainPower

__all__ = ["ServerFaultReport", "ServerStateReport", "fault_report", "state_report"]

MAX_DETAIL = 255
"""The API's limit on a report's detail and fault reason."""


@dataclass(frozen=True, slots=True)
class ServerFaultReport:
    """Arguments of ``ReportServerFault``: a watchdog firing, or else a crash."""

    server_id: str
    watchdog: bool
    detail: str


@dataclass(frozen=True, slots=True)
class ServerStateReport:
    """Arguments of ``ReportServerState``."""

    server_id: str
    power: DomainPower
    fault_reason: str = ""


def fault_report(event: DomainEvent) -> ServerFaultReport | None:
    """The fault ``event`` is evidence of, or None."""
    if not event.server_id:
        return None
    if event.kind == DomainEventKind.WATCHDOG:
        return ServerFaultReport(event.server_id, True, (event.detail or "UNKNOWN")[:MAX_DETAIL])
    if event.kind == DomainEventKind.LIFECYCLE and event.power == DomainPower.CRASHED:
        return ServerFaultReport(event.server_id, False, (event.detail or "crashed")[:MAX_DETAIL])
    return None


def state_report(event: DomainEvent) -> ServerStateReport | None:
    """The observed power state to report after ``event``, or None if it tells none."""
    if not event.server_id:
        return None
    if event.kind == DomainEventKind.REBOOT:
        return ServerStateReport(event.server_id, DomainPower.RUNNING)
    if event.kind == DomainEventKind.LIFECYCLE and event.power is not None:
        reason = event.detail[:MAX_DETAIL] if event.power == DomainPower.CRASHED else ""
        return ServerStateReport(event.server_id, event.power, reason)
    return None
