"""The fencing driver contract: power a host off and prove it, or say why not.

A fencing driver acts on a host's out-of-band (OOB) endpoint, the host's BMC,
which keeps answering when the host's own software (agent, hypervisor) is dead.
The fault manager uses a driver for two things:

* classification: `answers(target)` is True when the OOB endpoint answers at all.
  A host whose lease lapsed but whose BMC answers had a *compute-node* failure
  (its software died); one whose BMC does not answer either had a *hardware*
  failure (power lost, host unreachable).
* fencing: `power_off(target)` returns a `FenceResult` that is `confirmed` only
  once the driver has *observed* the host off (a reset request that was accepted
  is not enough: BMCs apply power changes asynchronously). Recovery starts only
  after a confirmed result, so a VM never runs on two hosts.

Invariants every driver keeps:

* `power_off` is idempotent: powering off a host that is already off confirms.
* every network wait is bounded by the driver's own deadline; a driver never
  hangs the fault manager. Failures are results (`confirmed=False`, `reason`),
  not exceptions, except for a target the driver cannot handle at all
  (`FencingUnsupported`).
* credentials never come from the event log: the target carries a reference
  resolved by the caller (`Credentials`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vim.errors import VimError


class PowerState(enum.StrEnum):
    ON = "ON"
    OFF = "OFF"
    UNKNOWN = "UNKNOWN"


class FencingUnsupported(VimError):
    """The target's OOB endpoint names a scheme no configured driver handles."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a driver logs in with; resolved from a secret file, never from the log."""

    username: str = ""
    password: str = ""
    verify_tls: bool = True
    ca_file: str = ""

    def __repr__(self) -> str:  # never print a password
        return f"Credentials(username={self.username!r}, verify_tls={self.verify_tls})"


@dataclass(frozen=True, slots=True)
class FenceTarget:
    """One host as a driver sees it: its name and its OOB endpoint (a URL)."""

    hostname: str
    endpoint: str
    credentials: Credentials = Credentials()


@dataclass(frozen=True, slots=True)
class FenceResult:
    """The outcome of `power_off`; `confirmed` only when the host was observed off."""

    confirmed: bool
    method: str
    detail: str = ""
    reason: str = ""
    """Why the fence is not confirmed (empty when confirmed)."""


@runtime_checkable
class FencingDriver(Protocol):
    """Powers hosts off through their out-of-band endpoint. See the module docstring."""

    @property
    def method(self) -> str:
        """The name recorded in HostFenceConfirmed/HostFenceFailed (`redfish`, ...)."""
        ...

    async def answers(self, target: FenceTarget) -> bool:
        """True if the OOB endpoint answers at all (whatever the power state)."""
        ...

    async def status(self, target: FenceTarget) -> PowerState:
        """The host's power state as the OOB endpoint reports it; UNKNOWN if it does not."""
        ...

    async def power_off(self, target: FenceTarget) -> FenceResult:
        """Force the host off and wait (bounded) until it is observed off."""
        ...
