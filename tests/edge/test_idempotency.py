"""edge/idempotency.py against a real nats-server: what a crash between the claim and the publish leaves
behind is finished by the next request (one execution, never none or two), the window setting, the key rules."""

from __future__ import annotations

import json

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from kernel.bootstrap import StreamSettings, bootstrap
from kernel.errors import BootstrapMismatch, ConfigError
from edge.idempotency import (
    BadIdempotencyKey,
    IdempotencyConflict,
    IdempotencyStore,
    StartRecord,
    check_key,
    scoped_key,
    start_digest,
)
from kernel.producer import Producer
from locator.envelope import Envelope, new_event
from locator.subjects import IDEMPOTENCY_BUCKET
from locator.topology import Topology, default_topology
from tests.conftest import stream_messages

KEY = "retry me/?"  # " ", "/" and "?" are not KV key characters: the store hashes the key
DIGEST = start_digest(playbook=None, workload={"n": 1}, affinity="")


def requested(execution_id: str, event_id: str | None = None) -> Envelope:
    return new_event(tenant="acme", project="web", execution_id=execution_id, type="execution.requested",
                     event_id=event_id or f"{execution_id}:requested", payload={"playbook": None, "workload": {"n": 1}})


async def executions(js: JetStreamContext) -> list[tuple[int, str, str | None]]:
    """(seq, execution_id, Nats-Msg-Id) of every execution.requested on every shard."""
    out = []
    for shard in range(4):
        for seq, subject, msg_id, data in await stream_messages(js, f"WAL_{shard}"):
            if subject.endswith(".execution.requested"):
                out.append((seq, json.loads(data)["execution_id"], msg_id))
    return out


async def claim_as_a_crashed_winner(js: JetStreamContext, execution_id: str) -> None:
    """What a winner leaves when it dies after its KV create: a record without a seq."""
    record = StartRecord(execution_id=execution_id, event_id=f"{execution_id}:requested", digest=DIGEST,
                         playbook=None, created_at="2026-12-04T00:00:00.000Z")
    kv = await js.key_value(IDEMPOTENCY_BUCKET)
    await kv.create(scoped_key("acme", "web", KEY), msgspec.json.encode(record))


async def start(js: JetStreamContext, topology: Topology, *, digest: str = DIGEST) -> tuple[str, int, bool]:
    fresh_ids = iter(["900", "901", "902"])

    async def fresh() -> Envelope:
        return requested(next(fresh_ids))

    def again(record: StartRecord) -> Envelope:
        return requested(record.execution_id, record.event_id)

    once = await (await IdempotencyStore.open(js)).start(
        Producer(js, topology), "acme", "web", KEY, digest=digest, fresh=fresh, again=again
    )
    return once.record.execution_id, once.seq, once.replayed


async def test_a_claim_whose_winner_died_before_publishing_is_published_by_the_next_request(
    js: JetStreamContext, topology: Topology
) -> None:
    await claim_as_a_crashed_winner(js, "777")
    assert await executions(js) == []  # the key points at an execution nobody published yet
    execution_id, seq, replayed = await start(js, topology)
    assert (execution_id, replayed) == ("777", True)
    assert await executions(js) == [(seq, "777", "777:requested")]
    assert await start(js, topology) == ("777", seq, True)
    assert await executions(js) == [(seq, "777", "777:requested")]
    record = await (await IdempotencyStore.open(js)).get("acme", "web", KEY)
    assert record is not None and record.seq == seq  # settled: later requests read the seq from the record


async def test_a_claim_whose_winner_died_after_publishing_is_not_published_twice(
    js: JetStreamContext, topology: Topology
) -> None:
    await claim_as_a_crashed_winner(js, "778")
    ack = await Producer(js, topology).publish(requested("778"))
    assert await start(js, topology) == ("778", ack.seq, True)
    assert await executions(js) == [(ack.seq, "778", "778:requested")]


async def test_another_digest_is_a_conflict_and_a_free_key_starts_once(js: JetStreamContext, topology: Topology) -> None:
    execution_id, seq, replayed = await start(js, topology)
    assert (execution_id, replayed) == ("900", False)
    with pytest.raises(IdempotencyConflict) as e:
        await start(js, topology, digest=start_digest(playbook=None, workload={"n": 2}, affinity=""))
    assert e.value.execution_id == "900"
    assert await start(js, topology) == ("900", seq, True)
    assert await executions(js) == [(seq, "900", "900:requested")]


