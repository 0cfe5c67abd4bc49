"""Session fixtures: a real PostgreSQL (and, where asked, etcd) started on free ports.

Every test gets its own database (PostgreSQL) or file (SQLite), so tests never see
each other's events. The servers are torn down at the end of the session.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from vim.eventlog import migrating
from vim.eventlog.sql import SqlEventLog
from vim.eventlog.store import EventLogConfig
from vim.harness.postgres import PostgresServer


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer.start(fsync=False)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def pg_template(pg_server: PostgresServer) -> str:
    """A database migrated once; each test's database is a copy of it (much faster)."""
    name = "tmpl_eventlog"
    pg_server.create_database(name)
    migrating.upgrade(pg_server.sqlalchemy_url(name))
    return name


@pytest.fixture
def pg_url(pg_server: PostgresServer, pg_template: str) -> Iterator[str]:
    """A fresh, empty, migrated database on the session's server, as a SQLAlchemy URL."""
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(pg_template)
            )
        )
    yield pg_server.sqlalchemy_url(name)
    pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgres"])
def log_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An event log URL on each backend; the contract suite runs against both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/eventlog.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def open_log(log_url: str) -> AsyncIterator[Callable[..., object]]:
    """Opens event logs on the test's URL (any number) and closes them afterwards."""
    opened: list[SqlEventLog] = []

    async def _open(config: EventLogConfig | None = None, **kw: object) -> SqlEventLog:
        log = await SqlEventLog.open(log_url, config=config, **kw)  # type: ignore[arg-type]
        opened.append(log)
        return log

    yield _open
    for log in opened:
        await log.close()


@pytest.fixture
async def event_log(open_log: Callable[..., object]) -> SqlEventLog:
    log = await open_log()  # type: ignore[misc]
    assert isinstance(log, SqlEventLog)
    return log
