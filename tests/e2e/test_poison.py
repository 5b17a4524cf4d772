"""Poison of every shape published straight to a WAL subject, through a real ``noetl-edge up``.

Every poison message is dead-lettered exactly once with its reason, every valid
event around it is folded (the served projection equals a fresh fold of the
WAL), and after a restart of ``up`` the shard still folds new events.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import nats
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from kernel.dlq import DLQ_REASON, DLQ_SEQ, DLQ_STREAM
from locator.envelope import encode_envelope, new_event
from locator.shard import shard_for
from locator.subjects import wal_stream
from tests.e2e.conftest import SHARDS, Stack, check_invariant, executions_url, start_up

TENANT, PROJECT = "poison", "p1"
SHARD = shard_for(TENANT, PROJECT, "", SHARDS)
# A tenant of another shard, for an envelope on a subject of the wrong shard.
OTHER = next(t for t in (f"t{i}" for i in range(100)) if shard_for(t, PROJECT, "", SHARDS) != SHARD)


def subject(execution_id: str, type: str, tenant: str = TENANT) -> str:
    return f"wal.{SHARD}.{tenant}.{PROJECT}.{execution_id}.{type}"


def valid(execution_id: str, type: str = "user.note", **payload: object) -> bytes:
    return encode_envelope(new_event(tenant=TENANT, project=PROJECT, execution_id=execution_id, type=type, payload=payload))


def with_payload(execution_id: str, fragment: bytes) -> bytes:
    """A valid user.note whose payload starts with ``fragment`` (raw bytes, so it can be anything)."""
    return valid(execution_id, i="x").replace(b'"payload":{', b'"payload":{' + fragment, 1)


def edit(execution_id: str, **fields: object) -> bytes:
    doc = json.loads(valid(execution_id))
    for key, value in fields.items():
        if value is None:
            del doc[key]
        else:
            doc[key] = value
    return json.dumps(doc).encode()


def poison_shapes(execution_id: str) -> list[tuple[str, str, bytes]]:
    """(name, expected reason, subject, bytes): at least 15 distinct shapes, each on ``execution_id``'s subjects."""
    note = subject(execution_id, "user.note")
    deep = 2000
    return [
        ("invalid UTF-8 in a value", "not_utf8", note, with_payload(execution_id, b'"i":"\xff\xfe",')),
        ("invalid UTF-8 in a key", "not_utf8", note, with_payload(execution_id, b'"\xc3\x28":1,')),
        ("nested 2,000 deep", "too_deep", note, with_payload(execution_id, b'"d":' + b"[" * deep + b"]" * deep + b",")),
        ("nested just past the limit", "too_deep", note, with_payload(execution_id, b'"d":' + b"[" * 64 + b"]" * 64 + b",")),
        ("not JSON", "not_json", note, b"{not json"),
        ("empty", "not_json", note, b""),
        ("a byte-order mark", "not_json", note, b"\xef\xbb\xbf" + valid(execution_id)),
        ("trailing data", "not_json", note, valid(execution_id) + b"}"),
        ("a lone surrogate escape", "not_json", note, with_payload(execution_id, b'"s":"\\ud800",')),
        ("NaN", "not_json", note, with_payload(execution_id, b'"x":NaN,')),
        ("a number out of range", "invalid_envelope", note, with_payload(execution_id, b'"x":1e999,')),
        ("an unknown version", "invalid_envelope", note, edit(execution_id, v=9)),
        ("a missing field", "invalid_envelope", note, edit(execution_id, event_id=None)),
        ("a bad timestamp", "invalid_envelope", note, edit(execution_id, ts="yesterday")),
        ("an array", "invalid_envelope", note, b"[1,2,3]"),
        ("an unknown type", "invalid_envelope", subject(execution_id, "bogus.kind"), edit(execution_id, type="bogus.kind")),
        ("another execution's subject", "subject_mismatch", subject(str(int(execution_id) + 1), "user.note"), valid(execution_id)),
        (
            "the wrong shard",
            "subject_mismatch",
            subject(execution_id, "user.note", tenant=OTHER),
            encode_envelope(new_event(tenant=OTHER, project=PROJECT, execution_id=execution_id, type="user.note")),
        ),
    ]


