"""Brings an event-log database to the newest schema with Alembic (sync, at start-up).

Several processes may start on one database at once (API nodes, the scheduler,
the fault manager): they must not all create the tables. On PostgreSQL the
migration runs under a transaction-scoped advisory lock. SQLite runs DDL outside
any transaction here, so there the processes take an exclusive `flock` on a file
beside the database (`<database>.migrate.lock`) for the duration of the upgrade;
whoever comes second finds the schema at head and does nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

_MIGRATIONS = Path(__file__).with_name("migrations")


def upgrade(sync_url: str) -> None:
    """Run every pending migration; safe to call from several processes at once."""
    engine = sa.create_engine(sync_url)
    try:
        with _sqlite_lock(engine.url), engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Two nodes starting together must not both create the tables.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7263548190)")
            cfg = Config()
            cfg.set_main_option("script_location", str(_MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


@contextlib.contextmanager
def _sqlite_lock(url: sa.engine.URL) -> Iterator[None]:
    """An exclusive lock on `<database>.migrate.lock` for a SQLite file; nothing otherwise."""
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        yield
        return
    with open(f"{database}.migrate.lock", "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the other process's upgrade ends
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
