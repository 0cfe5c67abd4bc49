"""A streaming standby built by `PostgresServer.start_standby` (pg_basebackup -R):
writes on the primary reach it, it refuses writes, and after `promote()` it takes them.

This is the "PostgreSQL failover" runbook in miniature; the event log's API nodes
are repointed at the promoted server by configuration (docs/DEPLOY.md).
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from vim.harness.ports import wait_until
from vim.harness.postgres import PostgresServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def primary() -> Iterator[PostgresServer]:
    with PostgresServer.start(fsync=False) as server:
        yield server


def _count(server: PostgresServer, dbname: str) -> int:
    with psycopg.connect(server.dsn(dbname), autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*) FROM facts").fetchone()
    return int(row[0]) if row else -1


def test_standby_replicates_refuses_writes_and_takes_over_when_promoted(
    primary: PostgresServer,
) -> None:
    dsn = primary.create_database("app")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE facts (id int PRIMARY KEY, what text NOT NULL)")
        conn.execute("INSERT INTO facts VALUES (1, 'before the backup')")

    with PostgresServer.start_standby(primary) as standby:
        assert standby.port != primary.port
        assert standby.is_standby()
        assert not primary.is_standby()
        assert _count(standby, "app") == 1

        # Streaming: a write made after the base backup reaches the standby.
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO facts VALUES (2, 'streamed')")
        wait_until(lambda: _count(standby, "app") == 2, 15, what="row 2 on the standby")

        with (
            psycopg.connect(standby.dsn("app"), autocommit=True) as conn,
            pytest.raises(psycopg.errors.ReadOnlySqlTransaction),
        ):
            conn.execute("INSERT INTO facts VALUES (3, 'refused')")

        # Failover: the primary dies, the standby is promoted and takes writes.
        primary.kill()
        standby.promote()
        assert not standby.is_standby()
        with psycopg.connect(standby.dsn("app"), autocommit=True) as conn:
            conn.execute("INSERT INTO facts VALUES (3, 'after promotion')")
            rows = conn.execute("SELECT id, what FROM facts ORDER BY id").fetchall()
        assert rows == [(1, "before the backup"), (2, "streamed"), (3, "after promotion")]

    assert not standby.is_running()
    assert not standby.base_dir.exists()
