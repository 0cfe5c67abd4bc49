"""Leader election with fencing tokens: etcd in production, in-process when embedded.

One role (``scheduler``, ``fault_manager``, ``sdn``) has at most one leader that
may act. The leader's term carries a *fencing token* that only grows from one
term to the next; the leader sends it with every append, and the event log
refuses (in the append's own transaction) a token older than the newest it has
seen for the role. A leader that was paused and resumes after its lease expired
can therefore not write, whatever it believes. See docs/ELECTION.md.

Modules:

* `ha.election.base`: `Leadership`, `Elector` (the interface), `Clock`, and
  `LeaseElector`, the deadline / keepalive / step-down rules every backend shares;
* `ha.election.etcd`: `EtcdElector` (lease + transaction on the key's create revision);
* `ha.election.endpoints`: one aetcd client per etcd endpoint, rotated on errors;
* `ha.election.deathwatch`: the fast death signal (a liveness endpoint served by
  every candidate, watched by the waiting ones);
* `ha.election.local`: `LocalElection` and `LocalElector` (in-process).
"""

from __future__ import annotations

from ha.election.base import Clock, Elector, Leadership, LeaseElector, SystemClock
from ha.election.etcd import EtcdElector
from ha.election.local import LocalElection, LocalElector

__all__ = [
    "Clock",
    "Elector",
    "EtcdElector",
    "Leadership",
    "LeaseElector",
    "LocalElection",
    "LocalElector",
    "SystemClock",
]
