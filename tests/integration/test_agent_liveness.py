"""The liveness lease keeper (`ha.liveness`) against a real etcd member."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import aetcd
import pytest

from ha.liveness import (
    LivenessKeeper,
    LivenessRecord,
    hostname_of,
    liveness_key,
    read_liveness,
)
from tests.waiting import until
from vim.harness.etcd import EtcdCluster

pytestmark = pytest.mark.etcd


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster.start(1, base_dir=tmp_path / "etcd")
    try:
        yield cluster
    finally:
        cluster.stop()


def test_key_format() -> None:
    assert liveness_key("cmp-1") == "/vim/hosts/cmp-1/liveness"
    assert hostname_of("/vim/hosts/cmp-1/liveness") == "cmp-1"
    assert hostname_of("/vim/hosts/cmp-1/other") is None
    assert hostname_of("/vim/hosts//liveness") is None
    record = LivenessRecord("cmp-1", 42, "boot", "2026-11-22T08:00:00Z", "10.0.0.1")
    assert LivenessRecord.decode(record.encode()) == record


async def test_keeper_holds_renews_regrants_and_releases(etcd: EtcdCluster) -> None:
    renewals: list[float] = []
    record = LivenessRecord.here("cmp-1", "10.0.0.1")
    keeper = LivenessKeeper(etcd.endpoints, record, ttl_s=2, on_renewed=renewals.append)
    task = asyncio.create_task(keeper.run())
    try:
        await until("the key", lambda: read_liveness(etcd.endpoints, "cmp-1"))
        got = await read_liveness(etcd.endpoints, "cmp-1")
        assert got == record
        # Renewals keep coming, each with a send time taken before the request.
        await until("three renewals", _async(lambda: len(renewals) >= 3))
        assert renewals == sorted(renewals)
        assert keeper.alive.is_set()

        # The lease vanishes behind the keeper's back (as when it expired during a
        # partition): the keeper grants a new one and writes the key again.
        host, port = etcd.endpoints[0].rsplit(":", 1)
        async with aetcd.Client(host=host, port=int(port)) as client:
            kv = await client.get(keeper.key.encode())
            assert kv is not None
            await client.revoke_lease(kv.lease)
        await until("a new lease", _async(lambda: keeper.leases_granted == 2))
        await until("the key again", lambda: read_liveness(etcd.endpoints, "cmp-1"))
    finally:
        await keeper.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await read_liveness(etcd.endpoints, "cmp-1") is None  # a clean stop deletes it


async def test_keeper_survives_etcd_being_away(etcd: EtcdCluster) -> None:
    keeper = LivenessKeeper(etcd.endpoints, LivenessRecord.here("cmp-2"), ttl_s=2)
    task = asyncio.create_task(keeper.run())
    try:
        await until("the key", lambda: read_liveness(etcd.endpoints, "cmp-2"))
        etcd.kill_member(0)
        await until("alive to clear", _async(lambda: not keeper.alive.is_set()), 15)
        assert not task.done()  # etcd being away is not an error of the keeper
        etcd.restart_member(0)
        await until("alive again", _async(keeper.alive.is_set), 20)
        await until("the key", lambda: read_liveness(etcd.endpoints, "cmp-2"))
    finally:
        await keeper.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _async(fn: object) -> object:
    async def check() -> bool:
        return bool(fn())  # type: ignore[operator]

    return check
