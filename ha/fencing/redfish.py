"""Redfish fencing: `ComputerSystem.Reset` with `ForceOff`, then poll `PowerState` until Off.

The host's OOB endpoint is a URL:

* `redfish+https://bmc.example:443/redfish/v1/Systems/<id>` (`redfish://` means https),
* `redfish+http://127.0.0.1:8000/<id>` (a bare system id as the path), or
* `redfish+https://bmc.example` (no path: the BMC's only system).

Per call the driver:

1. reads the system (`GET /redfish/v1/Systems/<id>`); already `Off` confirms at once,
   so a repeated fence is harmless;
2. posts `{"ResetType": "ForceOff"}` to the system's reset action (the target
   the system advertises, else the standard path); 200, 202 and 204 are accepted;
3. polls `PowerState` every `poll_interval_s` until it reads `Off`, within
   `deadline_s` of the start. Many BMCs apply power changes asynchronously,
   so an accepted reset alone confirms nothing.

HTTP basic authentication and TLS verification (on by default; a CA file may be
given) come from the target's `Credentials`. Redirects are followed (some BMCs
redirect system names to ids). Every request is bounded by `request_timeout_s`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from ha.fencing.base import FenceResult, FenceTarget, FencingUnsupported, PowerState

SCHEMES = {"redfish": "https", "redfish+https": "https", "redfish+http": "http"}
SYSTEMS = "/redfish/v1/Systems"
RESET_TYPE = "ForceOff"


@dataclass(frozen=True, slots=True)
class RedfishConfig:
    request_timeout_s: float = 3.0
    deadline_s: float = 30.0
    poll_interval_s: float = 0.2


@dataclass(frozen=True, slots=True)
class _Where:
    base: str
    """scheme://host:port"""
    system_path: str
    """/redfish/v1/Systems/<id>, or "" when the BMC's only system is meant."""


def parse_endpoint(endpoint: str) -> _Where:
    """Split a `redfish[+http|+https]://` URL into the HTTP base and the system's path."""
    url = urlsplit(endpoint)
    scheme = SCHEMES.get(url.scheme)
    if scheme is None or not url.hostname:
        raise FencingUnsupported(f"not a Redfish endpoint: {endpoint!r}")
    base = f"{scheme}://{url.netloc}"
    path = url.path.rstrip("/")
    if not path:
        return _Where(base, "")
    if path.startswith(SYSTEMS + "/"):
        return _Where(base, path)
    return _Where(base, f"{SYSTEMS}/{path.lstrip('/')}")


class RedfishError(Exception):
    """A Redfish exchange that did not give a usable answer (status, body, transport)."""


class RedfishDriver:
    """Fences through a Redfish BMC over HTTP(S). See the module docstring."""

    method = "redfish"

    def __init__(self, config: RedfishConfig | None = None) -> None:
        self.config = config or RedfishConfig()

    def _client(self, target: FenceTarget) -> httpx.AsyncClient:
        c = target.credentials
        verify: bool | ssl.SSLContext = c.verify_tls
        if c.ca_file:
            verify = ssl.create_default_context(cafile=c.ca_file)
        auth = httpx.BasicAuth(c.username, c.password) if c.username else None
        return httpx.AsyncClient(
            auth=auth,
            verify=verify,
            timeout=self.config.request_timeout_s,
            follow_redirects=True,
            headers={"Accept": "application/json", "OData-Version": "4.0"},
        )

    async def _get(self, client: httpx.AsyncClient, url: str) -> dict[str, Any]:
        try:
            r = await client.get(url)
        except httpx.HTTPError as exc:
            raise RedfishError(f"GET {url}: {type(exc).__name__}: {exc}") from exc
        if r.status_code != 200:
            raise RedfishError(f"GET {url}: HTTP {r.status_code} {r.text[:200]!r}")
        try:
            body = r.json()
        except ValueError as exc:
            raise RedfishError(f"GET {url}: not JSON") from exc
        if not isinstance(body, dict):
            raise RedfishError(f"GET {url}: not a JSON object")
        return body

    async def _system_url(self, client: httpx.AsyncClient, where: _Where) -> str:
        if where.system_path:
            return where.base + where.system_path
        members = (await self._get(client, where.base + SYSTEMS)).get("Members") or []
        if len(members) != 1:
            raise RedfishError(f"{where.base}: {len(members)} systems, name one in the endpoint")
        return where.base + str(members[0]["@odata.id"])

    async def _power(self, client: httpx.AsyncClient, url: str) -> tuple[PowerState, str]:
        """(power state, reset action URL) of the system at `url`."""
        body = await self._get(client, url)
        raw = str(body.get("PowerState", ""))
        state = {"On": PowerState.ON, "Off": PowerState.OFF}.get(raw, PowerState.UNKNOWN)
        if raw in ("PoweringOn", "PoweringOff", "Paused"):
            state = PowerState.ON  # not off yet: still able to run guests
        action = (body.get("Actions") or {}).get("#ComputerSystem.Reset") or {}
        target = action.get("target") or urlsplit(url).path + "/Actions/ComputerSystem.Reset"
        base = "{0.scheme}://{0.netloc}".format(urlsplit(url))
        return state, base + str(target)

    async def answers(self, target: FenceTarget) -> bool:
        """True if the BMC answers the service root or the system with any HTTP response."""
        where = parse_endpoint(target.endpoint)
        async with self._client(target) as client:
            try:
                await client.get(where.base + "/redfish/v1/")
            except httpx.HTTPError:
                return False
        return True

    async def status(self, target: FenceTarget) -> PowerState:
        where = parse_endpoint(target.endpoint)
        async with self._client(target) as client:
            try:
                url = await self._system_url(client, where)
                state, _ = await self._power(client, url)
            except RedfishError:
                return PowerState.UNKNOWN
        return state

    async def power_off(self, target: FenceTarget) -> FenceResult:
        where = parse_endpoint(target.endpoint)
        deadline = time.monotonic() + self.config.deadline_s
        async with self._client(target) as client:
            try:
                return await self._power_off(client, where, deadline)
            except RedfishError as exc:
                return FenceResult(False, self.method, reason=str(exc))

    async def _power_off(
        self, client: httpx.AsyncClient, where: _Where, deadline: float
    ) -> FenceResult:
        url = await self._system_url(client, where)
        state, action = await self._power(client, url)
        if state is PowerState.OFF:
            return FenceResult(True, self.method, f"{url} was already Off")
        try:
            r = await client.post(action, json={"ResetType": RESET_TYPE})
        except httpx.HTTPError as exc:
            raise RedfishError(f"POST {action}: {type(exc).__name__}: {exc}") from exc
        if r.status_code not in (200, 202, 204):
            raise RedfishError(f"POST {action}: HTTP {r.status_code} {r.text[:200]!r}")
        polls = 0
        while True:
            polls += 1
            state, _ = await self._power(client, url)
            if state is PowerState.OFF:
                return FenceResult(True, self.method, f"{url} ForceOff, Off after {polls} polls")
            if time.monotonic() + self.config.poll_interval_s > deadline:
                return FenceResult(
                    False,
                    self.method,
                    reason=f"{url} still {state.value} {self.config.deadline_s}s after ForceOff",
                )
            await asyncio.sleep(self.config.poll_interval_s)
