"""The event log's binary array dumpers against a real PostgreSQL: what goes in comes
back, element for element, through the casts the event log's statements use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import psycopg
import pytest

from vim.eventlog import pgarrays
from vim.eventlog.pgarrays import Int4Array, Int8Array, TextArray, TimestamptzArray
from vim.harness.postgres import PostgresServer

pytestmark = pytest.mark.postgres

pgarrays.register()

CASES = [
    ("text[]", TextArray, []),
    ("text[]", TextArray, ["server-1"]),
    ("text[]", TextArray, ["", "é ✓ 😀", '{"a": "b\\"c"}', "x" * 100_000, "tab\tnew\nline"]),
    ("int[]", Int4Array, []),
    ("int[]", Int4Array, [0, 1, -1, 2**31 - 1, -(2**31)]),
    ("bigint[]", Int8Array, []),
    ("bigint[]", Int8Array, [0, 7, -7, 2**63 - 1, -(2**63)]),
    ("timestamptz[]", TimestamptzArray, []),
    (
        "timestamptz[]",
        TimestamptzArray,
        [
            datetime(2026, 12, 4, 18, 30, 1, 123456, tzinfo=UTC),
            datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before PostgreSQL's epoch
            datetime(2026, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5))),
        ],
    ),
]


@pytest.mark.parametrize(("cast", "kind", "values"), CASES)
def test_binary_arrays_round_trip(
    pg_server: PostgresServer, cast: str, kind: type[list[object]], values: list[object]
) -> None:
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        row = conn.execute(
            f"SELECT %b::{cast}, cardinality(%b::{cast})", (kind(values), kind(values))
        ).fetchone()
    assert row is not None
    assert row[0] == values
    assert row[1] == len(values)


def test_unnest_gives_the_rows_in_order(pg_server: PostgresServer) -> None:
    """As the event log's inserts read them: one row per index across the columns."""
    at = datetime(2026, 12, 4, tzinfo=UTC)
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT * FROM unnest(%b::bigint[], %b::text[], %b::int[], %b::timestamptz[])",
            (
                Int8Array([3, 1]),
                TextArray(["c", "a"]),
                Int4Array([30, 10]),
                TimestamptzArray([at, at]),
            ),
        ).fetchall()
    assert rows == [(3, "c", 30, at), (1, "a", 10, at)]


def test_a_naive_time_is_refused_not_guessed() -> None:
    with pytest.raises(ValueError, match="aware datetime"):
        pgarrays.dump_timestamptz([datetime(2026, 12, 4)])
