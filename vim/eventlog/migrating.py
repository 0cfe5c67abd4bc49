"""Brings an event-log database to the newest schema with Alembic (sync, at start-up)."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

_MIGRATIONS = Path(__file__).with_name("migrations")


def upgrade(sync_url: str) -> None:
    """Run every pending migration; safe to call from several processes at once on PG."""
    engine = sa.create_engine(sync_url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Two nodes starting together must not both create the tables.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7263548190)")
            cfg = Config()
            cfg.set_main_option("script_location", str(_MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()
