"""Quota enforcement and reservations for the services that allocate.

The compute and network services do not append quota events themselves: inside
their own `decide(model)` they ask `plan_consume` (or `plan_release`) for a
`Change` on `quota-<tenant>` and put it in the same `Decision` as their own
events. The append is atomic over every stream it names, and the quota change
carries the version its check was made against, so:

- an allocation and its quota charge are recorded together or not at all;
- two allocations that both fit alone but not together cannot both pass: the
  second append fails with a version conflict, `CommandRunner` waits for the
  newer quota state and decides again, and this time `QuotaExceeded` is raised.

Both raise `quota.QuotaExceeded` (FAILED_PRECONDITION at the API) or, for a
release of more than is used, `InvalidTransition`.

`active_reservations` is what the scheduler honours: the reservations that hold
capacity at `now` (see `vim.domain.reservation` for how status is computed).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from vim.app.commands import Change
from vim.domain import quota, reservation
from vim.projections.readmodel import ReadModel, register_kind

register_kind(quota.KIND, quota.evolve)
register_kind(reservation.KIND, reservation.evolve)


def quota_of(model: ReadModel, tenant: str) -> quota.Quota | None:
    """The tenant's quota state (limits may be unset), or None if it has no stream yet."""
    entry = model.get(quota.stream(tenant))
    if entry is None:
        return None
    state: quota.Quota = entry.state
    return state


def plan_consume(model: ReadModel, tenant: str, amounts: Mapping[str, int], reason: str) -> Change:
    """Charge `amounts` (resource -> count) to the tenant, or raise QuotaExceeded."""
    sid = quota.stream(tenant)
    event = quota.consume(quota_of(model, tenant), tenant, amounts, reason)
    return Change(sid, model.version(sid), [event])


def plan_release(model: ReadModel, tenant: str, amounts: Mapping[str, int], reason: str) -> Change:
    """Give `amounts` back to the tenant's quota (never more than it uses)."""
    sid = quota.stream(tenant)
    event = quota.release(quota_of(model, tenant), tenant, amounts, reason)
    return Change(sid, model.version(sid), [event])


def reservations(model: ReadModel) -> list[reservation.Reservation]:
    """Every reservation ever made, by start time then id."""
    found = [e.state for _, e in model.of_kind(reservation.KIND)]
    return sorted(found, key=lambda r: (r.start_time, r.reservation_id))


def active_reservations(model: ReadModel, now: datetime) -> list[reservation.Reservation]:
    """Reservations holding capacity at `now` (status RESERVED), by start time.

    Their window may not have begun yet (`Reservation.started(now)`); a
    scheduler placing a long-lived server keeps their capacity aside either way.
    """
    return [r for r in reservations(model) if r.status(now) == reservation.RESERVED]
