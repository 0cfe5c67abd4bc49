"""One-dimensional PostgreSQL arrays in binary, for the event log's batch writes.

An append batch goes to PostgreSQL as ~20 arrays (one per column, through
`unnest`). psycopg's generic list dumper finds each list's element type by walking
it and dumps every element through its own dumper: ~75 µs for a batch of three
allocations, on an API node's only core. A list wrapped in one of the types here
is dumped by a dumper that knows the element type: a header and the elements,
packed with `struct`. Only the types the event log writes are here, none may hold
NULL, and each needs the matching cast in the SQL (`%b::text[]` ...).

The binary array format (PostgreSQL's `array_send`): number of dimensions, a
has-NULLs flag, the element type's oid, then per dimension its length and lower
bound (1), then per element its length in bytes and its bytes. An empty array has
no dimensions.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import adapters
from psycopg.adapt import Dumper
from psycopg.pq import Format

TEXT_OID, INT4_OID, INT8_OID, TIMESTAMPTZ_OID = 25, 23, 20, 1184
TEXT_ARRAY_OID, INT4_ARRAY_OID, INT8_ARRAY_OID, TIMESTAMPTZ_ARRAY_OID = 1009, 1007, 1016, 1185

_HEADER = struct.Struct(">iiIii")
_EMPTY = struct.Struct(">iiI")
_LENGTH = struct.Struct(">i")
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class TextArray(list[str]):
    """A `text[]` parameter."""


class Int4Array(list[int]):
    """An `int[]` parameter."""


class Int8Array(list[int]):
    """A `bigint[]` parameter."""


class TimestamptzArray(list[datetime]):
    """A `timestamptz[]` parameter (aware datetimes)."""


def _header(n: int, element_oid: int) -> bytes:
    return _HEADER.pack(1, 0, element_oid, n, 1) if n else _EMPTY.pack(0, 0, element_oid)


def dump_text(values: list[str]) -> bytes:
    parts = [_header(len(values), TEXT_OID)]
    pack = _LENGTH.pack
    for value in values:
        encoded = value.encode()
        parts.append(pack(len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def dump_int4(values: list[int]) -> bytes:
    return _fixed_size(values, INT4_OID, "i", 4)


def dump_int8(values: list[int]) -> bytes:
    return _fixed_size(values, INT8_OID, "q", 8)


def dump_timestamptz(values: list[datetime]) -> bytes:
    """Microseconds since 2000-01-01 UTC; a naive datetime is refused, not guessed."""
    micros = []
    for value in values:
        if value.tzinfo is None:
            raise ValueError(f"timestamptz needs an aware datetime, got {value!r}")
        micros.append((value - _PG_EPOCH) // _MICROSECOND)
    return _fixed_size(micros, TIMESTAMPTZ_OID, "q", 8)


def _fixed_size(values: list[int], element_oid: int, code: str, size: int) -> bytes:
    n = len(values)
    if not n:
        return _header(0, element_oid)
    interleaved = [size] * (2 * n)
    interleaved[1::2] = values
    return _header(n, element_oid) + struct.pack(">" + ("i" + code) * n, *interleaved)


def _dumper(array_oid: int, dump: Callable[[Any], bytes]) -> type[Dumper]:
    """A binary psycopg dumper giving `array_oid` and the bytes of `dump`."""

    class _ArrayDumper(Dumper):
        format = Format.BINARY
        oid = array_oid

        def dump(self, obj: Any) -> bytes:
            return dump(obj)

    return _ArrayDumper


def register() -> None:
    """Make every connection opened from now on dump the wrapped lists this way."""
    adapters.register_dumper(TextArray, _dumper(TEXT_ARRAY_OID, dump_text))
    adapters.register_dumper(Int4Array, _dumper(INT4_ARRAY_OID, dump_int4))
    adapters.register_dumper(Int8Array, _dumper(INT8_ARRAY_OID, dump_int8))
    adapters.register_dumper(TimestamptzArray, _dumper(TIMESTAMPTZ_ARRAY_OID, dump_timestamptz))