async def wait_folded(edge: httpx.AsyncClient, execution_id: str, seq: int, timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        resp = await edge.get(executions_url(TENANT, PROJECT, execution_id))
        # Folded by the kernel: served from its cache, not replayed by the edge on a miss.
        if resp.status_code == 200 and resp.json()["last_seq"] >= seq and resp.headers.get("X-Noetl-Source") == "cache":
            return dict(resp.json())
        assert time.monotonic() < deadline, f"execution {execution_id} not folded to seq {seq}: {resp.status_code} {resp.text[:300]}"
        await asyncio.sleep(0.1)


async def dead_letters(js: JetStreamContext) -> list[tuple[int, str, str]]:
    """(WAL seq, subject, reason header) of every message in the shard's DLQ."""
    out = []
    seq = 0
    while True:
        try:
            msg = await js.get_msg(f"DLQ_{SHARD}", seq=seq + 1, next=True)
        except NotFoundError:
            return out
        assert msg.seq is not None and msg.headers is not None and msg.subject is not None
        seq = msg.seq
        assert msg.headers[DLQ_STREAM] == wal_stream(SHARD)
        out.append((int(msg.headers[DLQ_SEQ]), msg.subject, msg.headers[DLQ_REASON]))


async def test_poison_of_every_shape_is_dead_lettered_once_and_the_shard_keeps_folding(tmp_path: Path) -> None:
    stack: Stack = start_up(tmp_path / "data", tmp_path)
    try:
        nc = await nats.connect(stack.nats_url)
        js = nc.jetstream()
        published: dict[str, int] = {}  # execution id -> seq of its last valid event
        expected: dict[int, tuple[str, str]] = {}  # poison seq -> (name, reason)
        shapes = poison_shapes("1000")
        assert len(shapes) >= 15 and len({name for name, *_ in shapes}) == len(shapes)
        for i, (name, reason, subj, data) in enumerate(poison_shapes_for_each()):
            execution_id = str(1000 + i)
            # A valid event before each poison message, on the poison's own execution, and one after it.
            ack = await js.publish(subject(execution_id, "user.note"), valid(execution_id, n=i), headers={"Nats-Msg-Id": f"ok-{i}-a"})
            bad = await js.publish(subj, data, headers={"Nats-Msg-Id": f"poison-{i}"})
            expected[bad.seq] = (name, reason)
            ack = await js.publish(subject(execution_id, "user.note"), valid(execution_id, n=i), headers={"Nats-Msg-Id": f"ok-{i}-b"})
            published[execution_id] = ack.seq
        later = {}
        for j in range(5):  # executions that begin after all the poison
            execution_id = str(2000 + j)
            ack = await js.publish(subject(execution_id, "execution.started"), valid(execution_id, "execution.started"),
                                   headers={"Nats-Msg-Id": f"later-{j}"})
            later[execution_id] = ack.seq
        async with stack.client() as edge:
            for execution_id, seq in {**published, **later}.items():
                served = await wait_folded(edge, execution_id, seq)
                await check_invariant(js, edge, TENANT, PROJECT, execution_id)
                if execution_id in published:
                    assert served["event_count"] == 2, (execution_id, served)  # the two valid notes, no poison
            # The projection of an execution with poison among its subjects is served, events page too.
            events = await edge.get(executions_url(TENANT, PROJECT, "1000") + "/events")
            assert events.status_code == 200, events.text

        letters = await dead_letters(js)
        by_seq: dict[int, list[tuple[str, str]]] = {}
        for seq, dlq_subject, reason in letters:
            by_seq.setdefault(seq, []).append((dlq_subject, reason))
        assert set(by_seq) == set(expected), (sorted(by_seq), sorted(expected))
        for seq, (name, reason) in expected.items():
            assert len(by_seq[seq]) == 1, f"{name}: dead-lettered {len(by_seq[seq])} times"
            dlq_subject, header = by_seq[seq][0]
            assert dlq_subject == f"dlq.{SHARD}.{reason}" and header.startswith(f"{reason}: "), (name, dlq_subject, header)
        await nc.close()
    finally:
        assert stack.proc.stop() == 0, stack.proc.logs()

    # A restart of up resumes after the poison: nothing is dead-lettered again, and new events fold.
    (tmp_path / "again").mkdir()
    again = start_up(tmp_path / "data", tmp_path / "again")
    try:
        nc = await nats.connect(again.nats_url)
        js = nc.jetstream()
        ack = await js.publish(subject("3000", "user.note"), valid("3000"), headers={"Nats-Msg-Id": "after-restart"})
        async with again.client() as edge:
            await wait_folded(edge, "3000", ack.seq)
            await check_invariant(js, edge, TENANT, PROJECT, "3000")
        assert len(await dead_letters(js)) == len(letters)
        await nc.close()
    finally:
        assert again.proc.stop() == 0, again.proc.logs()


def poison_shapes_for_each() -> list[tuple[str, str, str, bytes]]:
    """Each shape on its own execution (1000, 1001, …), so every execution has poison among its subjects."""
    return [poison_shapes(str(1000 + i))[i] for i in range(len(poison_shapes("1000")))]
