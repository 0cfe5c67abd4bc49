"""The real HypervisorDriver: libvirt (libvirt-python), against `test:///...` nodes or libvirtd.

Role: what the agent's reconcile loop calls to make the host's domains match the log,
and where libvirt's lifecycle, watchdog and reboot events come from.

Invariants:

* Every blocking libvirt call runs on this driver's own single worker thread (one
  connection, calls in order); the asyncio loop never blocks. The exception is
  :meth:`LibvirtDriver.destroy_all` (self-fencing), which must not queue behind a
  slow call: it destroys domains concurrently from short-lived threads (a libvirt
  connection is thread-safe).
* libvirt's events are dispatched by one process-wide thread running
  ``virEventRunDefaultImpl`` (started once, shared by every driver in the process;
  libvirtaio would tie libvirt to one asyncio loop, which tests do not have). The
  callbacks hand events to each subscriber's asyncio loop with ``call_soon_threadsafe``.
* Only domains named ``vim-<server_id>`` are managed; others are never listed,
  changed or reported.
* ``ensure_domain`` is idempotent: it defines a missing domain, redefines a shut-off
  one whose spec hash (in ``<metadata>``) differs, and steps the power state until it
  matches. A domain that is running (or saved) keeps its old definition until it is
  shut off; the status says so in ``reason``.
* Power: PAUSED is ``virDomainSuspend`` (in memory); SUSPENDED is ``managedSave``
  (memory to disk, the domain is shut off with a save image, and start restores it);
  SHUTDOWN is ``destroy`` (a hard power-off: tiny busybox guests ignore ACPI, and the
  agent needs a bounded, certain stop; a graceful shutdown would be a separate
  operation with a timeout); reboot is ``reset`` (hard, for the same reason).
* Errors: a closed or never-opened connection raises
  :class:`~vim.agent.errors.HypervisorUnavailable` (retry after :meth:`connect`);
  libvirt refusing an operation raises :class:`~vim.agent.errors.HypervisorError`;
  a bad spec raises :class:`~vim.agent.errors.InvalidDomainSpec` before any call.
  "Already gone" and "already stopped" are successes where the contract says so.
* A connection that closes (libvirtd killed, keepalive timeout) produces one
  CONNECTION_LOST event; :meth:`connect` opens a new one and re-registers callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import libvirt

from vim.agent.domain_xml import (
    DomainPaths,
    domain_name,
    domain_xml,
    read_metadata,
    server_id_of,
    spec_hash,
    validate,
)
from vim.agent.drivers import (
    DomainEvent,
    DomainEventKind,
    DomainPower,
    DomainSpec,
    DomainStatus,
)
from vim.agent.errors import HypervisorError, HypervisorUnavailable
from vim.errors import FieldViolation, InvalidInput, NotFound, VimError

__all__ = ["LibvirtDriver", "lifecycle_event", "power_of_state"]

T = TypeVar("T")

KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3
"""A daemon that stops answering (SIGSTOP) is declared dead after about 2 s x 3."""
_MAX_POWER_STEPS = 4
_GONE_CODES = frozenset({libvirt.VIR_ERR_NO_DOMAIN})
_CONNECTION_CODES = frozenset({libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN})
"""Plus any error on a connection that is no longer alive (a closed socket says so at
once); not SYSTEM_ERROR as such: a QEMU that cannot open a file raises it too."""


# --- the process-wide libvirt event loop ----------------------------------------------

_loop_lock = threading.Lock()
_loop_threads: list[threading.Thread] = []  # at most one


def _run_event_loop() -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:  # pragma: no cover - libvirt internal error
            threading.Event().wait(0.1)


def _ignore_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


def ensure_event_loop() -> None:
    """Register libvirt's default event implementation and start its thread, once."""
    with _loop_lock:
        if _loop_threads:
            return
        libvirt.registerErrorHandler(_ignore_error, None)
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_event_loop, name="libvirt-events", daemon=True)
        thread.start()
        _loop_threads.append(thread)


# --- pure mappings ----------------------------------------------------------------------


def _names(prefix: str) -> dict[int, str]:
    """libvirt's constant names by value, e.g. {2: "STARTED"} for VIR_DOMAIN_EVENT_."""
    out: dict[int, str] = {}
    for attr in dir(libvirt):
        if attr.startswith(prefix) and attr[len(prefix) :].isupper():
            value = getattr(libvirt, attr)
            if isinstance(value, int) and not attr.endswith("LAST"):
                out.setdefault(value, attr[len(prefix) :])
    return out


