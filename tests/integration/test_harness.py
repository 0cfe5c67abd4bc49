"""Integration tests of vim.harness: real PostgreSQL and etcd, started and torn down."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from vim.harness.etcd import EtcdCluster
from vim.harness.ports import HarnessError, free_port, free_ports, is_listening
from vim.harness.postgres import PostgresServer


def _pids_with_cwd(directory: Path) -> list[int]:
    """Live (non-zombie) processes whose cwd is ``directory``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            state = Path(f"/proc/{name}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if cwd == str(directory) and state not in ("Z", "X"):
            found.append(int(name))
    return found


# ---------------------------------------------------------------------- ports
def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(1024 <= p <= 65535 for p in ports)
    assert not is_listening(free_port())


# ------------------------------------------------------------------- postgres
@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with PostgresServer.start(fsync=False) as server:
        yield server
    assert not server.base_dir.exists()


def test_pg_create_database_and_query(pg: PostgresServer) -> None:
    assert pg.is_running()
    assert pg.host == "127.0.0.1"
    dsn = pg.create_database("harness_q")
    assert dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/harness_q"
    assert pg.sqlalchemy_url("x") == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/x"
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.execute("SHOW fsync").fetchone() == ("off",)
    pg.drop_database("harness_q")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=5).close()


@pytest.mark.slow
def test_pg_restart_keeps_data_and_port(pg: PostgresServer) -> None:
    dsn = pg.create_database("harness_r")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (42)")
    port = pg.port
    pg.restart()
    assert pg.port == port
    assert pg.is_running()
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    pg.drop_database("harness_r")


@pytest.mark.slow
def test_pg_kill_frees_port_and_cleanup_removes_dir() -> None:
    server = PostgresServer.start()
    try:
        conn = psycopg.connect(server.dsn())  # a backend that must die too
        assert _pids_with_cwd(server.data_dir)
        server.kill()
        assert not server.is_running()
        assert not is_listening(server.port)
        assert _pids_with_cwd(server.data_dir) == []
        conn.close()
        base = server.base_dir
        assert base.exists()
    finally:
        server.cleanup()
    assert not base.exists()
    server.cleanup()  # idempotent


@pytest.mark.slow
def test_pg_start_failure_reports_log_and_cleans_up() -> None:
    parent = Path(tempfile.mkdtemp(prefix="vim-harness-test-"))
    try:
        parent.chmod(0o755)  # the postgres user must traverse it
        with pytest.raises(HarnessError, match="shared_buffers") as info:
            PostgresServer.start(parent, extra_conf={"shared_buffers": "nonsense"})
        assert "postgres.log" in str(info.value)
        assert list(parent.iterdir()) == []
    finally:
        shutil.rmtree(parent, ignore_errors=True)


# ----------------------------------------------------------------------- etcd
def test_etcd_single_member_is_healthy() -> None:
    with EtcdCluster.start(size=1) as cluster:
        [member] = cluster.members
        assert member.healthy()
        assert cluster.endpoints == [f"127.0.0.1:{member.client_port}"]
        assert cluster.client_urls == [f"http://127.0.0.1:{member.client_port}"]
        assert cluster.leader_index() == 0
        process = member.process
    assert process is not None and process.returncode is not None
    assert not cluster.base_dir.exists()


@pytest.mark.slow
def test_etcd_three_members_leader_failover_and_restart() -> None:
    cluster = EtcdCluster.start(size=3, tuned=True)
    try:
        assert (
            len({m.client_port for m in cluster.members} | {m.peer_port for m in cluster.members})
            == 6
        )
        old = cluster.leader_index()
        assert old is not None
        cluster.kill_member(old)
        assert not cluster.members[old].is_running()

        deadline = time.monotonic() + 10
        new = cluster.leader_index()
        while new in (None, old) and time.monotonic() < deadline:
            time.sleep(0.05)
            new = cluster.leader_index()
        assert new is not None and new != old

        cluster.restart_member(old)
        assert all(m.is_running() and m.healthy() for m in cluster.members)
        assert cluster.leader_index() is not None
    finally:
        processes = [m.process for m in cluster.members]
        cluster.stop()
    for proc in processes:
        assert proc is not None
        assert proc.poll() is not None  # reaped: nothing of ours left running
    assert not cluster.base_dir.exists()
    cluster.stop()  # idempotent
