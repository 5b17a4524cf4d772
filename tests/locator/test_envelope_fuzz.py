"""The WAL decoder is total: any bytes are a valid envelope or poison with a reason, and never raise anything else.

Hypothesis draws batches of inputs (so that well over 100,000 inputs run in a
few seconds): arbitrary bytes, valid envelopes with bytes flipped, inserted,
deleted or cut, invalid UTF-8 in keys and values, lone surrogates (raw and
escaped), huge numbers, NaN, deep nesting, duplicate keys, a BOM and trailing
data. What decodes must also survive everything downstream that a consumer
does with it (the scrub, the fold, canonical encoding, a re-encode).
"""

from __future__ import annotations

import json
import random
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel.scrub import scrub_envelope
from locator.envelope import (
    MAX_DEPTH,
    NOT_JSON,
    NOT_UTF8,
    POISON_REASONS,
    TOO_DEEP,
    Envelope,
    EnvelopeError,
    decode_wal_message,
    encode_envelope,
    new_event,
    subject_for,
)
from projector.fold import WalEvent, fold
from projector.projection import canonical

SHARDS = 4
BATCH = 50
SEEDED_BATCH = 500
# Inputs per strategy: examples x batch. Generating structured inputs costs hypothesis far more than
# classifying them, so the cheap strategies carry most of the count (125,000 in all).
PLAN = {"arbitrary": (400, BATCH), "mutated": (100, BATCH), "spliced": (100, BATCH), "shaped": (300, BATCH),
        "seeded": (150, SEEDED_BATCH)}

BASES = [
    new_event(tenant="acme", project="web", execution_id="42", type="user.note", payload={"i": "x", "n": [1, 2.5, None]}),
    new_event(tenant="acme", project="web", execution_id="42", type="step.exit", step="fetch", attempt=1,
              payload={"result": {"rows": 3, "ok": True}}, causation_id="c-1"),
    new_event(tenant="t-1", project="p_2", execution_id="7", affinity="eu", type="execution.requested",
              payload={"playbook": {"path": "demo/linear", "version": 1}, "workload": {"k": "v"}}),
]
SUBJECTS = [subject_for(b, SHARDS) for b in BASES]
ENCODED = [encode_envelope(b) for b in BASES]
seen = {"inputs": 0, "valid": 0}
reasons: dict[str, int] = {}


def classify(subject: str, data: bytes) -> str:
    """The decoder's verdict, after checking it is total and that a valid envelope survives every consumer."""
    seen["inputs"] += 1
    try:
        env = decode_wal_message(subject, data, shard_count=SHARDS)
    except EnvelopeError as e:
        assert e.reason in POISON_REASONS, e.reason
        reasons[e.reason] = reasons.get(e.reason, 0) + 1
        return e.reason
    seen["valid"] += 1
    assert isinstance(env, Envelope)
    again = msgspec.json.decode(encode_envelope(env, payload_cap=1 << 30), type=Envelope)
    assert again == env
    scrub_envelope(env)
    folded = fold(None, [WalEvent(1, env)])
    assert folded is not None and folded.event_count == 1
    canonical(folded)
    return "valid"


def json_values() -> st.SearchStrategy[object]:
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=12,
    )


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, position, value in ops:
        at = position % (len(out) + 1)
        if kind == 0 and out:
            out[at % len(out)] ^= value or 1  # flip bits
        elif kind == 1:
            out[at:at] = bytes([value])  # insert a byte
        elif kind == 2:
            del out[at:at + 1 + value % 4]  # delete a few
        elif kind == 3:
            del out[at:]  # truncate
        else:
            out[at:at] = (b"\xff", b"\xc3", b"\xed\xa0\x80", b"\\ud800", b"\xef\xbb\xbf", b"\x00")[value % 6]
    return bytes(out)


def _seeded(seed: int) -> list[tuple[str, bytes]]:
    """A batch of mutated envelopes from one drawn seed: the cheapest way to many inputs per example."""
    rng = random.Random(seed)
    batch = []
    for _ in range(SEEDED_BATCH):
        i = rng.randrange(len(BASES))
        ops = [(rng.randrange(5), rng.randrange(10_000), rng.randrange(256)) for _ in range(rng.randint(1, 4))]
        batch.append((SUBJECTS[i], mutate(ENCODED[i], ops)))
    return batch


op = st.tuples(st.integers(0, 4), st.integers(0, 10_000), st.integers(0, 255))
mutated = st.tuples(st.integers(0, len(BASES) - 1), st.lists(op, min_size=1, max_size=4)).map(
    lambda t: (SUBJECTS[t[0]], mutate(ENCODED[t[0]], t[1]))
)
arbitrary = st.tuples(st.sampled_from(SUBJECTS + ["wal.0.x", "", "wal.9.acme.web.42.user.note"]), st.binary(max_size=200))


def _spliced(t: tuple[int, str, object]) -> tuple[str, bytes]:
    """A base envelope whose payload holds a generated value (NaN, huge ints, odd text) under key ``k``."""
    i, key, value = t
    doc = json.loads(ENCODED[i])
    doc["payload"][key] = value
    return SUBJECTS[i], json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")


spliced = st.tuples(st.integers(0, len(BASES) - 1), st.text(max_size=8), json_values()).map(_spliced)