_LIFECYCLE = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "DEFINED",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "UNDEFINED",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "STARTED",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "SUSPENDED",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "RESUMED",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "STOPPED",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "SHUTDOWN",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "PMSUSPENDED",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "CRASHED",
}
_DETAILS = {code: _names(f"VIR_DOMAIN_EVENT_{name}_") for code, name in _LIFECYCLE.items()}
_WATCHDOG_ACTIONS = _names("VIR_DOMAIN_EVENT_WATCHDOG_")
_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "NOSTATE",
    libvirt.VIR_DOMAIN_RUNNING: "RUNNING",
    libvirt.VIR_DOMAIN_BLOCKED: "BLOCKED",
    libvirt.VIR_DOMAIN_PAUSED: "PAUSED",
    libvirt.VIR_DOMAIN_SHUTDOWN: "SHUTDOWN",
    libvirt.VIR_DOMAIN_SHUTOFF: "SHUTOFF",
    libvirt.VIR_DOMAIN_CRASHED: "CRASHED",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "PMSUSPENDED",
}
_REASONS = {code: _names(f"VIR_DOMAIN_{name}_") for code, name in _STATE_NAMES.items()}
_REASONS[libvirt.VIR_DOMAIN_SHUTDOWN] = {0: "UNKNOWN", 1: "USER"}  # not the shutdown flags


def lifecycle_event(server_id: str, event: int, detail: int) -> DomainEvent:
    """A libvirt lifecycle callback as a DomainEvent; detail reads ``EVENT:DETAIL``.

    power: STARTED/RESUMED -> RUNNING; SUSPENDED -> PAUSED; STOPPED -> SHUTDOWN, or
    SUSPENDED when the memory was saved, or CRASHED when the emulator crashed or
    failed (killed on the host); SHUTDOWN -> SHUTDOWN; PMSUSPENDED -> SUSPENDED;
    CRASHED -> CRASHED; DEFINED/UNDEFINED -> None (the definition changed, not power).
    """
    name = _LIFECYCLE.get(event, str(event))
    detail_name = _DETAILS.get(event, {}).get(detail, str(detail))
    power: DomainPower | None
    if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
        power = DomainPower.RUNNING
    elif event == libvirt.VIR_DOMAIN_EVENT_SUSPENDED:
        power = DomainPower.PAUSED
    elif event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        power = {
            libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: DomainPower.SUSPENDED,
            libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: DomainPower.CRASHED,
            libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: DomainPower.CRASHED,
        }.get(detail, DomainPower.SHUTDOWN)
    elif event == libvirt.VIR_DOMAIN_EVENT_SHUTDOWN:
        power = DomainPower.SHUTDOWN
    elif event == libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED:
        power = DomainPower.SUSPENDED
    elif event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
        power = DomainPower.CRASHED
    else:
        power = None
    return DomainEvent(DomainEventKind.LIFECYCLE, server_id, power, f"{name}:{detail_name}")


def power_of_state(state: int, reason: int, has_save_image: bool) -> tuple[DomainPower, str]:
    """(power, ``STATE:REASON``) of a domain from ``virDomainGetState`` and its save image."""
    state_name = _STATE_NAMES.get(state, str(state))
    text = f"{state_name}:{_REASONS.get(state, {}).get(reason, str(reason))}"
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_BLOCKED):
        return DomainPower.RUNNING, text
    if state == libvirt.VIR_DOMAIN_SHUTDOWN:  # shutting down, still running
        return DomainPower.RUNNING, text
    if state == libvirt.VIR_DOMAIN_PAUSED:
        return DomainPower.PAUSED, text
    if state == libvirt.VIR_DOMAIN_PMSUSPENDED:
        return DomainPower.SUSPENDED, text
    if state == libvirt.VIR_DOMAIN_CRASHED:
        return DomainPower.CRASHED, text
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        if has_save_image:
            return DomainPower.SUSPENDED, text
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_CRASHED:
            return DomainPower.CRASHED, text
    return DomainPower.SHUTDOWN, text


# --- event subscriptions -----------------------------------------------------------------


