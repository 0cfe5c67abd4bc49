"""Alembic migrations of the event log schema, run by `vim.eventlog.migrating`."""