def _shaped(t: tuple[int, int, int]) -> tuple[str, bytes]:
    """One of the known poison shapes, at a drawn size or position."""
    i, shape, n = t
    data, subject = ENCODED[i], SUBJECTS[i]
    body = data[1:]
    match shape:
        case 0:  # invalid UTF-8 in a value
            return subject, data.replace(b'"payload":{', b'"payload":{"bad":"\xff\xfe",', 1)
        case 1:  # invalid UTF-8 in a key
            return subject, data.replace(b'"payload":{', b'"payload":{"\xc3\x28":1,', 1)
        case 2:  # deep nesting, from just over the limit to far past the decoder's own
            depth = MAX_DEPTH + 1 + n * 37
            return subject, data.replace(b'"payload":{', b'"payload":{"d":' + b"[" * depth + b"]" * depth + b",", 1)
        case 3:  # duplicate keys (the last wins, as in every JSON parser that allows them)
            return subject, b'{"v":1,"v":1,' + body
        case 4:  # a BOM
            return subject, b"\xef\xbb\xbf" + data
        case 5:  # trailing data
            return subject, data + b" x" * (1 + n % 3)
        case 6:  # huge numbers: past a float's range, past the digits an int may have, or a big int that is fine
            big = (b"1e999", b"-1e999", b"1" + b"0" * (5000 + n), b"1" + b"0" * (40 + n))[n % 4]
            return subject, data.replace(b'"payload":{', b'"payload":{"big":' + big + b",", 1)
        case 7:  # NaN and Infinity are not JSON
            return subject, data.replace(b'"payload":{', b'"payload":{"x":NaN,', 1)
        case 8:  # a lone surrogate, escaped and raw
            return subject, data.replace(b'"payload":{', (b'"payload":{"s":"\\udc80",', b'"payload":{"s":"\xed\xb2\x80",')[n % 2], 1)
        case 9:  # an envelope on the wrong subject
            return SUBJECTS[(i + 1) % len(SUBJECTS)], data
        case _:  # an empty message
            return subject, b""


shaped = st.tuples(st.integers(0, len(BASES) - 1), st.integers(0, 10), st.integers(0, 60)).map(_shaped)


def run_batches(name: str, strategy: st.SearchStrategy[list[tuple[str, bytes]]]) -> None:
    examples, _ = PLAN[name]

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(batch: list[tuple[str, bytes]]) -> None:
        for subject, data in batch:
            classify(subject, data)

    run()


def test_every_input_is_classified_and_none_raises() -> None:
    def listed(s: st.SearchStrategy[tuple[str, bytes]]) -> st.SearchStrategy[list[tuple[str, bytes]]]:
        return st.lists(s, min_size=BATCH, max_size=BATCH)

    for name, strategy in (("arbitrary", listed(arbitrary)), ("mutated", listed(mutated)), ("spliced", listed(spliced)),
                           ("shaped", listed(shaped)), ("seeded", st.integers(0, 2**32).map(_seeded))):
        run_batches(name, strategy)
    assert seen["inputs"] >= 100_000, seen
    # Both sides of the line were exercised: the generators are not all poison, nor all valid.
    assert seen["valid"] > 1_000 and sum(reasons.values()) > 50_000, (seen, reasons)
    assert {NOT_UTF8, NOT_JSON, TOO_DEEP, "invalid_envelope", "subject_mismatch"} <= reasons.keys(), reasons


def test_known_shapes_get_their_reason() -> None:
    data, subject = ENCODED[0], SUBJECTS[0]
    cases = {
        NOT_UTF8: [_shaped((0, 0, 0))[1], _shaped((0, 1, 0))[1], _shaped((0, 8, 1))[1]],
        TOO_DEEP: [_shaped((0, 2, 0))[1], _shaped((0, 2, 60))[1], _shaped((0, 2, 200))[1]],
        NOT_JSON: [b"", b"\xef\xbb\xbf" + data, data + b" x", _shaped((0, 7, 0))[1], _shaped((0, 8, 0))[1], b"{" * 5],
        "invalid_envelope": [_shaped((0, 6, 0))[1], _shaped((0, 6, 1))[1], _shaped((0, 6, 2))[1], b"{}", b"[]", b"1", data.replace(b'"v":1', b'"v":2')],
    }
    for reason, inputs in cases.items():
        for raw in inputs:
            assert classify(subject, raw) == reason, (reason, raw[:80])
    assert classify(SUBJECTS[1], data) == "subject_mismatch"
    assert classify(SUBJECTS[1], ENCODED[1].replace(b'"attempt":1', b'"attempt":' + b"9" * 30)) == "invalid_envelope"
    assert classify(subject, _shaped((0, 3, 0))[1]) == "valid"  # duplicate keys: the last one wins
    assert classify(subject, _shaped((0, 6, 3))[1]) == "valid"  # a 41-digit integer is JSON, kept exactly
    # Just at the limit is fine; one more level is poison.
    at = MAX_DEPTH - 1  # the payload object itself is the first level
    ok = data.replace(b'"payload":{', b'"payload":{"d":' + b"[" * at + b"]" * at + b",", 1)
    assert classify(subject, ok) == "valid"
    over = data.replace(b'"payload":{', b'"payload":{"d":' + b"[" * (at + 1) + b"]" * (at + 1) + b",", 1)
    assert classify(subject, over) == TOO_DEEP
    # Brackets inside strings do not count as nesting.
    quoted = data.replace(b'"payload":{', b'"payload":{"s":"' + b"[{" * 500 + b'\\"",', 1)
    assert classify(subject, quoted) == "valid"
