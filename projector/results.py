"""Large step results in object storage, as Arrow IPC (Feather v2) files referred to by ``result_ref``.

Events never carry large payloads: a result over the payload cap is stored
here and the event carries its reference,
``noetl://results/<tenant>/<project>/<execution_id>/<step>/<iteration or ->-<attempt>.feather``,
which resolves against the store's base URL (the same one as the snapshot
segments) to ``<base>/results/<tenant>/<project>/<execution_id>/<step>/<iteration or ->-<attempt>.feather``.

A stored result is one of three forms, named by the schema metadata key
``noetl.result``:

* ``rows``: a JSON list of flat objects (same keys in every row, each column
  of one scalar type), stored as a table with one row per object;
* ``json``: any other JSON value, stored as a one-row table whose ``result``
  column holds the JSON text;
* ``table``: a ``pyarrow.Table`` a tool returned, stored as it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, cast

import msgspec
import pyarrow as pa
import pyarrow.ipc

from locator.errors import LocatorError
from locator.names import check_execution_id, check_name, check_step
from projector.errors import ProjectorError
from projector.objects import ObjectRoot

REF_PREFIX: Final = "noetl://results/"
FORMAT_KEY: Final = b"noetl.result"
ResultFormat = Literal["rows", "json", "table"]
_FORMATS: Final = frozenset({"rows", "json", "table"})
_LEAF_RE: Final = re.compile(r"^(-|0|[1-9][0-9]*)-([1-9][0-9]*)\.feather$")
_SCALARS: Final = (bool, int, float, str)


class ResultError(ProjectorError):
    """A result could not be stored or read."""


class InvalidResultRef(ResultError):
    """The text is not a result reference this store can resolve."""


class ResultNotFound(ResultError):
    """The reference is well formed but nothing is stored under it."""


class ResultKey(NamedTuple):
    """What a result reference names: one attempt of one step (iteration) of an execution."""

    tenant: str
    project: str
    execution_id: str
    step: str
    iteration: int | None
    attempt: int


class StoredResult(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome of :meth:`ResultStore.put`: the reference, the object's size in bytes and its form."""

    ref: str
    size: int
    format: ResultFormat


def result_ref(key: ResultKey) -> str:
    """The reference of ``key``; raises :class:`InvalidResultRef` for a bad part.

    >>> result_ref(ResultKey("acme", "web", "42", "fetch", None, 2))
    'noetl://results/acme/web/42/fetch/--2.feather'
    >>> parse_result_ref('noetl://results/acme/web/42/square/3-1.feather').iteration
    3
    """
    try:
        check_name("tenant", key.tenant)
        check_name("project", key.project)
        check_execution_id(key.execution_id)
        check_step(key.step)
    except LocatorError as e:
        raise InvalidResultRef(f"cannot name a result: {e}") from e
    if key.iteration is not None and (type(key.iteration) is not int or key.iteration < 0):
        raise InvalidResultRef(f"iteration must be None or >= 0, got {key.iteration!r}")
    if type(key.attempt) is not int or key.attempt < 1:
        raise InvalidResultRef(f"attempt must be >= 1, got {key.attempt!r}")
    return f"{REF_PREFIX}{'/'.join(_parts(key))}"


def _parts(key: ResultKey) -> tuple[str, ...]:
    leaf = f"{'-' if key.iteration is None else key.iteration}-{key.attempt}.feather"
    return (key.tenant, key.project, key.execution_id, key.step, leaf)


def parse_result_ref(ref: str) -> ResultKey:
    """The key a reference names; raises :class:`InvalidResultRef` naming what is wrong."""
    shape = f"{REF_PREFIX}<tenant>/<project>/<execution_id>/<step>/<iteration or ->-<attempt>.feather"
    if not isinstance(ref, str) or not ref.startswith(REF_PREFIX):
        raise InvalidResultRef(f"not a result reference: {ref!r} (expected {shape})")
    parts = ref[len(REF_PREFIX) :].split("/")
    leaf = _LEAF_RE.fullmatch(parts[-1]) if len(parts) == 5 else None
    if leaf is None:
        raise InvalidResultRef(f"malformed result reference {ref!r} (expected {shape})")
    iteration = None if leaf.group(1) == "-" else int(leaf.group(1))
    key = ResultKey(parts[0], parts[1], parts[2], parts[3], iteration, int(leaf.group(2)))
    try:
        result_ref(key)
    except InvalidResultRef as e:
        raise InvalidResultRef(f"bad result reference {ref!r}: {e}") from e
    return key


def _rows_table(value: Any) -> pa.Table | None:
    """``value`` as a table if it is a non-empty list of flat objects that survives the round trip exactly."""
    if not isinstance(value, list) or not value or not isinstance(value[0], dict) or not value[0]:
        return None
    keys = value[0].keys()
    types: dict[str, type] = {}
    for row in value:
        if not isinstance(row, dict) or row.keys() != keys:
            return None  # from_pylist takes the first row's keys: other keys would be lost
        for name, item in row.items():
            if item is None:
                continue
            kind = type(item)
            # One Python type per column, or Arrow would coerce (1 and 1.5 to doubles, True to 1).
            if kind not in _SCALARS or types.setdefault(name, kind) is not kind:
                return None
            if kind is float and not math.isfinite(item):
                return None  # JSON has no NaN or infinity: the json form stores them as null, like an event
    if not all(isinstance(name, str) for name in keys):
        return None
    try:
        return pa.Table.from_pylist(value)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        return None  # e.g. an int beyond int64


