from __future__ import annotations

import json

import pytest

from locator import (
    EnvelopeError,
    PayloadTooLarge,
    SubjectMismatch,
    check_subject,
    decode_envelope,
    encode_envelope,
    envelope_from_dict,
    new_event,
    subject_for,
)


def good() -> dict[str, object]:
    return {
        "v": 1,
        "event_id": "e-1",
        "execution_id": "42",
        "tenant": "acme",
        "project": "web",
        "affinity": "",
        "type": "step.exit",
        "step": "fetch",
        "attempt": 1,
        "ts": "2026-11-22T08:00:00.000Z",
        "payload": {"rows": 3},
        "result_ref": None,
        "causation_id": None,
    }


def test_round_trip_and_unknown_fields_tolerated() -> None:
    doc = good() | {"producer": "go-client", "extra": {"x": 1}}
    env = decode_envelope(json.dumps(doc))
    assert env.type == "step.exit" and env.payload == {"rows": 3}
    assert decode_envelope(encode_envelope(env)) == env


def test_new_event_fills_id_and_ts() -> None:
    env = new_event(tenant="acme", project="web", execution_id="1", type="user.note")
    assert len(env.event_id) == 32 and env.ts.endswith("Z") and env.payload == {}


@pytest.mark.parametrize("missing", ["v", "event_id", "execution_id", "tenant", "project", "type", "ts"])
def test_missing_required_field_named(missing: str) -> None:
    doc = good()
    del doc[missing]
    with pytest.raises(EnvelopeError) as e:
        decode_envelope(json.dumps(doc))
    assert e.value.field == missing and missing in str(e.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("v", 2),
        ("v", "1"),
        ("event_id", ""),
        ("event_id", "has space"),
        ("execution_id", "abc"),
        ("execution_id", "99999999999999999999"),
        ("tenant", "Acme"),
        ("project", "a.b"),
        ("affinity", "*"),
        ("type", "nonsense"),
        ("type", "user."),
        ("type", "user.a b"),
        ("step", "a.b"),
        ("attempt", 0),
        ("attempt", "one"),
        ("ts", "yesterday"),
        ("ts", "2026-11-22T08:00:00"),
        ("payload", [1, 2]),
    ],
)
def test_bad_field_named(field: str, value: object) -> None:
    doc = good() | {field: value}
    with pytest.raises(EnvelopeError) as e:
        decode_envelope(json.dumps(doc))
    assert e.value.field == field, str(e.value)


def test_not_json() -> None:
    with pytest.raises(EnvelopeError, match="not valid JSON") as e:
        decode_envelope(b"{nope")
    assert e.value.field == "$"


def test_payload_cap() -> None:
    env = envelope_from_dict(good() | {"payload": {"blob": "x" * (64 * 1024)}})
    with pytest.raises(PayloadTooLarge) as e:
        encode_envelope(env)
    assert e.value.field == "payload" and e.value.cap == 65536 and "result_ref" in str(e.value)
    # A payload just under the cap passes even though the whole message is over it.
    near = envelope_from_dict(good() | {"payload": {"b": "x" * (64 * 1024 - 20)}})
    assert len(encode_envelope(near)) > 64 * 1024
    assert encode_envelope(env, payload_cap=128 * 1024)


def test_subject_agreement() -> None:
    env = envelope_from_dict(good())
    subject = subject_for(env, 4)
    check_subject(subject, env, shard_count=4)
    other_exec = subject.replace(".42.", ".43.")
    with pytest.raises(SubjectMismatch) as e:
        check_subject(other_exec, env)
    assert e.value.field == "execution_id"
    with pytest.raises(SubjectMismatch) as e:
        check_subject(subject.replace("step.exit", "step.enter"), env)
    assert e.value.field == "type"
    wrong_shard = "wal.9." + subject.split(".", 2)[2]
    with pytest.raises(SubjectMismatch) as e:
        check_subject(wrong_shard, env, shard_count=4)
    assert e.value.field == "shard"
    with pytest.raises(SubjectMismatch):
        check_subject("in.acme.web.42.step.exit", env)
