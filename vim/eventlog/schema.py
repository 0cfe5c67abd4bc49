"""The event log's tables, in SQLAlchemy Core; Alembic migrations create them.

- `events`: one row per event, `position` is the global order (gapless, assigned
  under the `log_head` row lock), `(stream_id, version)` is unique.
- `streams`: the current version of every stream, so that a version check is one
  primary-key lookup.
- `log_head`: a single row, the last position; locking it serialises writers.
- `requests`: request ids recorded with the events they produced (idempotency).
- `fencing`: the newest fencing token seen per leader role.

Event data and metadata are stored as canonical JSON text: they are encoded once,
at validation, and read back as written.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

events = sa.Table(
    "events",
    metadata,
    sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("stream_id", sa.String(192), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(100), nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
)

streams = sa.Table(
    "streams",
    metadata,
    sa.Column("stream_id", sa.String(192), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
)

log_head = sa.Table(
    "log_head",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("position", sa.BigInteger, nullable=False),
)

requests = sa.Table(
    "requests",
    metadata,
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("result", sa.Text, nullable=False),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

fencing = sa.Table(
    "fencing",
    metadata,
    sa.Column("role", sa.String(64), primary_key=True),
    sa.Column("token", sa.BigInteger, nullable=False),
)
