"""Fencing: power a failed host off (or confirm it fenced itself) before recovering its VMs.

`base` holds the driver contract; `redfish`, `netns` the drivers; `selffence`
the time-based confirmation used when a host has no OOB driver. `Drivers` picks
a driver by the scheme of a host's OOB endpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from ha.fencing.base import (
    Credentials,
    FenceResult,
    FenceTarget,
    FencingDriver,
    FencingUnsupported,
    PowerState,
)

__all__ = [
    "Credentials",
    "Drivers",
    "FenceResult",
    "FenceTarget",
    "FencingDriver",
    "FencingUnsupported",
    "PowerState",
    "default_drivers",
]


class Drivers:
    """Fencing drivers by endpoint scheme (`redfish+https` -> the Redfish driver, ...)."""

    def __init__(self, by_scheme: Mapping[str, FencingDriver]) -> None:
        self._by_scheme = dict(by_scheme)

    def for_endpoint(self, endpoint: str) -> FencingDriver | None:
        """The driver for this OOB endpoint; None when there is no endpoint or no driver."""
        if not endpoint:
            return None
        return self._by_scheme.get(urlsplit(endpoint).scheme)

    @property
    def schemes(self) -> frozenset[str]:
        return frozenset(self._by_scheme)


def default_drivers() -> Drivers:
    """Redfish (https and http) and namespace power; IPMI is not supported (self-fence)."""
    from ha.fencing.netns import SCHEME as NETNS
    from ha.fencing.netns import NetnsPowerDriver
    from ha.fencing.redfish import SCHEMES, RedfishDriver

    redfish = RedfishDriver()
    by_scheme: dict[str, FencingDriver] = dict.fromkeys(SCHEMES, redfish)
    by_scheme[NETNS] = NetnsPowerDriver()
    return Drivers(by_scheme)
