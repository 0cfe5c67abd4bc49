"""Waiting for a condition with a deadline: the only way tests here synchronise."""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def until(what: str, check: Any, timeout_s: float = 30.0, every_s: float = 0.02) -> Any:
    """Poll `check` (a callable, sync or async) until it returns something truthy, which
    is returned; AssertionError naming `what` when `timeout_s` passes first."""
    deadline = time.monotonic() + timeout_s
    got: Any = None
    while time.monotonic() < deadline:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(every_s)  # poll interval of a wait with a deadline
    raise AssertionError(f"timed out waiting for {what} (last: {got!r})")


def until_sync(probe: Any, within: float, what: str, every_s: float = 0.1) -> Any:
    """`until` for synchronous tests: poll `probe` until it returns something truthy,
    which is returned; AssertionError naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    last: Any = None
    while not (last := probe()):
        assert time.monotonic() < deadline, f"timed out waiting for {what} (last: {last!r})"
        time.sleep(every_s)  # poll interval of a wait with a deadline
    return last
