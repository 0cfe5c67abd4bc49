"""Self-fencing: destroy this host's domains when its liveness lease cannot be proven.

The fault manager rebuilds a failed host's servers elsewhere once the host's
liveness key has been gone for its TTL plus a margin. A VM must never run on two
hosts, so an agent that cannot renew its lease must have destroyed its domains
by then, even if its event loop is stuck (a blocking call, a bug, a swap
storm). Hence a `FenceWatchdog` *thread*, independent of asyncio:

* The lease keeper calls `renewed(sent)` after every successful renewal, with
  the monotonic time taken before the request left (`ha.liveness`). The deadline
  is `sent + ttl`: never later than etcd's own expiry of the lease.
* The thread waits on a `threading.Condition` with a timeout computed from the
  deadline (no polling loop): it wakes on every renewal and at the deadline.
  When the deadline passes, it calls `fence()` (a synchronous function given by
  the agent, e.g. `libvirt_destroyer(uri)`: its own libvirt connection, so it
  works while the loop is blocked) and records a `FenceRecord`. While the lease
  stays unproven it fences again every `recheck_s`, so no managed domain survives
  the lapse for long, even one started by a reconcile pass that began just before
  the deadline (the extra count goes into the same record).
* The watchdog arms at the first renewal; before that there is nothing to lose.
  After a fence it stays fenced (`fenced` true) until the agent has recorded the
  fence through the API and calls `acknowledge()`; meanwhile the agent restarts
  no servers (the control plane decides whether they are still placed here).
* `fence()` failing (libvirtd away) is retried every `retry_s` until it works or
  the lease is renewed again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

log = logging.getLogger(__name__)

Fence = Callable[[], int]
"""Destroys every managed domain; returns how many were running."""


def _wall(monotonic_at: float) -> str:
    """An RFC 3339 UTC time for a monotonic instant (approximate, for the record)."""
    at = time.time() - (time.monotonic() - monotonic_at)
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class FenceRecord:
    """One self-fence: when the lease was last proven, when the domains were destroyed."""

    domains_destroyed: int
    lease_lost_at: str
    fenced_at: str
    fenced_monotonic: float


class FenceWatchdog:
    """A daemon thread that fences when no renewal was proven within the TTL."""

    def __init__(
        self, ttl_s: float, fence: Fence, *, retry_s: float = 0.5, recheck_s: float = 0.5
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("the TTL must be positive")
        self.ttl_s = ttl_s
        self._fence = fence
        self._retry_s = retry_s
        self._recheck_s = recheck_s
        self._lapse: float | None = None
        """The deadline whose lapse the current record is about."""
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._record: FenceRecord | None = None
        self._acknowledged = True
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="vim-fence-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def renewed(self, sent: float) -> None:
        """The lease was proven alive by a request sent at monotonic `sent`."""
        with self._cond:
            deadline = sent + self.ttl_s
            if self._deadline is None or deadline > self._deadline:
                self._deadline = deadline
            self._cond.notify_all()

    @property
    def deadline(self) -> float | None:
        with self._cond:
            return self._deadline

    @property
    def fenced(self) -> bool:
        """True from a fence until `acknowledge()`: start no server meanwhile."""
        with self._cond:
            return self._record is not None and not self._acknowledged

    def pending(self) -> FenceRecord | None:
        """The fence not yet acknowledged (to record through the API), if any."""
        with self._cond:
            return None if self._acknowledged else self._record

    def acknowledge(self, record: FenceRecord) -> None:
        """The fence was recorded; the control plane decides what runs here now."""
        with self._cond:
            if self._record is record:
                self._acknowledged = True

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                if self._deadline is None:
                    self._cond.wait()
                    continue
                if now < self._deadline:
                    self._cond.wait(self._deadline - now)
                    continue
                lapsed = self._deadline
                count = self._fence_once()
                if count is None:
                    self._cond.wait(self._retry_s)
                    continue
                self._fenced(lapsed, now, count)
                # Still lapsed: look again soon, so a domain started meanwhile (a pass
                # that began while the lease was still proven) does not survive.
                self._cond.wait(self._recheck_s)

    def _fenced(self, lapsed: float, now: float, count: int) -> None:
        """Record a fence: a new record for a new lapse, else add to this lapse's."""
        record = self._record
        if record is None or self._lapse != lapsed:
            self._record = FenceRecord(count, _wall(lapsed), _wall(time.monotonic()), now)
            self._lapse = lapsed
            self._acknowledged = False
            log.error(
                "self-fenced: liveness lease not renewed within %.1fs; %d domains destroyed",
                self.ttl_s,
                count,
            )
        elif count:
            self._record = replace(record, domains_destroyed=record.domains_destroyed + count)
            self._acknowledged = False
            log.error("self-fence: %d more domains destroyed while still fenced", count)

    def _fence_once(self) -> int | None:
        """Run the fence outside the lock (renewals must not block on it)."""
        self._cond.release()
        try:
            return self._fence()
        except Exception:
            log.exception("self-fence failed; retrying")
            return None
        finally:
            self._cond.acquire()


def libvirt_destroyer(uri: str, prefix: str = "vim-") -> Fence:
    """A fence that opens its own libvirt connection and destroys every `prefix*` domain.

    For `test:///...` URIs a new connection sees another fake node, so the agent
    passes a function over its driver's own connection instead (libvirt
    connections may be used from any thread).
    """

    def fence() -> int:
        import libvirt

        conn = libvirt.open(uri)
        try:
            return destroy_on(conn, prefix)
        finally:
            conn.close()

    return fence


def destroy_on(conn: object, prefix: str = "vim-") -> int:
    """Destroy every running `prefix*` domain on an open libvirt connection; how many."""
    import libvirt

    destroyed = 0
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):  # type: ignore[attr-defined]
        if not dom.name().startswith(prefix):
            continue
        try:
            dom.destroy()
            destroyed += 1
        except libvirt.libvirtError as exc:
            if dom.isActive():
                raise
            log.debug("domain %s was already gone: %s", dom.name(), exc)
    return destroyed
