"""The ABI's framing on the host side: a guest's input and output are Arrow IPC *stream* bytes, nothing around them.

>>> import pyarrow as pa
>>> table = pa.table({"n": pa.array([1, None], pa.int64()), "s": ["é", ""]})
>>> data = to_stream(table)
>>> data[:4], data[-8:], from_stream(data).equals(table)
(b'\\xff\\xff\\xff\\xff', b'\\xff\\xff\\xff\\xff\\x00\\x00\\x00\\x00', True)
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.ipc


def to_stream(table: pa.Table) -> bytes:
    """``table`` as pyarrow.ipc.new_stream writes it: schema, record batches, end-of-stream marker."""
    sink = pa.BufferOutputStream()
    with pyarrow.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def from_stream(data: bytes) -> pa.Table:
    """The table in an Arrow IPC stream (``pyarrow.ArrowInvalid`` if it is not one)."""
    return pyarrow.ipc.open_stream(data).read_all()
