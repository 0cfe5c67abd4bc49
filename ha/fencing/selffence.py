"""Self-fence confirmation: when no OOB driver can power a host off.

The compute agent destroys its own domains when it cannot renew its liveness
lease for longer than the TTL (and records `HostSelfFenced` when it reaches the
control plane again). Nobody can observe that from outside, so the fault
manager confirms a self-fence by *time*: once `lease_lost_at + ttl + margin`
has passed, the agent has either renewed (then the host is alive, not failed)
or has killed its domains. The margin covers clock rate differences and the
agent's own reaction time; it must be larger than the agent's kill latency.

A recorded `HostSelfFenced` newer than the loss confirms earlier.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from ha.fencing.base import FenceResult

METHOD = "self-fence-timeout"


@dataclass(frozen=True, slots=True)
class SelfFencePolicy:
    ttl_s: float = 2.0
    """The agents' liveness lease TTL."""
    margin_s: float = 3.0
    """Added to the TTL: the agent's own deadline, kill latency and clock drift."""

    def due(self, lease_lost_at: datetime) -> datetime:
        """When the host is taken as fenced without an OOB confirmation."""
        return lease_lost_at + timedelta(seconds=self.ttl_s + self.margin_s)

    def confirmed(self, lease_lost_at: datetime, now: datetime, self_fenced: bool) -> bool:
        """Pure decision: confirmed by the agent's own report, or by time."""
        return self_fenced or now >= self.due(lease_lost_at)


class SelfFenceTimeout:
    """Waits until a self-fence is confirmed (by report or by time) and says so."""

    def __init__(
        self,
        policy: SelfFencePolicy,
        *,
        clock: Callable[[], datetime],
        poll_interval_s: float = 0.1,
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._poll_s = poll_interval_s

    async def confirm(
        self, hostname: str, lease_lost_at: datetime, self_fenced: Callable[[], bool]
    ) -> FenceResult:
        """Return once confirmed; the caller bounds the wait by cancelling (never fails)."""
        while True:
            reported = self_fenced()
            now = self._clock()
            if self.policy.confirmed(lease_lost_at, now, reported):
                how = (
                    "the agent reported HostSelfFenced"
                    if reported
                    else f"TTL {self.policy.ttl_s}s + margin {self.policy.margin_s}s passed"
                )
                return FenceResult(True, METHOD, f"{hostname}: {how}")
            remaining = (self.policy.due(lease_lost_at) - now).total_seconds()
            await asyncio.sleep(max(0.0, min(self._poll_s, remaining)))
