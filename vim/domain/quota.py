"""Per-tenant quotas (IFA005/IFA006 "quota"): limits, and what a tenant holds.

Stream: `quota-<tenant>`, one per tenant. It holds two things that live apart:

- the limits, set by an admin (`QuotaSet`, a full set each time) and removed
  (`QuotaDeleted`: the tenant becomes unlimited);
- the usage, moved by the services that allocate (`QuotaConsumed`,
  `QuotaReleased`). Usage is counted whether or not limits are set, and
  survives a deleted quota, so a quota set later starts from the truth.

A limit is an int >= 0 (0: none allowed) or None (unlimited). Invariant: a
`QuotaConsumed` is only decided when, for every resource, used + asked <= limit
on the state it was decided against. Concurrent consumers cannot overshoot
because each decision is appended at the stream version it read: a decision
made on a stale state is refused by the log and made again on the newer one.
Lowering a limit below the usage is allowed: the tenant is then over quota,
can release but not consume.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vim.domain.base import DomainEvent
from vim.errors import AlreadyExists, DomainError, InvalidTransition, NotFound

KIND = "quota"
RESOURCES = ("cores", "ram_mb", "instances", "networks", "ports")
"""Every resource a quota limits, in the order checks (and messages) use."""

Limits = dict[str, int | None]


def stream(tenant: str) -> str:
    return f"{KIND}-{tenant}"


class QuotaExceeded(DomainError):
    """Consuming would take a tenant past one of its limits."""

    def __init__(self, tenant: str, resource: str, limit: int, used: int, asked: int) -> None:
        super().__init__(
            f"quota exceeded for tenant {tenant}: {resource} limit {limit}, "
            f"used {used}, asked {asked} (at most {max(limit - used, 0)} more allowed)"
        )
        self.tenant = tenant
        self.resource = resource
        self.limit = limit
        self.used = used
        self.asked = asked


@dataclass(frozen=True, slots=True)
class QuotaSet(DomainEvent):
    """The tenant's limits are now exactly these (every resource; None is unlimited)."""

    tenant: str
    limits: dict[str, int | None]
    set_at: str = ""


@dataclass(frozen=True, slots=True)
class QuotaDeleted(DomainEvent):
    tenant: str
    deleted_at: str = ""


@dataclass(frozen=True, slots=True)
class QuotaConsumed(DomainEvent):
    """The tenant now holds `amounts` more; `reason` names what for (a resource id)."""

    tenant: str
    amounts: dict[str, int]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QuotaReleased(DomainEvent):
    tenant: str
    amounts: dict[str, int]
    reason: str = ""


def unlimited() -> Limits:
    return dict.fromkeys(RESOURCES)


def nothing() -> dict[str, int]:
    return dict.fromkeys(RESOURCES, 0)


@dataclass(frozen=True, slots=True)
class Quota:
    tenant: str
    limits: Limits = field(default_factory=unlimited)
    used: dict[str, int] = field(default_factory=nothing)
    defined: bool = False
    """True while an admin-set quota exists (between QuotaSet and QuotaDeleted)."""
    updated_at: str = ""

    def headroom(self, resource: str) -> int | None:
        """How much more of `resource` may be consumed (None: unlimited)."""
        limit = self.limits.get(resource)
        return None if limit is None else max(limit - self.used.get(resource, 0), 0)

    def view(self) -> dict[str, Any]:
        """The proto3 JSON view (the API's `Quota`); an unlimited limit is -1."""
        return {
            "tenantId": self.tenant,
            "limits": {
                _camel(r): str(-1 if self.limits.get(r) is None else self.limits[r])
                for r in RESOURCES
            },
            "used": {_camel(r): str(self.used.get(r, 0)) for r in RESOURCES},
            "updatedAt": self.updated_at,
        }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def _moved(used: Mapping[str, int], amounts: Mapping[str, int], sign: int) -> dict[str, int]:
    return {r: max(used.get(r, 0) + sign * amounts.get(r, 0), 0) for r in RESOURCES}


def evolve(state: Quota | None, event: DomainEvent, _recorded: object = None) -> Quota:
    s = state or Quota(getattr(event, "tenant", ""))
    match event:
        case QuotaSet():
            return replace(
                s, limits=unlimited() | event.limits, defined=True, updated_at=event.set_at
            )
        case QuotaDeleted():
            return replace(s, limits=unlimited(), defined=False, updated_at=event.deleted_at)
        case QuotaConsumed():
            return replace(s, used=_moved(s.used, event.amounts, +1))
        case QuotaReleased():
            return replace(s, used=_moved(s.used, event.amounts, -1))
    return s


def _check_limits(limits: Mapping[str, int | None]) -> None:
    for r, v in limits.items():
        if r not in RESOURCES:
            raise ValueError(f"unknown quota resource {r!r}; known: {', '.join(RESOURCES)}")
        if v is not None and v < 0:
            raise ValueError(f"quota limit {r} must be >= 0 or None (unlimited), got {v}")


def _check_amounts(amounts: Mapping[str, int]) -> dict[str, int]:
    _check_limits(amounts)
    return {r: amounts[r] for r in RESOURCES if amounts.get(r)}


def create(
    state: Quota | None, tenant: str, limits: Mapping[str, int | None], now: str
) -> QuotaSet:
    """Set the limits of a tenant that has no quota; absent resources are unlimited."""
    if state is not None and state.defined:
        raise AlreadyExists(f"tenant {tenant} has a quota already; update it instead")
    _check_limits(limits)
    return QuotaSet(tenant, unlimited() | dict(limits), now)


def update(
    state: Quota | None, tenant: str, changes: Mapping[str, int | None], now: str
) -> QuotaSet:
    """Change the limits named in `changes` (None makes one unlimited); others stay."""
    if state is None or not state.defined:
        raise NotFound(f"tenant {tenant} has no quota")
    _check_limits(changes)
    return QuotaSet(tenant, state.limits | dict(changes), now)


def delete(state: Quota | None, tenant: str, now: str) -> QuotaDeleted:
    """Remove a tenant's limits; its usage is kept."""
    if state is None or not state.defined:
        raise NotFound(f"tenant {tenant} has no quota")
    return QuotaDeleted(tenant, now)


def consume(
    state: Quota | None, tenant: str, amounts: Mapping[str, int], reason: str = ""
) -> QuotaConsumed:
    """Take `amounts` (resource -> count >= 0) out of the tenant's quota, or QuotaExceeded."""
    asked = _check_amounts(amounts)
    s = state or Quota(tenant)
    for r, n in asked.items():
        limit = s.limits.get(r)
        if limit is not None and s.used.get(r, 0) + n > limit:
            raise QuotaExceeded(tenant, r, limit, s.used.get(r, 0), n)
    return QuotaConsumed(tenant, asked, reason)


def release(
    state: Quota | None, tenant: str, amounts: Mapping[str, int], reason: str = ""
) -> QuotaReleased:
    """Give `amounts` back; more than is used is a caller's bug, refused."""
    asked = _check_amounts(amounts)
    s = state or Quota(tenant)
    for r, n in asked.items():
        if n > s.used.get(r, 0):
            raise InvalidTransition(
                f"tenant {tenant} cannot release {n} {r}: only {s.used.get(r, 0)} used"
            )
    return QuotaReleased(tenant, asked, reason)