class _Subscription:
    """One events() iterator: a queue on the subscriber's loop, fed from libvirt's thread."""

    def __init__(self, driver: LibvirtDriver) -> None:
        self._driver = driver
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[DomainEvent | None] = asyncio.Queue()
        self._done = False

    def push(self, event: DomainEvent | None) -> None:
        """Thread-safe; silently dropped if the subscriber's loop is gone."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    def __aiter__(self) -> _Subscription:
        return self

    async def __anext__(self) -> DomainEvent:
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        if event is None:
            self._done = True
            self._driver._unsubscribe(self)
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        self._done = True
        self._driver._unsubscribe(self)


# --- the driver --------------------------------------------------------------------------


class LibvirtDriver:
    """HypervisorDriver on one libvirt URI; files (overlays, console logs) under state_dir."""

    def __init__(self, uri: str, state_dir: str | os.PathLike[str]) -> None:
        self.uri = uri
        self.state_dir = Path(state_dir)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="libvirt-call")
        self._lock = threading.Lock()
        self._conn: Any = None
        self._generation = 0
        self._callback_ids: list[int] = []
        self._subscribers: set[_Subscription] = set()
        self._closed = False

    # -- paths

    def paths(self, server_id: str) -> DomainPaths:
        """Where the domain's console log and overlay disk live (created on demand)."""
        name = domain_name(server_id)
        return DomainPaths(
            console_log=str(self.state_dir / "console" / f"{name}.log"),
            overlay_disk=str(self.state_dir / "disks" / f"{name}.qcow2"),
        )

    # -- plumbing

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed:
            raise HypervisorUnavailable(f"driver for {self.uri} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._guarded, fn, args)

    def _guarded(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            raise self._translate(e) from e

    def _translate(self, e: libvirt.libvirtError) -> VimError:
        code = int(e.get_error_code() or 0)
        message = str(e.get_error_message() or e)
        if code in _CONNECTION_CODES or not self._alive():
            return HypervisorUnavailable(f"libvirt {self.uri}: {message}")
        if code in _GONE_CODES:
            return NotFound(message)
        return HypervisorError(message, code)

    def _alive(self) -> bool:
        conn = self._conn
        if conn is None:
            return False
        try:
            return bool(conn.isAlive() == 1)
        except libvirt.libvirtError:
            return False

    def _connection(self) -> Any:
        conn = self._conn
        if conn is None:
            raise HypervisorUnavailable(f"not connected to {self.uri} (call connect())")
        return conn

    def _lookup(self, server_id: str) -> Any | None:
        try:
            return self._connection().lookupByName(domain_name(server_id))
        except libvirt.libvirtError as e:
            if e.get_error_code() in _GONE_CODES:
                return None
            raise

    # -- events

    def _publish(self, event: DomainEvent) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            sub.push(event)

    def _unsubscribe(self, sub: _Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def events(self) -> AsyncIterator[DomainEvent]:
        """A new iterator over events from now on (call before acting, to miss nothing).

        It ends when the driver is closed; CONNECTION_LOST does not end it, and events
        of later connections (after :meth:`connect`) arrive on the same iterator.
        """
        sub = _Subscription(self)
        with self._lock:
            if self._closed:
                sub.push(None)
            else:
                self._subscribers.add(sub)
        return sub

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _op: Any) -> None:
        server_id = server_id_of(dom.name())
        if server_id is not None:
            self._publish(lifecycle_event(server_id, event, detail))

    def _on_watchdog(self, _conn: Any, dom: Any, action: int, _op: Any) -> None:
        server_id = server_id_of(dom.name())
        if server_id is not None:
            detail = _WATCHDOG_ACTIONS.get(action, str(action))
            self._publish(DomainEvent(DomainEventKind.WATCHDOG, server_id, None, detail))

    def _on_reboot(self, _conn: Any, dom: Any, _op: Any) -> None:
        server_id = server_id_of(dom.name())
        if server_id is not None:
            self._publish(DomainEvent(DomainEventKind.REBOOT, server_id, DomainPower.RUNNING))

    def _on_close(self, _conn: Any, reason: int, generation: int) -> None:
        with self._lock:
            current = generation == self._generation and not self._closed
        if current and reason != libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:
            names = {
                libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
                libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "eof",
                libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive",
            }
            detail = names.get(reason, str(reason))
            self._publish(DomainEvent(DomainEventKind.CONNECTION_LOST, "", None, detail))

    # -- connection

    async def connect(self) -> None:
        """Open the connection, or reopen it when the old one is dead; no-op when alive."""
        await self._run(self._connect_sync)

    def _connect_sync(self) -> None:
        if self._alive():
            return
        ensure_event_loop()
        self._drop_connection()
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise HypervisorUnavailable(f"cannot connect to {self.uri}: {e}") from e
        with self._lock:
            self._generation += 1
            generation = self._generation
        ids = []
        for event_id, cb in (
            (libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
            (libvirt.VIR_DOMAIN_EVENT_ID_WATCHDOG, self._on_watchdog),
            (libvirt.VIR_DOMAIN_EVENT_ID_REBOOT, self._on_reboot),
        ):
            ids.append(conn.domainEventRegisterAny(None, event_id, cb, None))
        with contextlib.suppress(libvirt.libvirtError):  # test:/// has no keepalive
            conn.setKeepAlive(KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT)
        conn.registerCloseCallback(self._on_close, generation)
        self._conn = conn
        self._callback_ids = ids

    def _drop_connection(self) -> None:
        """Forget the current connection (dead or not), releasing what can be released."""
        conn, self._conn = self._conn, None
        ids, self._callback_ids = self._callback_ids, []
        if conn is None:
            return
        with self._lock:
            self._generation += 1  # a late close callback of the old one is not news
        for cid in ids:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cid)
        with contextlib.suppress(libvirt.libvirtError):
            conn.unregisterCloseCallback()
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    async def close(self) -> None:
        """Close the connection and end every events() iterator; idempotent."""
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._drop_connection)
        with self._lock:
            self._closed = True
            subscribers = list(self._subscribers)
            self._subscribers.clear()
        for sub in subscribers:
            sub.push(None)
        self._executor.shutdown(wait=False)

    # -- queries

    async def node_capacity(self) -> tuple[int, int]:
        """(vCPUs, RAM in MiB) from ``virNodeGetInfo``."""
        info = await self._run(lambda: self._connection().getInfo())
        return int(info[2]), int(info[1])

    async def list_domains(self) -> Sequence[DomainStatus]:
        """Every managed (``vim-``) domain, defined or running, sorted by server id."""
        return await self._run(self._list_sync)

    def _list_sync(self) -> list[DomainStatus]:
        out = []
        for dom in self._connection().listAllDomains(0):
            server_id = server_id_of(dom.name())
            if server_id is None:
                continue
            try:
                out.append(self._status(server_id, dom))
            except libvirt.libvirtError as e:
                if e.get_error_code() not in _GONE_CODES:  # vanished while listing
                    raise
        return sorted(out, key=lambda s: s.server_id)

    async def describe(self, server_id: str) -> str:
        """The domain's current libvirt XML (for diagnostics and tests); NotFound if none."""
        return await self._run(self._describe_sync, server_id)

    def _describe_sync(self, server_id: str) -> str:
        dom = self._lookup(server_id)
        if dom is None:
            raise NotFound(f"domain {domain_name(server_id)} not found")
        return str(dom.XMLDesc(0))

    def _power(self, dom: Any) -> tuple[DomainPower, str]:
        state, reason = dom.state()
        saved = False
        if state == libvirt.VIR_DOMAIN_SHUTOFF:
            saved = bool(dom.hasManagedSaveImage(0))
        return power_of_state(int(state), int(reason), saved)

    def _status(self, server_id: str, dom: Any, note: str = "") -> DomainStatus:
        power, reason = self._power(dom)
        return DomainStatus(server_id, power, f"{reason}; {note}" if note else reason)

    # -- ensure

    async def ensure_domain(self, spec: DomainSpec, power: DomainPower) -> DomainStatus:
        """Define (or redefine when shut off and changed) and bring to ``power``."""
        validate(spec)
        if power == DomainPower.CRASHED:
            raise InvalidInput(
                "CRASHED is observed, never requested",
                [FieldViolation("power", "one of RUNNING, SHUTDOWN, PAUSED, SUSPENDED")],
            )
        return await self._run(self._ensure_sync, spec, power)

    def _ensure_sync(self, spec: DomainSpec, want: DomainPower) -> DomainStatus:
        dom = self._lookup(spec.server_id)
        note = ""
        if dom is None:
            dom = self._define(spec)
        else:
            stored = read_metadata(dom.XMLDesc(0))
            if stored is None or stored.spec_hash != spec_hash(spec):
                power, _ = self._power(dom)
                if dom.isActive() or power == DomainPower.SUSPENDED:
                    note = "spec changed: redefined once shut off"
                else:
                    dom = self._define(spec)
        for _ in range(_MAX_POWER_STEPS):
            if self._satisfied(dom, want):
                return self._status(spec.server_id, dom, note)
            self._step(dom, want)
        if self._satisfied(dom, want):
            return self._status(spec.server_id, dom, note)
        power, reason = self._power(dom)
        raise HypervisorError(f"{dom.name()} stays {power.value} ({reason}), wanted {want.value}")

    def _define(self, spec: DomainSpec) -> Any:
        paths = self.paths(spec.server_id)
        Path(paths.console_log).parent.mkdir(parents=True, exist_ok=True)
        if spec.image_path:
            _ensure_overlay(Path(spec.image_path), Path(paths.overlay_disk), spec.disk_gb)
        return self._connection().defineXML(domain_xml(spec, paths))

    def _satisfied(self, dom: Any, want: DomainPower) -> bool:
        power, _ = self._power(dom)
        if want == DomainPower.SHUTDOWN:
            return not dom.isActive() and power != DomainPower.SUSPENDED
        return power == want

    def _step(self, dom: Any, want: DomainPower) -> None:
        """One libvirt call that moves ``dom`` closer to ``want``."""
        power, _ = self._power(dom)
        active = bool(dom.isActive())
        if power == DomainPower.CRASHED and active:
            _quiet_destroy(dom)
        elif want == DomainPower.SHUTDOWN:
            if active:
                _quiet_destroy(dom)
            else:
                dom.managedSaveRemove(0)
        elif want == DomainPower.RUNNING:
            if power == DomainPower.PAUSED:
                dom.resume()
            else:
                dom.create()
        elif want == DomainPower.PAUSED:
            if active:
                dom.suspend()
            else:
                _start_paused(dom)
        elif want == DomainPower.SUSPENDED:
            if active:
                dom.managedSave(0)
            else:
                _start_paused(dom)

    # -- other operations

    async def reboot_domain(self, server_id: str) -> None:
        """Hard reset of a running domain (NotFound if undefined, HypervisorError if off)."""
        await self._run(self._reboot_sync, server_id)

    def _reboot_sync(self, server_id: str) -> None:
        dom = self._lookup(server_id)
        if dom is None:
            raise NotFound(f"domain {domain_name(server_id)} not found")
        dom.reset(0)

    async def remove_domain(self, server_id: str) -> None:
        """Destroy, undefine (with its save image), delete overlay and console log."""
        await self._run(self._remove_sync, server_id)

    def _remove_sync(self, server_id: str) -> None:
        dom = self._lookup(server_id)
        if dom is not None:
            _quiet_destroy(dom)
            try:
                dom.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                )
            except libvirt.libvirtError as e:
                if e.get_error_code() not in _GONE_CODES:
                    raise
        paths = self.paths(server_id)
        for path in (paths.overlay_disk, paths.console_log):
            Path(path).unlink(missing_ok=True)

    async def destroy_all(self) -> int:
        """Destroy every running managed domain concurrently; how many were running.

        Does not wait for calls queued on the worker thread. Raises
        HypervisorUnavailable when libvirt cannot be reached (the caller then has to
        stop the emulators some other way).
        """
        if self._closed:
            raise HypervisorUnavailable(f"driver for {self.uri} is closed")
        return await asyncio.to_thread(self._guarded, self._destroy_all_sync, ())

    def _destroy_all_sync(self) -> int:
        active = [
            d
            for d in self._connection().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            if server_id_of(d.name()) is not None
        ]
        if not active:
            return 0
        with ThreadPoolExecutor(max_workers=min(16, len(active))) as pool:
            list(pool.map(_quiet_destroy, active))
        return len(active)


