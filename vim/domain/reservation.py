"""Compute resource reservations (IFA005 "compute resource reservation").

A reservation holds vCPUs, memory and a number of servers for one tenant, in an
optional zone, from `start_time` to `end_time`. Stream: `reservation-<id>`.

Its status is not stored but computed from the times and a `now` passed in, so
nothing has to run at the end of a reservation for it to end:

- TERMINATED once `ReservationTerminated` is recorded (whatever the time);
- EXPIRED from `expiry_time` on (at most `end_time`; `end_time` when not given).
  IFA005's expiry is "released if not used by then"; usage is not tracked yet,
  so today a reservation simply ends at its expiry;
- RESERVED otherwise: the scheduler keeps the capacity aside (it compares
  `start_time` itself to know whether the window has begun).

Times are RFC 3339 UTC strings in events and state (JSON values); decisions take
parsed datetimes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from vim.domain.base import DomainEvent
from vim.errors import FieldViolation, InvalidInput, InvalidTransition, NotFound

KIND = "reservation"
RESERVED = "RESERVED"
TERMINATED = "TERMINATED"
EXPIRED = "EXPIRED"
STATUSES = (RESERVED, TERMINATED, EXPIRED)


def stream(reservation_id: str) -> str:
    return f"{KIND}-{reservation_id}"


def rfc3339(t: datetime) -> str:
    """UTC, milliseconds, `Z`: the one spelling of times in events and views."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


@dataclass(frozen=True, slots=True)
class ReservationCreated(DomainEvent):
    reservation_id: str
    tenant: str
    zone: str
    vcpus: int
    ram_mb: int
    instances: int
    start_time: str
    end_time: str
    expiry_time: str
    created_at: str = ""


@dataclass(frozen=True, slots=True)
class ReservationTerminated(DomainEvent):
    reservation_id: str
    terminated_at: str = ""


@dataclass(frozen=True, slots=True)
class Reservation:
    reservation_id: str
    tenant: str
    zone: str
    vcpus: int
    ram_mb: int
    instances: int
    start_time: str
    end_time: str
    expiry_time: str
    created_at: str
    terminated_at: str = ""

    def status(self, now: datetime) -> str:
        """RESERVED, TERMINATED or EXPIRED at `now` (see the module docstring)."""
        if self.terminated_at:
            return TERMINATED
        if now >= parse_time(self.expiry_time):
            return EXPIRED
        return RESERVED

    def started(self, now: datetime) -> bool:
        """Whether the reserved window has begun at `now`."""
        return now >= parse_time(self.start_time)

    def view(self, now: datetime) -> dict[str, Any]:
        """The proto3 JSON view (the API's `ComputeReservation`) at `now`."""
        return {
            "reservationId": self.reservation_id,
            "tenantId": self.tenant,
            "zone": self.zone,
            "vcpus": self.vcpus,
            "ramMb": str(self.ram_mb),
            "instances": self.instances,
            "startTime": self.start_time,
            "endTime": self.end_time,
            "expiryTime": self.expiry_time,
            "status": f"RESERVATION_STATUS_{self.status(now)}",
            "createdAt": self.created_at,
            "terminatedAt": self.terminated_at,
        }


def evolve(state: Reservation | None, event: DomainEvent, _recorded: object = None) -> Reservation:
    match event:
        case ReservationCreated():
            return Reservation(
                event.reservation_id,
                event.tenant,
                event.zone,
                event.vcpus,
                event.ram_mb,
                event.instances,
                event.start_time,
                event.end_time,
                event.expiry_time,
                event.created_at,
            )
        case ReservationTerminated() if state is not None:
            return replace(state, terminated_at=event.terminated_at)
    if state is None:
        raise InvalidTransition(f"{type(event).__name__} before ReservationCreated")
    return state


@dataclass(frozen=True, slots=True)
class Window:
    """When a reservation holds: start < end, start < expiry <= end, end after now."""

    start: datetime
    end: datetime
    expiry: datetime | None = None

    def violations(self, now: datetime) -> list[FieldViolation]:
        bad: list[FieldViolation] = []
        if self.end <= self.start:
            bad.append(FieldViolation("end_time", "must be after start_time"))
        elif self.end <= now:
            bad.append(FieldViolation("end_time", "must be in the future"))
        if self.expiry is not None and not self.start < self.expiry <= self.end:
            bad.append(
                FieldViolation("expiry_time", "must be after start_time and at most end_time")
            )
        return bad


def create(
    reservation_id: str,
    tenant: str,
    zone: str,
    sizes: tuple[int, int, int],
    window: Window,
    now: datetime,
) -> ReservationCreated:
    """Reserve (vcpus, ram_mb, instances), all positive, over a valid window."""
    bad = window.violations(now)
    for name, value in zip(("vcpus", "ram_mb", "instances"), sizes, strict=True):
        if value <= 0:
            bad.append(FieldViolation(name, f"must be positive, got {value}"))
    if bad:
        raise InvalidInput("invalid reservation: " + "; ".join(v.field for v in bad), bad)
    vcpus, ram_mb, instances = sizes
    expiry = window.expiry or window.end
    return ReservationCreated(
        reservation_id,
        tenant,
        zone,
        vcpus,
        ram_mb,
        instances,
        rfc3339(window.start),
        rfc3339(window.end),
        rfc3339(expiry),
        rfc3339(now),
    )


def terminate(
    state: Reservation | None, reservation_id: str, now: datetime
) -> ReservationTerminated:
    """Release a reservation early; terminating twice is refused."""
    if state is None:
        raise NotFound(f"reservation {reservation_id} not found")
    if state.terminated_at:
        raise InvalidTransition(
            f"reservation {reservation_id} was terminated at {state.terminated_at}"
        )
    return ReservationTerminated(reservation_id, rfc3339(now))
