"""Scheduler weighers: among the hosts that pass every filter, which one first.

One number per host, the *free fraction*: free vCPUs over schedulable vCPUs plus
free RAM over schedulable RAM (0 = full, 2 = empty). SPREAD prefers the largest
(the emptiest host: load evenly, smaller blast radius per host failure); PACK the
smallest (fill hosts up, keep whole hosts free for large flavours or power-off).
Ties go to the lexically smallest hostname, so plans are deterministic.

The planner keeps hosts sorted by this key and walks them best-first, so a
weigher must depend only on the host (not the request).
"""

from __future__ import annotations

import enum

from vim.domain import host


class Strategy(enum.StrEnum):
    SPREAD = "spread"
    PACK = "pack"


def free_fraction(h: host.Host) -> float:
    """Free vCPUs and RAM as fractions of the schedulable totals, summed (0..2)."""
    total, free = h.total, h.free
    cpu = free.vcpus / total.vcpus if total.vcpus > 0 else 0.0
    ram = free.ram_mb / total.ram_mb if total.ram_mb > 0 else 0.0
    return cpu + ram


def sort_key(h: host.Host, strategy: Strategy) -> tuple[float, str]:
    """The index key, best host first when sorted ascending; ties by hostname."""
    fraction = free_fraction(h)
    return (-fraction if strategy is Strategy.SPREAD else fraction, h.hostname)