def _quiet_destroy(dom: Any) -> None:
    """Destroy; a domain already off or gone is fine."""
    try:
        dom.destroy()
    except libvirt.libvirtError as e:
        if e.get_error_code() not in (libvirt.VIR_ERR_OPERATION_INVALID, *_GONE_CODES):
            raise


def _start_paused(dom: Any) -> None:
    """Start without running a guest instruction; drivers without the flag start then pause."""
    try:
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as e:
        if e.get_error_code() not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
            raise
        dom.create()
        dom.suspend()


def _ensure_overlay(base: Path, overlay: Path, disk_gb: int) -> None:
    """A qcow2 overlay of ``base`` at ``overlay``, at least ``disk_gb`` GiB; kept if it
    already exists on the same base (the guest's writes live there)."""
    if overlay.exists():
        if _qemu_img_info(overlay).get("backing-filename") == str(base):
            return
        overlay.unlink()
    if not base.is_file():
        raise HypervisorError(f"image {base} not found on this host")
    info = _qemu_img_info(base)
    fmt = str(info.get("format", "raw"))
    size = disk_gb * 1024**3
    args = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", fmt]
    overlay.parent.mkdir(parents=True, exist_ok=True)
    tmp = overlay.with_suffix(".tmp")
    args.append(str(tmp))
    if size > int(info.get("virtual-size", 0)):
        args.append(str(size))
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise HypervisorError(f"qemu-img create failed: {done.stderr.strip()}")
    tmp.replace(overlay)


def _qemu_img_info(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise HypervisorError(f"qemu-img info {path} failed: {done.stderr.strip()}")
    data = json.loads(done.stdout)
    return data if isinstance(data, dict) else {}
