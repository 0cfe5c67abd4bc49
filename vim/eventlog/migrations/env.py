"""Alembic environment: always run with a connection handed in by `migrating.upgrade`."""

from __future__ import annotations

from alembic import context

from vim.eventlog import schema

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=schema.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
