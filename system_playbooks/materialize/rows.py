"""The row builder of ``system/materialize``: stored projections in, segment rows out (Arrow table → Arrow table).

This is the pure core of the plug-in, and it has two implementations that must
agree byte for byte: this one (the Python twin) and ``wasm/rows.c`` (the compiled
one, selected by ``runtime: wasm`` in the manifest). The plug-in's I/O (the
segment write, the pointers) stays in Python around either.

Input (:data:`INPUT`): one row per KV entry — ``key`` (the execution id the entry
is stored under), ``revision`` (its KV revision) and ``projection`` (the canonical
JSON of the projection, null for an entry that is already a pointer). Output
(:data:`OUTPUT`): one row per non-null projection, in input order — ``key``,
``revision``, the :class:`~projector.snapshots.SegmentRow` columns read from the
projection's top-level fields, ``projection`` unchanged, and ``pointer``: whether
the status is terminal, i.e. whether the entry is to be swapped for a pointer.

>>> table = input_table([("7", 3, b'{"event_count":2,"execution_id":"7","last_seq":9,"project":"p",'
...                                b'"status":"COMPLETED","steps":{"a":{"x":[1]}},"tenant":"t"}'), ("8", 1, None)])
>>> [(r["execution_id"], r["status"], r["last_seq"], r["pointer"]) for r in build_rows(table).to_pylist()]
[('7', 'COMPLETED', 9, True)]
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import pyarrow as pa

from kernel.errors import KernelError
from projector.projection import TERMINAL
from projector.snapshots import SCHEMA as SEGMENT_SCHEMA

INPUT = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("revision", pa.int64(), nullable=False),
    pa.field("projection", pa.string()),
])  # fmt: skip
# The segment's columns (projector.snapshots.SCHEMA) in the types the guest SDK has (int64, utf8),
# between the entry's key and revision and the pointer decision.
_SDK_TYPES = {pa.uint64(): pa.int64(), pa.large_string(): pa.string()}
OUTPUT = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("revision", pa.int64(), nullable=False),
    *(pa.field(f.name, _SDK_TYPES.get(f.type, f.type), nullable=False) for f in SEGMENT_SCHEMA),
    pa.field("pointer", pa.bool_(), nullable=False),
])  # fmt: skip


class RowError(KernelError):
    """The row builder refused its input (a wrong schema, or a projection that is not valid JSON of one)."""


class _Head(msgspec.Struct):
    """The top-level fields of a projection a segment row needs; every other field is skipped."""

    execution_id: str
    tenant: str
    project: str
    status: str
    last_seq: int
    event_count: int


_head = msgspec.json.Decoder(_Head)
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def input_table(entries: Iterable[tuple[str, int, bytes | None]]) -> pa.Table:
    """The row builder's input from ``(key, revision, canonical projection or None)`` triples."""
    keys, revisions, projections = [], [], []
    for key, revision, projection in entries:
        keys.append(key)
        revisions.append(revision)
        projections.append(None if projection is None else projection.decode())
    return pa.Table.from_arrays([pa.array(keys, pa.string()), pa.array(revisions, pa.int64()),
                                 pa.array(projections, pa.string())], schema=INPUT)  # fmt: skip


def build_rows(table: pa.Table) -> pa.Table:
    """The Python twin: one output row per non-null projection (see the module docstring)."""
    if not table.schema.equals(INPUT):
        raise RowError(f"row builder input must have the schema {INPUT}, not {table.schema}")
    columns: list[list[object]] = [[] for _ in OUTPUT]
    for key, revision, projection in zip(*(table.column(i).to_pylist() for i in range(3)), strict=True):
        if projection is None:
            continue
        try:
            head = _head.decode(projection)
        except msgspec.DecodeError as e:
            raise RowError(f"projection of {key!r} is not one: {e}") from e
        if not (_I64_MIN <= head.last_seq <= _I64_MAX and _I64_MIN <= head.event_count <= _I64_MAX):
            raise RowError(f"projection of {key!r} is not one: a counter is out of the int64 range")
        row = (key, revision, head.execution_id, head.tenant, head.project, head.status, head.last_seq,
               head.event_count, projection, head.status in TERMINAL)  # fmt: skip
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, OUTPUT, strict=True)], schema=OUTPUT)
