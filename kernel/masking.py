"""Exact-value masking: every occurrence of a resolved credential becomes ``***`` before it leaves the worker.

The key-name scrub (:mod:`kernel.scrub`) hides values by where they sit
(``password: …``); this hides them by what they are. A data worker builds an
:class:`ExactMask` from the credential values it resolved for one call and
passes the call's result, its error message and its log lines through it.

A value is masked as its UTF-8 text and as its base64 (standard and URL-safe
alphabets, with or without padding). Longer forms are replaced first, so a
value that contains another (a padded base64, a value holding another value)
is masked whole.

>>> mask = ExactMask([b"s3cr3t-token"])
>>> mask.value({"echo": "Bearer s3cr3t-token", "b64": "czNjcjN0LXRva2Vu", "n": 1})
{'echo': 'Bearer ***', 'b64': '***', 'n': 1}
>>> mask.text("no secret here")
'no secret here'
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Iterable, Iterator, MutableMapping
from contextvars import ContextVar
import sys
from typing import TYPE_CHECKING, Any, Final

from kernel.scrub import MASK

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["ExactMask", "active_mask", "mask_log_event", "masking"]

_MASK_BYTES: Final = MASK.encode()
_active: ContextVar[ExactMask | None] = ContextVar("noetl_exact_mask", default=None)


def _forms(value: bytes) -> set[bytes]:
    forms = {value}
    for encoded in (base64.b64encode(value), base64.urlsafe_b64encode(value)):
        forms |= {encoded, encoded.rstrip(b"=")}
    return {form for form in forms if form}


class ExactMask:
    """Replaces every occurrence of some secret values, and of their base64, with ``***``.

    ``value`` walks JSON-like data (dict keys too, ``bytes``, and a ``pyarrow.Table`` by rows)
    and returns a masked copy; the input is never changed.

    >>> ExactMask([b"user:pa55word"]).text("Basic dXNlcjpwYTU1d29yZA==")
    'Basic ***'
    >>> bool(ExactMask([]))
    False
    """

    def __init__(self, values: Iterable[bytes]) -> None:
        forms: set[bytes] = set()
        for value in values:
            if value:
                forms |= _forms(value)
        ordered = sorted(forms, key=lambda form: (-len(form), form))
        self._bytes = re.compile(b"|".join(re.escape(form) for form in ordered)) if ordered else None
        texts = []
        for form in ordered:
            with contextlib.suppress(UnicodeDecodeError):
                texts.append(form.decode("utf-8"))
        self._text = re.compile("|".join(re.escape(text) for text in texts)) if texts else None

    def __bool__(self) -> bool:
        return self._bytes is not None

    def text(self, text: str) -> str:
        """``text`` with every form of every value replaced by ``***``."""
        return text if self._text is None else self._text.sub(MASK, text)

    def bytes(self, data: bytes) -> bytes:
        """``data`` with every form of every value replaced by ``***``."""
        return data if self._bytes is None else self._bytes.sub(_MASK_BYTES, data)

    def value(self, value: Any) -> Any:
        """A masked copy of JSON-like ``value`` (strings, bytes, dict keys, lists, tuples, an Arrow table)."""
        if self._bytes is None:
            return value
        arrow = sys.modules.get("pyarrow")  # a table exists only where pyarrow was imported: no import for logs
        if arrow is not None and isinstance(value, arrow.Table):
            return self._table(value)
        return self._walk(value)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, (bytes, bytearray)):
            return self.bytes(bytes(value))
        if isinstance(value, dict):
            return {self._walk(k): self._walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._walk(item) for item in value]
        return value

    def _table(self, table: pa.Table) -> pa.Table:
        import pyarrow as pa

        # Rebuilt only when a value occurs in it: the common table holds no credential and stays as it is.
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        if self._bytes is not None and self._bytes.search(sink.getvalue().to_pybytes()) is None:
            return table
        masked = pa.Table.from_pylist(self._walk(table.to_pylist()), schema=table.schema)
        return masked.replace_schema_metadata(self._walk(table.schema.metadata) if table.schema.metadata else None)


def active_mask() -> ExactMask | None:
    """The mask of the tool call running in this context (task or its threads), if any."""
    return _active.get()


@contextlib.contextmanager
def masking(mask: ExactMask) -> Iterator[ExactMask]:
    """Make ``mask`` the active one for the block: log lines written inside it are masked too."""
    token = _active.set(mask)
    try:
        yield mask
    finally:
        _active.reset(token)


def mask_log_event(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor: the active mask over every value of the event (keys included)."""
    mask = _active.get()
    if mask is None:
        return event
    masked: dict[str, Any] = mask.value(dict(event))
    return masked
