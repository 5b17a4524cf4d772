"""The compiled row builder of system/materialize against its Python twin, and a kernel that runs it.

The differential test folds 10,000 seeded random events (random types, steps,
attempts, payloads with unicode and escapes) into projections of many
executions with the real fold, feeds the same Arrow input to both builders and
requires identical output: equal tables, and equal bytes once pyarrow writes
each of them.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest
from nats.js import JetStreamContext

from kernel.host import PluginError, load_plugin, system_manifests
from kernel.producer import Producer
from locator import new_event
from locator.envelope import KNOWN_TYPES
from locator.topology import Topology
from projector.cache import KvProjectionCache
from projector.errors import FoldError
from projector.fold import WalEvent, fold
from projector.projection import TERMINAL, Projection, canonical
from projector.snapshots import SnapshotStore
from system_playbooks.materialize.plugin import MaterializePlugin
from system_playbooks.materialize.rows import OUTPUT, RowError, build_rows, input_table
from system_playbooks.materialize.wasm_rows import WasmRows
from system_playbooks.wasm_sdk.framing import to_stream
from tests.system_playbooks.test_materialize import (
    SHARD,
    caught_up,
    fresh,
    history,
    pumps,
)

SEED = 20260606
EVENTS = 10_000
STRINGS = ["", "é", "日本語", "🦀 crab", '"quoted"', "back\\slash", "line\nbreak\ttab", "\u0000\u001f\u007f", "\u2028\u2029",
           "\ud7ff\ue000\uffff", "</script>", "a" * 300, "{\"status\":\"COMPLETED\"}"]  # fmt: skip
USER_TYPES = ["user.note", "user.metric.cpu", "user.x-y_z"]


@pytest.fixture(scope="module")
def wasm_rows() -> Any:
    rows = WasmRows()
    yield rows
    rows.close()


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(STRINGS) + "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(6)))
    if kind == 1:
        return rng.randrange(-(2**63), 2**63)
    if kind == 2:
        return rng.choice([0.5, -1e300, 3.14159, 1e-7, 0.0])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return rng.randrange(-1000, 1000)
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(STRINGS + ["status", "last_seq", "execution_id", "k"]) + str(i): random_value(rng, depth + 1)
            for i in range(rng.randrange(4))}  # fmt: skip


def random_projections(seed: int, events: int) -> dict[str, Projection]:
    """Fold ``events`` random events over a few hundred executions (deterministic for ``seed``)."""
    rng = random.Random(seed)
    projections: dict[str, Projection | None] = {}
    owners: dict[str, tuple[str, str]] = {}
    types = sorted(KNOWN_TYPES) + USER_TYPES
    for seq in range(1, events + 1):
        execution_id = str(rng.randrange(1, 2**63)) if not owners or rng.random() < 0.04 else rng.choice(sorted(owners))
        tenant, project = owners.setdefault(execution_id, (rng.choice(["acme", "t-1", "x_y"]), rng.choice(["web", "p0"])))
        type = rng.choice(types)
        payload = {rng.choice(STRINGS + ["result", "error"]): random_value(rng) for _ in range(rng.randrange(3))}
        if type == "execution.requested" and rng.random() < 0.5:
            payload = {"playbook": {"path": "demo/x", "version": rng.randrange(1, 9)}, "workload": {"n": random_value(rng)}}
        env = new_event(
            tenant=tenant, project=project, execution_id=execution_id, type=type,
            step=rng.choice([None, "a", "b", "etape_2", "loop-1"]), attempt=rng.choice([None, 1, 2, 3]),
            payload=payload, event_id=f"{rng.getrandbits(128):032x}",
            ts=f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T{rng.randrange(24):02d}:00:00.{seq % 1000:03d}Z",
        )  # fmt: skip
        try:
            projections[execution_id] = fold(projections.get(execution_id), [WalEvent(seq, env)])
        except FoldError:
            continue  # an event the fold refuses leaves the projection as it was
    return {k: p for k, p in projections.items() if p is not None}


def test_compiled_row_builder_equals_the_python_twin_on_10000_random_events(wasm_rows: WasmRows) -> None:
    projections = random_projections(SEED, EVENTS)
    rng = random.Random(SEED + 1)
    entries = [(key, rng.randrange(1, 2**40), None if rng.random() < 0.1 else canonical(p))
               for key, p in sorted(projections.items())]  # fmt: skip
    table = input_table(entries)
    python = build_rows(table)
    wasm = wasm_rows(table)
    assert wasm.schema.equals(OUTPUT) and python.schema.equals(OUTPUT)
    assert wasm.equals(python)
    assert to_stream(wasm) == to_stream(python)
    # The comparison is not vacuous: many rows, every terminal status, both pointer decisions, escapes in the JSON.
    statuses = set(python.column("status").to_pylist())
    assert python.num_rows > 200 and TERMINAL < statuses and "RUNNING" in statuses
    assert {True, False} == set(python.column("pointer").to_pylist())
    assert sum(p.event_count for p in projections.values()) > EVENTS * 0.9
    assert any("\\u0000" in s and "\\\\" in s for s in python.column("projection").to_pylist())
    # And the twin is right, not only equal: each row is its projection's.
    for row in python.to_pylist():
        p = projections[row["key"]]
        assert (row["execution_id"], row["tenant"], row["status"], row["last_seq"], row["event_count"]) == (
            p.execution_id, p.tenant, p.status, p.last_seq, p.event_count)  # fmt: skip
        assert row["projection"].encode() == canonical(p) and row["pointer"] == (p.status in TERMINAL)


def test_chunked_invocations_give_the_same_rows(wasm_rows: WasmRows) -> None:
    projections = random_projections(SEED + 2, 1500)
    table = input_table((key, i, canonical(p)) for i, (key, p) in enumerate(sorted(projections.items())))
    small = WasmRows(host=wasm_rows.host, chunk_bytes=2048)
    assert small(table).equals(build_rows(table))
    empty = input_table([])
    assert wasm_rows(empty).equals(build_rows(empty)) and build_rows(empty).num_rows == 0


HEAD = {"execution_id": "42", "tenant": "t", "project": "p", "status": "FAILED", "last_seq": 7, "event_count": 3}


@pytest.mark.parametrize(
    "text",
    [
        ' \n{ "tenant" : "t", "project":"p","status":"FAILED" ,"last_seq":7,"event_count":3,"execution_id":"42"}\r\n',
        (
            '{"st\\u0061tus":"FAIL\\u0045D","tenant":"\\u0074","project":"p","last_seq":7,"event_count":3,'
            '"execution_id":"4\\u0032","x":{"status":"RUNNING","a":[{"last_seq":1}],"b":"}\\"]"}}'
        ),
        '{"status":"RUNNING","status":"FAILED","tenant":"t","project":"p","last_seq":9,"last_seq":7,"event_count":3,'
        '"execution_id":"42","deep":' + "[" * 200 + "]" * 200 + ',"n":[-0.5e+3,0,1E2,true,false,null,"\\ud83e\\udd80"]}',
    ],
    ids=["whitespace-and-order", "escapes-and-nesting", "duplicates-and-depth"],
)
def test_hand_written_json_reads_the_same(wasm_rows: WasmRows, text: str) -> None:
    table = input_table([("42", 1, text.encode())])
    python, wasm = build_rows(table), wasm_rows(table)
    assert wasm.equals(python)
    row = python.to_pylist()[0]
    assert {k: row[k] for k in HEAD} == HEAD and row["projection"] == text and row["pointer"] is True


def test_special_bytes_at_every_position_of_a_word(wasm_rows: WasmRows) -> None:
    # The guest scans plain string bytes eight at a time: put each kind of special byte at each offset.
    entries = []
    for special in ['\\"', "\\\\", "\\n", "\\u00e9", "é", "日", "🦀", "\x7f", "\\ud83e\\udd80"]:
        for before in range(17):
            value = "A" * before + special + "B" * (17 - before)
            text = (f'{{"execution_id":"1","tenant":"t","project":"p","status":"{value}","last_seq":1,"event_count":1,'
                    f'"skipped":["{value}",{{"{value}":"{value}"}}]}}')  # fmt: skip
            entries.append((str(len(entries)), len(entries), text.encode()))
    table = input_table(entries)
    python = build_rows(table)
    assert wasm_rows(table).equals(python) and python.num_rows == len(entries)
    assert "A" * 5 + '"' + "B" * 12 in python.column("status").to_pylist()


@pytest.mark.parametrize(
    "text",
    [
        "", "{", "[]", "{}", '{"tenant":"t"}', "null",
        '{"execution_id":"42","tenant":"t","project":"p","status":"S","last_seq":7}',  # no event_count
        '{"execution_id":42,"tenant":"t","project":"p","status":"S","last_seq":7,"event_count":3}',
        '{"execution_id":"42","tenant":"t","project":"p","status":"S","last_seq":7.5,"event_count":3}',
        '{"execution_id":"42","tenant":"t","project":"p","status":"S","last_seq":9223372036854775808,"event_count":3}',
        '{"execution_id":"42","tenant":"t","project":"p","status":"S","last_seq":7,"event_count":3} x',
        '{"execution_id":"42","tenant":"t","project":"p","status":"\\ud800","last_seq":7,"event_count":3}',
        '{"execution_id":"42","tenant":"t","project":"p","status":"\\q","last_seq":7,"event_count":3}',
        '{"execution_id":"42","tenant":"t","project":"p","status":"S","last_seq":7,"event_count":3,"x":[1,}',
        '{"execution_id":"42","tenant":"t","project":"p","status":"S","last_seq":07,"event_count":3}',
        '{"execution_id":"42","tenant":"t","project":"p","status":"a\tb","last_seq":7,"event_count":3}',
        '{"execution_id":"42","tenant":"t","project":"p","status":"S","last_seq":7,"event_count":3,"x":"' + "a" * 21
        + '\n' + "b" * 20 + '"}',
    ],
)  # fmt: skip
def test_malformed_projections_are_refused_by_both(wasm_rows: WasmRows, text: str) -> None:
    table = input_table([("42", 1, text.encode())])
    with pytest.raises(RowError):
        build_rows(table)
    with pytest.raises(RowError, match="compiled row builder failed"):
        wasm_rows(table)


def test_a_wrong_input_schema_is_refused(wasm_rows: WasmRows) -> None:
    wrong = pa.table({"key": ["1"], "revision": pa.array([1], pa.int32()), "projection": ["{}"]})
    for builder in (build_rows, wasm_rows):
        with pytest.raises(RowError, match="input must have the schema"):
            builder(wrong)
    # The guest checks the schema itself too, not only its Python wrapper.
    with pytest.raises(RowError, match="compiled row builder failed"):
        wasm_rows.invoke(to_stream(wrong))


def test_a_wasm_manifest_needs_a_module_that_exists() -> None:
    manifest = next(m for m in system_manifests() if m.consumer == "materialize")
    with pytest.raises(PluginError, match="runtime 'wasm' needs a module"):
        load_plugin(msgspec.structs.replace(manifest, runtime="wasm", module=""))
    with pytest.raises(RowError, match="nope.c does not exist"):
        load_plugin(msgspec.structs.replace(manifest, runtime="wasm", module="system_playbooks/materialize/wasm/nope.c"))
    python = load_plugin(manifest)  # the shipped manifest: runtime python, the module named but not used
    assert isinstance(python, MaterializePlugin) and python.rows is build_rows and manifest.runtime == "python"


async def test_a_kernel_with_runtime_wasm_writes_the_rows_the_python_twin_would(
    js: JetStreamContext, topology: Topology, tmp_path: Path, pump_until: Any
) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    finished = {"101": "execution.completed", "102": "execution.failed", "103": "execution.cancelled"}
    producer = Producer(js, topology)
    for x, finish in finished.items():
        await producer.publish_many(history(x, finish=finish))
    await producer.publish_many(history("104", finish=None))
    await producer.publish_many([new_event(tenant="acme", project="web", execution_id="104", type="user.note",
                                           payload={"text": 'ünï "quoted" \\ \n 🦀'})])  # fmt: skip
    manifest = next(m for m in system_manifests() if m.consumer == "materialize")
    plugin = load_plugin(msgspec.structs.replace(manifest, runtime="wasm"))
    assert isinstance(plugin, MaterializePlugin) and isinstance(plugin.rows, WasmRows)
    cache = await KvProjectionCache.open(js, SHARD)
    try:
        await pump_until(pumps(js, cache, store, materialize=plugin), caught_up(js))
    finally:
        plugin.rows.close()

    written = {}
    for segment in store.list_segments(SHARD):
        for row in range(store.read_segment(segment).num_rows):
            r = store.read_row(segment, row)
            written[r.execution_id] = r
    for x in [*finished, "104"]:
        expected = build_rows(input_table([(x, 1, await fresh(js, x))])).to_pylist()[0]
        entry = await cache.get(x)
        assert entry is not None
        if x in finished:
            assert entry.pointer is not None, f"{x} should be a pointer once materialized"
            row = store.read_row(entry.pointer.pointer.segment, entry.pointer.pointer.row)
            assert entry.pointer.status == expected["status"] == finished[x].split(".")[1].upper()
        else:
            assert entry.projection is not None and entry.pointer is None
            row = written.get(x) or pytest.fail(f"{x} has no segment row")
        assert (row.execution_id, row.tenant, row.project, row.status, row.last_seq, row.event_count, row.projection) == (
            expected["execution_id"], expected["tenant"], expected["project"], expected["status"], expected["last_seq"],
            expected["event_count"], expected["projection"])  # fmt: skip
