"""Errors raised by the HA layer (election, and later watchdog and failover).

```
VimError
├─ DomainError
│   └─ NotLeader              leader-only work attempted without a live lease
├─ ElectorClosed              the elector was closed; make a new one
└─ Unavailable                (retryable)
    └─ CoordinatorUnavailable no etcd endpoint answered in time
```

Library errors (aetcd, gRPC, socket timeouts) never cross `ha.election`: they are
turned into `CoordinatorUnavailable` at the boundary. Losing a lease is not an
exception: it is a state change, reported by `Elector.leader_lost` and
`Elector.is_leader()`, because it happens in the background and must be acted on
by whoever runs leader-only work.
"""

from __future__ import annotations

from vim.errors import DomainError, Unavailable, VimError


class NotLeader(DomainError):
    """Leader-only work was attempted by a process that cannot prove its lease alive."""

    def __init__(self, role: str, candidate_id: str) -> None:
        super().__init__(f"{candidate_id} is not the {role} leader")
        self.role = role
        self.candidate_id = candidate_id


class ElectorClosed(VimError):
    """The elector was closed; it cannot campaign or observe any more."""


class CoordinatorUnavailable(Unavailable):
    """No etcd endpoint answered in time; retry later."""
