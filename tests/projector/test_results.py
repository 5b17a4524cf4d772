"""One contract suite for ResultStore, run against a file:// directory and a real S3 HTTP endpoint (moto)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import fsspec.core
import pyarrow as pa
import pyarrow.feather
import pytest

from projector.errors import ProjectorError
from projector.results import (
    FORMAT_KEY,
    InvalidResultRef,
    ResultError,
    ResultKey,
    ResultNotFound,
    ResultStore,
    parse_result_ref,
    result_ref,
)

BUCKET = "noetl-test"
CREDENTIALS = {"key": "testing", "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}
KEY = ResultKey("acme", "web", "42", "fetch", None, 1)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ResultStore:
    if request.param == "file":
        return ResultStore(f"file://{tmp_path}/objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    return ResultStore(f"s3://{BUCKET}/{uuid.uuid4().hex}/objects", storage_options={"endpoint_url": endpoint, **CREDENTIALS})


def stored_format(store: ResultStore, ref: str) -> bytes:
    fs, path = fsspec.core.url_to_fs(store.uri(ref), **store.storage_options)
    with fs.open(path, "rb") as f:
        return pyarrow.ipc.open_file(f).schema.metadata[FORMAT_KEY]


# --- references -----------------------------------------------------------------------------------


def test_ref_names_tenant_project_execution_step_iteration_and_attempt() -> None:
    assert result_ref(KEY) == "noetl://results/acme/web/42/fetch/--1.feather"
    looped = KEY._replace(step="square", iteration=3, attempt=2)
    assert result_ref(looped) == "noetl://results/acme/web/42/square/3-2.feather"
    assert parse_result_ref(result_ref(looped)) == looped
    assert parse_result_ref(result_ref(KEY)) == KEY


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "noetl://acme/web/executions/42/results/fetch/1",  # the execution URN form is not a stored result
        "s3://bucket/results/acme/web/42/fetch/--1.feather",
        "noetl://results/acme/web/42/fetch/1.feather",
        "noetl://results/acme/web/42/fetch/--0.feather",
        "noetl://results/acme/web/42/fetch/01-1.feather",
        "noetl://results/acme/web/42/fetch/--1.arrow",
        "noetl://results/acme/web/42/--1.feather",
        "noetl://results/Acme/web/42/fetch/--1.feather",
        "noetl://results/acme/web/042/fetch/--1.feather",
        "noetl://results/acme/web/42/fe.tch/--1.feather",
        "noetl://results/acme/web/42/fetch/x/--1.feather",
        "noetl://results/../../42/fetch/--1.feather",
    ],
)
def test_bad_refs_are_refused_with_a_clear_error(ref: str, tmp_path: Path) -> None:
    store = ResultStore(f"file://{tmp_path}/objects")
    with pytest.raises(InvalidResultRef, match="result reference"):
        store.get_json(ref)
    with pytest.raises(InvalidResultRef):
        parse_result_ref(ref)


@pytest.mark.parametrize(
    "key",
    [KEY._replace(attempt=0), KEY._replace(iteration=-1), KEY._replace(step="a b"), KEY._replace(tenant="x.y")],
)
def test_a_bad_key_cannot_be_stored(key: ResultKey, tmp_path: Path) -> None:
    with pytest.raises(InvalidResultRef):
        ResultStore(f"file://{tmp_path}/objects").put(key, [1])


def test_errors_share_the_projector_root() -> None:
    assert issubclass(InvalidResultRef, ResultError) and issubclass(ResultNotFound, ResultError)
    assert issubclass(ResultError, ProjectorError)


# --- the contract, on every adapter ---------------------------------------------------------------


def test_rows_round_trip_as_a_table(store: ResultStore) -> None:
    rows = [{"id": i, "name": f"n{i}", "score": i / 2, "ok": i % 2 == 0, "note": None} for i in range(1000)]
    stored = store.put(KEY, rows)
    assert stored.ref == result_ref(KEY) and stored.format == "rows" and stored.size > 0
    table = store.get_table(stored.ref)
    assert table.num_rows == 1000 and table.column_names == ["id", "name", "score", "ok", "note"]
    assert table.schema.field("id").type == pa.int64()
    assert store.get_json(stored.ref) == rows
    assert stored_format(store, stored.ref) == b"rows"


@pytest.mark.parametrize(
    "value",
    [
        {"nested": {"a": [1, 2, {"b": None}]}},
        "just text",
        12.5,
        None,
        [],
        [1, 2, 3],
        [{"a": 1}, {"b": 2}],  # different keys: a table would invent nulls
        [{"a": 1}, {"a": 1.5}],  # int and float in one column: Arrow would turn 1 into 1.0
        [{"a": True}, {"a": 1}],
        [{"a": 2**70}],  # beyond int64
        [{"a": [1, 2]}],  # not flat
        [{"a": 1}, "x"],
    ],
)
def test_other_json_values_round_trip_exactly(store: ResultStore, value: Any) -> None:
    stored = store.put(KEY, value)
    assert stored.format == "json"
    got = store.get_json(stored.ref)
    assert got == value and repr(got) == repr(value)  # 1 stays 1, True stays True
    table = store.get_table(stored.ref)
    assert table.column_names == ["result"] and table.num_rows == 1


def test_a_pyarrow_table_is_stored_as_it_is(store: ResultStore) -> None:
    table = pa.table(
        {"ts": pa.array([1, 2], type=pa.timestamp("ms")), "v": pa.array([1, 2], type=pa.int8())},
        metadata={"origin": "tool"},
    )
    stored = store.put(KEY, table)
    assert stored.format == "table"
    got = store.get_table(stored.ref)
    assert got.equals(table) and got.schema.metadata == {b"origin": b"tool"}
    assert [row["v"] for row in store.get_json(stored.ref)] == [1, 2]


def test_a_second_put_replaces_and_keys_do_not_collide(store: ResultStore) -> None:
    store.put(KEY, {"v": 1})
    store.put(KEY, {"v": 2})
    store.put(KEY._replace(attempt=2), {"v": 3})
    store.put(KEY._replace(iteration=0), {"v": 4})
    assert store.get_json(result_ref(KEY)) == {"v": 2}
    assert store.get_json(result_ref(KEY._replace(attempt=2))) == {"v": 3}
    assert store.get_json(result_ref(KEY._replace(iteration=0))) == {"v": 4}


def test_an_unknown_ref_is_not_found(store: ResultStore) -> None:
    with pytest.raises(ResultNotFound, match="no result stored for noetl://results/acme/web/42/fetch/--1.feather"):
        store.get_table(result_ref(KEY))


def test_a_stored_result_is_plain_feather(store: ResultStore) -> None:
    """Tools outside the project read the object at ``uri(ref)`` with pyarrow alone."""
    stored = store.put(KEY, [{"id": 1}, {"id": 2}])
    uri = store.uri(stored.ref)
    assert uri.endswith("/results/acme/web/42/fetch/--1.feather") and uri.startswith(store.base_url)
    fs, path = fsspec.core.url_to_fs(uri, **store.storage_options)
    with fs.open(path, "rb") as f:
        assert pyarrow.feather.read_table(f).to_pylist() == [{"id": 1}, {"id": 2}]


# --- file:// specifics ----------------------------------------------------------------------------


def test_damaged_objects_raise_result_errors(tmp_path: Path) -> None:
    store = ResultStore(f"file://{tmp_path}/objects")
    ref = store.put(KEY, {"v": 1}).ref
    Path(store.uri(ref).removeprefix("file://")).write_bytes(b"not arrow")
    with pytest.raises(ResultError, match="not an Arrow IPC file"):
        store.get_json(ref)
    pyarrow.feather.write_feather(pa.table({"x": [1]}), store.uri(ref).removeprefix("file://"))
    with pytest.raises(ResultError, match="noetl.result"):
        store.get_json(ref)


def test_file_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultStore(f"file://{tmp_path}/objects")
    ref = store.put(KEY, {"v": 1}).ref
    directory = tmp_path / "objects/results/acme/web/42/fetch"
    assert sorted(p.name for p in directory.iterdir()) == ["--1.feather"]

    def failing_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(ResultError, match="disk gone"):
        store.put(KEY, {"v": 2})
    monkeypatch.undo()
    # The old object is intact and no temp file is left behind.
    assert store.get_json(ref) == {"v": 1}
    assert sorted(p.name for p in directory.iterdir()) == ["--1.feather"]


def test_from_env_default_is_file_under_data_dir(tmp_path: Path) -> None:
    store = ResultStore.from_env(data_dir=tmp_path / "data", env={})
    assert store.base_url == f"file://{tmp_path}/data/objects"
    ref = store.put(KEY, {"v": 1}).ref
    assert (tmp_path / "data/objects/results/acme/web/42/fetch/--1.feather").is_file()
    assert store.get_json(ref) == {"v": 1}


def test_from_env_s3(tmp_path: Path, s3_endpoint: str) -> None:
    env = {
        "NOETL_OBJECTS_URL": f"s3://{BUCKET}/{uuid.uuid4().hex}/objects",
        "NOETL_S3_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    store = ResultStore.from_env(data_dir=tmp_path, env=env)
    ref = store.put(KEY, [{"a": 1}]).ref
    assert store.uri(ref) == env["NOETL_OBJECTS_URL"] + "/results/acme/web/42/fetch/--1.feather"
    assert store.get_json(ref) == [{"a": 1}]
    assert not (tmp_path / "objects").exists()


def test_head_reads_the_first_rows_of_every_form(tmp_path: Path) -> None:
    store = ResultStore(f"file://{tmp_path}/objects")
    rows = [{"id": i, "name": f"n{i}"} for i in range(500)]
    ref = store.put(KEY, rows).ref
    assert store.head(ref, 3) == (rows[:3], 500)
    mixed = ResultKey("acme", "web", "42", "mixed", None, 1)
    assert store.head(store.put(mixed, [1, "two", {"three": 3}]).ref, 2) == ([1, "two"], 3)  # the json form's list
    scalar = ResultKey("acme", "web", "42", "scalar", None, 1)
    assert store.head(store.put(scalar, {"a": 1}).ref, 2) == ({"a": 1}, None)
    table = ResultKey("acme", "web", "42", "table", None, 1)
    assert store.head(store.put(table, pa.table({"x": list(range(10))})).ref, 4) == ([{"x": i} for i in range(4)], 10)