def _json_table(value: Any) -> pa.Table:
    try:
        text = msgspec.json.encode(value).decode()
    except (TypeError, msgspec.EncodeError) as e:
        raise ResultError(f"result is not JSON-serializable: {e}") from e
    return pa.table({"result": pa.array([text], type=pa.large_string())})


def _encode(table: pa.Table, form: ResultFormat) -> bytes:
    schema = table.schema.with_metadata({**(table.schema.metadata or {}), FORMAT_KEY: form.encode()})
    sink = pa.BufferOutputStream()
    options = pyarrow.ipc.IpcWriteOptions(compression="zstd")
    try:
        with pyarrow.ipc.new_file(sink, schema, options=options) as writer:
            writer.write_table(table.replace_schema_metadata(schema.metadata))
    except (pa.ArrowException, OSError) as e:
        raise ResultError(f"could not encode the result as Arrow IPC: {e}") from e
    return bytes(sink.getvalue())


class ResultStore:
    """Step results too big for an event, as Feather files next to the snapshot segments.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> store = ResultStore(f"file://{tmp.name}/objects")
    >>> key = ResultKey("acme", "web", "42", "fetch", None, 1)
    >>> stored = store.put(key, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    >>> stored.ref, stored.format
    ('noetl://results/acme/web/42/fetch/--1.feather', 'rows')
    >>> store.get_json(stored.ref)
    [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}]
    >>> store.get_json(store.put(key._replace(attempt=2), {"nested": [1, 2]}).ref)
    {'nested': [1, 2]}
    >>> tmp.cleanup()
    """

    def __init__(self, base_url: str, *, storage_options: dict[str, Any] | None = None) -> None:
        self._root = ObjectRoot(base_url, storage_options=storage_options)
        self.base_url = self._root.base_url
        self.storage_options = self._root.storage_options

    @classmethod
    def from_env(cls, *, data_dir: Path, env: Mapping[str, str] | None = None) -> ResultStore:
        """The same settings as :meth:`projector.snapshots.SnapshotStore.from_env` (``NOETL_OBJECTS_URL``…)."""
        root = ObjectRoot.from_env(data_dir=data_dir, env=env)
        return cls(root.base_url, storage_options=root.storage_options)

    def put(self, key: ResultKey, value: Any) -> StoredResult:
        """Store ``value`` (a JSON value or a ``pyarrow.Table``) under ``key``, atomically; a second put replaces it."""
        ref = result_ref(key)
        form: ResultFormat
        if isinstance(value, pa.Table):
            table, form = value, "table"
        elif (rows := _rows_table(value)) is not None:
            table, form = rows, "rows"
        else:
            table, form = _json_table(value), "json"
        data = _encode(table, form)
        path = self._root.path("results", *_parts(key))
        try:
            self._root.write(path, data)
        except OSError as e:
            raise ResultError(f"could not store result {ref} at {self._root.uri(path)}: {e}") from e
        return StoredResult(ref=ref, size=len(data), format=form)

    def uri(self, ref: str) -> str:
        """The full object URI ``ref`` resolves to (for reading it with other tools)."""
        return self._root.uri(self._root.path("results", *_parts(parse_result_ref(ref))))

    def get_table(self, ref: str) -> pa.Table:
        """The stored table (for the ``json`` form, the one-row table with its ``result`` column)."""
        return self._read(ref)[0]

    def read(self, ref: str) -> tuple[pa.Table, ResultFormat]:
        """The stored table and its form: ``rows`` and ``table`` are tables as they are, ``json`` the one-row
        table of its JSON text (:meth:`get_json` decodes it)."""
        return self._read(ref)

    def get_json(self, ref: str) -> Any:
        """The stored value: the JSON value that was put, or a ``table``'s rows as a list of dicts."""
        table, form = self._read(ref)
        if form != "json":
            return table.to_pylist()
        try:
            return msgspec.json.decode(table.column("result")[0].as_py())
        except (KeyError, IndexError, msgspec.DecodeError) as e:
            raise ResultError(f"result {ref} is damaged: its JSON column cannot be read ({e})") from e

    def head(self, ref: str, rows: int) -> tuple[Any, int | None]:
        """The first ``rows`` rows of a stored result and how many it has: a table's rows (sliced before they
        become Python objects), a JSON list's first items; any other JSON value whole, with None."""
        table, form = self._read(ref)
        if form != "json":
            return table.slice(0, rows).to_pylist(), table.num_rows
        value = self.get_json(ref) if table.num_rows else None
        if isinstance(value, list):
            return value[:rows], len(value)
        return value, None

    def read_bytes(self, ref: str) -> bytes:
        """The stored Arrow IPC file, as it is."""
        path = self._root.path("results", *_parts(parse_result_ref(ref)))
        try:
            return self._root.read(path)
        except FileNotFoundError as e:
            raise ResultNotFound(f"no result stored for {ref} (looked at {self._root.uri(path)})") from e
        except OSError as e:
            raise ResultError(f"could not read result {ref}: {e}") from e

    def _read(self, ref: str) -> tuple[pa.Table, ResultFormat]:
        data = self.read_bytes(ref)
        try:
            table = pyarrow.ipc.open_file(pa.py_buffer(data)).read_all()
        except pa.ArrowException as e:
            raise ResultError(f"result {ref} is not an Arrow IPC file: {e}") from e
        form = (table.schema.metadata or {}).get(FORMAT_KEY, b"").decode()
        if form not in _FORMATS:
            raise ResultError(f"result {ref} has no valid {FORMAT_KEY.decode()} schema metadata ({form!r})")
        metadata = {k: v for k, v in (table.schema.metadata or {}).items() if k != FORMAT_KEY}
        return table.replace_schema_metadata(metadata or None), cast(ResultFormat, form)