async def test_a_repeat_answers_the_first_start_even_when_building_a_new_one_fails(
    js: JetStreamContext, topology: Topology
) -> None:
    execution_id, seq, _ = await start(js, topology)
    built: list[str] = []

    async def fresh() -> Envelope:  # built before the claim now (a free key costs no read): must not matter
        built.append("fresh")
        raise LookupError("the playbook is gone")

    def again(record: StartRecord) -> Envelope:
        return requested(record.execution_id, record.event_id)

    store = await IdempotencyStore.open(js)
    once = await store.start(Producer(js, topology), "acme", "web", KEY, digest=DIGEST, fresh=fresh, again=again)
    assert (once.record.execution_id, once.seq, once.replayed, built) == (execution_id, seq, True, ["fresh"])
    with pytest.raises(LookupError):  # a free key: the failure is the answer, and nothing was claimed
        await store.start(Producer(js, topology), "acme", "web", "another", digest=DIGEST, fresh=fresh, again=again)
    assert await store.get("acme", "web", "another") is None
    assert await executions(js) == [(seq, execution_id, f"{execution_id}:requested")]


async def test_a_key_an_operator_deleted_is_free_again(js: JetStreamContext, topology: Topology) -> None:
    first, seq, _ = await start(js, topology)
    await (await js.key_value(IDEMPOTENCY_BUCKET)).delete(scoped_key("acme", "web", KEY))  # leaves a delete marker
    execution_id, again_seq, replayed = await start(js, topology)
    # The first try's claim is refused by the marker and its event dropped; the second claims over the marker.
    assert (first, execution_id, replayed) == ("900", "901", False) and again_seq != seq
    record = await (await IdempotencyStore.open(js)).get("acme", "web", KEY)
    assert record is not None and record.seq == again_seq
    assert await start(js, topology) == ("901", again_seq, True)
    assert [x for _, x, _ in await executions(js)] == ["900", "901"]


def test_key_rules_and_digest() -> None:
    assert check_key("k" * 255) == "k" * 255
    for bad in ("", "k" * 256, "tab\there", "é"):
        with pytest.raises(BadIdempotencyKey):
            check_key(bad)
    assert scoped_key("acme", "web", "a b/c").startswith("acme.web.") and len(scoped_key("acme", "web", "x")) == 73
    assert scoped_key("acme", "web", "x") != scoped_key("acme", "shop", "x")
    same = start_digest(playbook={"path": "p/x"}, workload={"a": 1, "b": [1, {"d": 2, "c": 3}]}, affinity="")
    assert same == start_digest(playbook={"path": "p/x", "version": None}, workload={"b": [1, {"c": 3, "d": 2}], "a": 1}, affinity="")
    assert same != start_digest(playbook={"path": "p/x", "version": 1}, workload={"a": 1, "b": [1, {"d": 2, "c": 3}]}, affinity="")
    assert same != start_digest(playbook={"path": "p/x"}, workload={"a": 1, "b": [1, {"d": 2, "c": 3}]}, affinity="eu")


def test_window_setting() -> None:
    assert StreamSettings.from_env({}).idempotency_window_s == 86400
    assert StreamSettings.from_env({"NOETL_IDEMPOTENCY_WINDOW": "3600"}).idempotency_window_s == 3600
    for bad in ("0", "-5", "40000000", "soon"):
        with pytest.raises(ConfigError):
            StreamSettings.from_env({"NOETL_IDEMPOTENCY_WINDOW": bad})


async def test_bootstrap_sets_the_window_and_refuses_another(nc: NATS) -> None:
    js = nc.jetstream()
    topology = default_topology()
    await bootstrap(js, topology, settings=StreamSettings(idempotency_window_s=60))
    assert (await js.stream_info("KV_idempotency")).config.max_age == 60
    with pytest.raises(BootstrapMismatch) as e:
        await bootstrap(js, topology)
    assert "KV_idempotency.max_age is 60, topology wants 86400" in e.value.problems
