"""The edge never answers 5xx for bad input: mutated bodies on every route that takes one, odd query
parameters and headers, and reads of an execution with poison among its WAL messages.

In process (httpx's ASGI transport) against a real nats-server; the SSE history is read through a real
Hypercorn on a free port, since the ASGI transport buffers a response until it ends. The mutations come
from seeded generators, so a failure names a body that reproduces it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from starlette.applications import Starlette

from edge.app import create_app
from edge.auth import TokenSpec
from edge.serve import serve, wait_listening
from kernel.dlq import DLQ_SEQ
from kernel.host import context_for, load_plugin, system_manifests
from kernel.producer import Producer
from kernel.pump import Pump
from kernel.scrub import scrub
from natscluster.server import EmbeddedServer, free_port
from locator import default_topology, new_event, shard_for
from locator.command import callback_token
from locator.envelope import Envelope, encode_envelope
from locator.subjects import dlq_stream, wal_stream, wal_subject
from locator.topology import Topology
from projector.cache import KvProjectionCache
from projector.fold import WalEvent, fold
from projector.projection import canonical, decode_projection
from projector.snapshots import SnapshotStore

ADMIN = "tok-fuzz-admin-4c2e91"
H = {"Authorization": f"Bearer {ADMIN}"}
TOKENS = [TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN)]
TENANT, PROJECT = "acme", "web"
SHARD = shard_for(TENANT, PROJECT, "", 4)
EXECUTIONS = f"/api/v1/tenants/{TENANT}/projects/{PROJECT}/executions"
PLAYBOOKS = f"/api/v1/tenants/{TENANT}/projects/{PROJECT}/playbooks"
PROBLEM = "application/problem+json"
MUTANTS = 1000  # per route
GROUP = 25  # requests in flight at once

# --------------------------------------------------------------------------- mutations

# Bytes that are not UTF-8: a lone continuation, an invalid start, a truncated sequence, an overlong
# slash, a UTF-8-encoded surrogate, a code point past U+10FFFF.
NOT_UTF8 = [b"\x80", b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xe2\x82", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]
SURROGATES = [b"\\ud800", b"\\udfff", b"\\ud83d", b"\\udc00\\ud800", b"\\ud800x"]
NUMBERS = [b"1e999", b"-1e999", b"1e-999", b"9" * 5000, b"-" + b"9" * 40, b"1" + b"0" * 400 + b".5", b"-0",
           b"9223372036854775808", b"18446744073709551616", b"0.000000000000000000000000001", b"01", b"1.", b".5"]
NOT_NUMBERS = [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"undefined", b"None", b"True"]
TRAILERS = [b" x", b"{}", b"\x00", b",", b"]", b"}", b"\n\n\n", b" null", b"\xff", b"//", b"/* */"]
BOMS = [b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff"]
PUNCTUATION = b'{}[]:,"\\ \t\n0123456789-+.eEtfnul'
RAW = "\x00raw\x00"  # a placeholder string, replaced by raw bytes after encoding
VALUES: list[Any] = [None, True, False, 0, -1, 2**63, -(2**63) - 1, 1.5, "", "x", "user.note", "\x00", "é\u2028",
                     "a" * 300, [], {}, [None], {"": None}, {"a": {"b": [1, {"c": "d"}]}}]


def _raw(rng: random.Random) -> bytes:
    pick = rng.random()
    if pick < 0.3:
        return rng.choice(NUMBERS)
    if pick < 0.5:
        return rng.choice(NOT_NUMBERS)
    if pick < 0.7:
        return b'"' + rng.choice(SURROGATES) + b'"'
    if pick < 0.85:
        return b'"' + rng.choice(NOT_UTF8) + b'"'
    depth = rng.choice([63, 64, 65, 66, 70, 200, 999, 2000, 20000])
    return b"[" * depth + rng.choice([b"", b"1", b"{}"]) + b"]" * depth


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every node's path in a decoded JSON document (the root is ``()``)."""
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*path, i))
    return out


def _replace(doc: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = new
    return doc


def structural(rng: random.Random, valid: bytes) -> tuple[str, bytes]:
    """A JSON-level mutation of ``valid``: a node's value or key changed, removed, duplicated or made raw."""
    doc = json.loads(valid)
    path = rng.choice(_paths(doc))
    kind = rng.choice(["value", "raw", "raw", "drop", "unknown_key", "duplicate_key", "nest"])
    raw = _raw(rng)
    if kind == "value":
        doc = _replace(doc, path, rng.choice(VALUES))
    elif kind == "raw":
        doc = _replace(doc, path, RAW)
    elif kind == "drop" and path:
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    elif kind == "unknown_key":
        target = doc
        for key in path:
            target = target[key]
        if isinstance(target, dict):
            target[rng.choice(["zz", "v", "type", "payload", "__proto__", ""])] = RAW
    elif kind == "nest":
        inner: Any = rng.choice(VALUES)
        for _ in range(rng.choice([2, 10, 62, 63, 64, 65, 66, 80, 300])):
            inner = [inner] if rng.random() < 0.5 else {"k": inner}
        doc = _replace(doc, path, inner)
    data = msgspec.json.encode(doc)
    if kind == "duplicate_key" and b"{" in data:
        # The same key twice: {"type": <raw>, "type": "user.note", ...} (the decoder keeps the last).
        keys = [p[-1] for p in _paths(doc) if p and isinstance(p[-1], str)] or ["k"]
        at = rng.choice([i for i, b in enumerate(data) if b == ord("{")])
        dup = msgspec.json.encode(rng.choice(keys)) + b":" + raw + (b"" if data[at + 1 : at + 2] == b"}" else b",")
        data = data[: at + 1] + dup + data[at + 1 :]
    return f"structural:{kind}@{list(path)}", data.replace(b'"\\u0000raw\\u0000"', raw)


def bytewise(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """A byte-level mutation: flip, set, insert, delete, duplicate, truncate, or wrap."""
    n = len(data)
    at = rng.randrange(n + 1)
    kind = rng.choice(["flip", "set", "insert", "delete", "duplicate", "truncate", "not_utf8", "surrogate",
                       "bom", "trailing", "deep_prefix", "empty"])
    if kind == "flip" and n:
        at = min(at, n - 1)
        data = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
    elif kind == "set" and n:
        at = min(at, n - 1)
        data = data[:at] + bytes([rng.choice(PUNCTUATION + bytes(range(0x80, 0x100)))]) + data[at + 1 :]
    elif kind == "insert":
        data = data[:at] + bytes(rng.choice(PUNCTUATION) for _ in range(rng.randint(1, 4))) + data[at:]
    elif kind == "delete":
        data = data[:at] + data[at + rng.randint(1, 8) :]
    elif kind == "duplicate":
        end = min(n, at + rng.randint(1, 40))
        data = data[:end] + data[at:end] + data[end:]
    elif kind == "truncate":
        data = data[:at]
    elif kind in ("not_utf8", "surrogate"):
        # Inside a string when there is one: right after an opening quote.
        quotes = [i + 1 for i, b in enumerate(data) if b == ord('"')]
        at = rng.choice(quotes) if quotes else at
        data = data[:at] + rng.choice(NOT_UTF8 if kind == "not_utf8" else SURROGATES) + data[at:]
    elif kind == "bom":
        data = rng.choice(BOMS) + data
    elif kind == "trailing":
        data = data + rng.choice(TRAILERS)
    elif kind == "deep_prefix":
        depth = rng.choice([65, 1000, 5000])
        data = b"[" * depth + data + b"]" * depth * rng.randint(0, 1)
    elif kind == "empty":
        data = rng.choice([b"", b" ", b"\n", b"null", b"[]", b"{}", b"0", b'""', b"false"])
    return f"bytes:{kind}@{at}", data


def mutants(valid: bytes, seed: str, count: int = MUTANTS, *, json_doc: bool = True) -> list[tuple[str, bytes]]:
    """``count`` seeded mutants of ``valid``, each 1 to 3 mutations deep."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    for _ in range(count):
        data, names = valid, []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            try:
                use_structural = json_doc and rng.random() < 0.45
                name, data = structural(rng, data) if use_structural else bytewise(rng, data)
            except (ValueError, IndexError, KeyError, TypeError, RecursionError):  # the last mutation left no JSON to walk
                name, data = bytewise(rng, data)
            names.append(name)
        out.append((" + ".join(names), data))
    return out


# --------------------------------------------------------------------------- fixtures and helpers


def make_app(topology: Topology, tmp_path: Path) -> Starlette:
    return create_app(topology=topology, tokens=TOKENS, snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
                      min_seq_wait=1.0)


@pytest.fixture
async def app(nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[Starlette]:
    a = make_app(default_topology(nats_url=nats_server.url), tmp_path)
    try:
        yield a
    finally:
        await a.state.edge.cells.close()


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://edge", timeout=60) as c:
        yield c


class Outcome(msgspec.Struct):
    status: dict[int, int] = msgspec.field(default_factory=dict)
    bad: list[str] = msgspec.field(default_factory=list)
    ok_bodies: list[Any] = msgspec.field(default_factory=list)


def _judge(outcome: Outcome, name: str, body: bytes, resp: httpx.Response) -> None:
    outcome.status[resp.status_code] = outcome.status.get(resp.status_code, 0) + 1
    media = resp.headers.get("content-type", "").split(";")[0]
    if resp.status_code >= 500:
        outcome.bad.append(f"{resp.status_code} for {name}: {body[:120]!r} -> {resp.text[:300]}")
    elif resp.status_code >= 400:
        problem = resp.json() if media == PROBLEM else None
        if problem is None or problem.get("status") != resp.status_code or not problem.get("detail"):
            outcome.bad.append(f"{resp.status_code} not a problem document for {name}: {body[:120]!r} -> {resp.text[:300]}")
    else:
        outcome.ok_bodies.append(resp.json())


async def send_all(
    client: httpx.AsyncClient, method: str, url: str, cases: list[tuple[str, bytes]], headers: dict[str, str]
) -> Outcome:
    outcome = Outcome()
    for i in range(0, len(cases), GROUP):
        group = cases[i : i + GROUP]
        responses = await asyncio.gather(*(client.request(method, url, content=body, headers=headers) for _, body in group))
        for (name, body), resp in zip(group, responses):
            _judge(outcome, name, body, resp)
    return outcome


def assert_clean(outcome: Outcome, route: str) -> None:
    assert sum(outcome.status.values()) == MUTANTS
    assert not outcome.bad, f"{route}: {len(outcome.bad)} bad answer(s), statuses {outcome.status}:\n" + "\n".join(outcome.bad[:8])
    # Not vacuous: the mutants were refused for being undecodable (400) and for their shape (422).
    assert outcome.status.get(400, 0) >= 50 and outcome.status.get(422, 0) + outcome.status.get(409, 0) >= 20, outcome.status


async def wal_messages(js: JetStreamContext) -> int:
    return sum([(await js.stream_info(wal_stream(n))).state.messages for n in range(4)])


def ev(type: str, execution_id: str, **kw: Any) -> Envelope:
    return new_event(tenant=TENANT, project=PROJECT, execution_id=execution_id, type=type, **kw)


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- mutated bodies, route by route


@pytest.mark.slow
async def test_start_and_events_never_answer_5xx(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    playbook = "path: demo/x\nversion: 1\nsteps:\n  - {name: a, tool: {kind: noop}}\n"
    registered = await client.put(f"{PLAYBOOKS}/demo/x", content=playbook, headers=H | {"Content-Type": "application/yaml"})
    assert registered.status_code == 201, registered.text
    before = await wal_messages(js)
    start = dumps({"playbook": {"path": "demo/x", "version": 1}, "workload": {"n": 1, "s": "text", "l": [1, 2.5, None, True]},
                   "affinity": ""})
    started = await send_all(client, "POST", EXECUTIONS, mutants(start, "start"), H)
    assert_clean(started, "POST executions")
    assert started.status.get(202, 0) >= 20, started.status
    # Bad input changes nothing: the WAL holds one event per 202 and nothing else.
    assert await wal_messages(js) - before == started.status[202]

    execution_id = started.ok_bodies[0]["execution_id"]
    before = await wal_messages(js)
    events = dumps({"events": [{"type": "user.note", "step": "fetch", "attempt": 1, "payload": {"n": 1, "s": "x", "d": {"a": [1, 2]}}},
                               {"type": "step.enter", "step": "fetch", "attempt": 1, "causation_id": "c-1"}]})
    published = await send_all(client, "POST", f"{EXECUTIONS}/{execution_id}/events", mutants(events, "events"), H)
    assert_clean(published, "POST events")
    stored = sum(not ack["duplicate"] for body in published.ok_bodies for ack in body["acks"])
    assert published.status.get(200, 0) >= 20 and await wal_messages(js) - before == stored, published.status


@pytest.mark.slow
async def test_cancel_and_callback_never_answer_5xx(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    producer = Producer(js, default_topology())
    execution_id = "7301"
    command = f"{execution_id}:approve:-:1"
    token = callback_token(TENANT, PROJECT, "", command, "s3cr3t-s3cr3t-s3cr3t")
    waiting = ev("callback.waiting", execution_id, step="approve", attempt=1, event_id=f"{command}:waiting",
                 payload={"command_id": command, "iteration": None, "callback_id": token})
    received = ev("callback.received", execution_id, step="approve", attempt=1, payload={"command_id": command})
    await producer.publish(ev("execution.started", execution_id))
    # Poison among the events the callback route looks up: skipped, as the pump skips it. Neither a waiting
    # event that is not UTF-8 nor a "received" that is not a valid envelope may answer for the callback.
    for type, data in (("callback.waiting", encode_envelope(waiting).replace(b'"approve"', b'"appr\xffove"', 1)),
                       ("callback.received", encode_envelope(received).replace(b'"v":1', b'"v":2')),
                       ("execution.completed", b"[" * 3000 + b"]" * 3000)):
        await js.publish(wal_subject(SHARD, TENANT, PROJECT, execution_id, type), data)
    await producer.publish(waiting)
    before = await wal_messages(js)
    body = dumps({"approved": True, "by": "ada", "note": [1, {"x": None}], "n": 3.25})
    resumed = await send_all(client, "POST", f"/api/v1/callbacks/{token}", mutants(body, "callback"), H)
    assert_clean(resumed, "POST callback")
    assert resumed.status.get(202) == 1 and resumed.status.get(409, 0) >= 20, resumed.status  # one use, then refused
    assert await wal_messages(js) - before == 1

    cancels = mutants(dumps({"reason": "stop", "by": "ops"}), "cancel")
    cancelled = await send_all(client, "POST", f"{EXECUTIONS}/{execution_id}/cancel", cancels, H)
    # The cancel route reads no body: every mutant is one idempotent request (the first is stored, the rest are duplicates).
    assert not cancelled.bad and cancelled.status == {202: MUTANTS}, (cancelled.status, cancelled.bad[:5])
    assert await wal_messages(js) - before == 2


@pytest.mark.slow
async def test_playbook_registration_never_answers_5xx(client: httpx.AsyncClient) -> None:
    doc = {"path": "demo/fuzz", "version": 1, "workload": {"n": 2},
           "steps": [{"name": "a", "tool": {"kind": "noop", "result": "hi"}, "next": [{"step": "b", "when": "{{ workload.n > 1 }}"}]},
                     {"name": "b", "tool": {"kind": "noop", "result": "{{ steps.a.result }}"}}]}
    as_json = await send_all(client, "PUT", f"{PLAYBOOKS}/demo/fuzz", mutants(dumps(doc), "playbook-json"), H)
    assert_clean(as_json, "PUT playbook (JSON)")
    text = ("path: demo/fuzz\nversion: 1\nworkload: {n: 2}\nsteps:\n"
            "  - name: a\n    tool: {kind: noop, result: hi}\n    next: [{step: b, when: '{{ workload.n > 1 }}'}]\n"
            "  - {name: b, tool: {kind: noop, result: '{{ steps.a.result }}'}}\n").encode()
    yaml_cases = mutants(text, "playbook-yaml", json_doc=False)
    # YAML's own hazards: aliases, tags, deep flow and block nesting, tabs.
    rng = random.Random("yaml")
    extras = [b"a: &x [1]\nb: *x\n", b"!!python/object:os.system ls", b"path: !!binary aGk=\n", b"[" * 5000,
              b"- " * 3000 + b"x", b"".join(b" " * i + b"k:\n" for i in range(2000)), b"\tpath: x", b"{" * 200 + b"}" * 200]
    for i, extra in enumerate(extras * 5):
        yaml_cases[rng.randrange(MUTANTS)] = (f"yaml:{i % len(extras)}", extra)
    as_yaml = await send_all(client, "PUT", f"{PLAYBOOKS}/demo/fuzz", yaml_cases, H | {"Content-Type": "application/yaml"})
    assert_clean(as_yaml, "PUT playbook (YAML)")


# --------------------------------------------------------------------------- the limits the problems name


def nested(depth: int) -> Any:
    """A value with ``depth`` levels of containers (a dict is level 1)."""
    value: Any = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


async def test_undecodable_bodies_name_a_reason_and_deep_payloads_their_field(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    await Producer(js, default_topology()).publish(ev("execution.started", "7501"))
    events = f"{EXECUTIONS}/7501/events"
    for body, reason in ((b'{"type": "user.x", "payload": {"s": "\xff"}}', "not_utf8"), (b'{"type": "user.x"} x', "not_json"),
                         (b'{"type": "user.x", "payload": {"s": "\\ud800"}}', "not_json"), (b"\xef\xbb\xbf{}", "not_json"),
                         (b'{"n": NaN}', "not_json"), (b'{"n": 1e999}', "not_json"), (dumps(nested(68)), "too_deep"),
                         (b"[" * 5000 + b"]" * 5000, "too_deep")):
        resp = await client.post(events, content=body, headers=H)
        assert resp.status_code == 400 and resp.json()["reason"] == reason, (body[:60], resp.text)
        assert resp.headers["content-type"] == PROBLEM
    # A payload of 64 levels is an event; 65 is not (422 naming the field), also inside a body that is shallow enough.
    ok = await client.post(events, content=dumps({"events": [{"type": "user.x", "payload": nested(64)}]}), headers=H)
    assert ok.status_code == 200, ok.text
    deep = await client.post(events, content=dumps({"type": "user.x", "payload": nested(65)}), headers=H)
    assert deep.status_code == 422 and deep.json()["errors"][0]["field"] == "payload", deep.text
    # A start's workload is a payload member: 63 levels fit, 64 do not (nothing is published).
    before = await wal_messages(js)
    started = await client.post(EXECUTIONS, content=dumps({"workload": nested(63)}), headers=H)
    assert started.status_code == 202, started.text
    refused = await client.post(EXECUTIONS, content=dumps({"workload": nested(64)}), headers=H)
    assert refused.status_code == 422 and refused.json()["field"] == "payload", refused.text
    for body, field in (({"workload": [1]}, "workload"), ({"nope": 1}, "$"), ([], "$"), ({"playbook": {"path": "a", "version": 0}}, "playbook.version")):
        resp = await client.post(EXECUTIONS, content=dumps(body), headers=H)
        assert resp.status_code == 422 and resp.json()["field"] == field, resp.text
    assert await wal_messages(js) - before == 1


# --------------------------------------------------------------------------- odd query parameters, headers, paths


async def test_odd_query_parameters_headers_and_paths_are_4xx(client: httpx.AsyncClient, js: JetStreamContext) -> None:
    await Producer(js, default_topology()).publish_many([ev("execution.started", "7401"), ev("step.enter", "7401", step="a")])
    one = f"{EXECUTIONS}/7401"
    long, over = "9" * 5000, str(2**63)
    token = callback_token(TENANT, PROJECT, "", f"7401:a:{'9' * 30}:1", "s3cr3t-s3cr3t-s3cr3t")
    cases: list[tuple[str, str, dict[str, str]]] = [
        *[("GET", f"{one}?{name}={value}", {}) for name in ("min_seq", "as_of_seq") for value in (long, over, "٣", "²", "-1", "1e3", "0x10", " 1", "0")],
        *[("GET", f"{one}{route}?{name}={value}", {}) for route in ("/events", "/timeline") for name in ("after_seq", "limit")
          for value in (long, over, "٣", "-1", "0", "1001")],
        *[("GET", f"{one}/timeline?{q}", {}) for q in (f"until_seq={long}", "step=%00", f"step={'a' * 300}", "step=a.b", "until_seq=0")],
        *[("GET", f"{one}?affinity={a}", {}) for a in ("a.b", "%ff", "*", "A", "a" * 100, "%C0%AF")],
        *[("GET", f"{one}/stream", {"Last-Event-ID": value}) for value in (long, over, "-1", "١", "1.5", "9" * 19)],
        ("GET", f"{one}/stream?after_seq={long}", {}),
        *[("GET", f"{PLAYBOOKS}/demo/x?version={v}", {}) for v in (long, "0", "latest2", "٣", str(2**53 + 1))],
        *[("GET", f"{EXECUTIONS}/{eid}", {}) for eid in (long, "-1", "%ff", "0", "01", "1.5", over)],
        *[("GET", f"/api/v1/locate?tenant={t}&project=web", {}) for t in ("%ff", "a.b", "", "a" * 100)],
        *[("POST", f"/api/v1/callbacks/{t}", {}) for t in ("a.b", "%ff.%ff", "x" * 5000 + ".s3cr3t-s3cr3t-s3cr3t", token, "." * 3)],
        *[("GET", one, {"Authorization": a}) for a in ("Bearer", "Basic eDp5", "Bearer \xe9\xe9", "bearer  " + ADMIN + " x", "")],
        ("GET", one, {"If-None-Match": '"' * 5000}),
        ("POST", f"{one}/events", {"Content-Length": long}),
        ("POST", f"{one}/events", {"Content-Type": "application/yaml\x7f"}),
    ]
    outcome = Outcome()
    for method, url, headers in cases:
        async with asyncio.timeout(30):
            # httpx sends str header values as ASCII: all go as bytes (Latin-1 if they can, else UTF-8).
            raw = [(k.encode(), v.encode("latin-1" if max(map(ord, v), default=0) < 256 else "utf-8"))
                   for k, v in (H | headers).items()]
            resp = await client.request(method, url, headers=raw, content=b"{}" if method == "POST" else None)
        _judge(outcome, f"{method} {url[:120]} {headers!r:.80}", b"", resp)
    assert not outcome.bad, "\n".join(outcome.bad)
    assert outcome.status.get(422, 0) > 40 and outcome.status.get(401, 0) >= 4, outcome.status


# --------------------------------------------------------------------------- reading an execution with poison on its subject

POISON_ID = "8801"


def _with(env: Envelope, placeholder: bytes, raw: bytes) -> bytes:
    data = encode_envelope(env)
    assert data.count(placeholder) == 1
    return data.replace(placeholder, raw)


def poison(execution_id: str) -> list[tuple[str, str, bytes]]:
    """(name, subject type, bytes) of messages every reader must skip: the pump dead-letters each."""
    note = ev("user.note", execution_id, payload={"s": "PLACE"})
    step = ev("step.enter", execution_id, step="fetch", attempt=1)
    valid = encode_envelope(note)
    return [
        ("invalid UTF-8 in a string", "user.note", _with(note, b'"PLACE"', b'"\xff\xfe ok"')),
        ("invalid UTF-8 in a key", "user.note", valid.replace(b'"s":', b'"\xc3\x28":')),
        ("a lone surrogate escape", "user.note", _with(note, b'"PLACE"', b'"\\ud800"')),
        ("nested 2,000 deep", "user.note", _with(note, b'"PLACE"', b"[" * 2000 + b"]" * 2000)),
        ("nested one level too deep", "user.note", _with(note, b'"PLACE"', b"[" * 64 + b"]" * 64)),
        ("NaN", "user.note", _with(note, b'"PLACE"', b"NaN")),
        ("a number out of range", "user.note", _with(note, b'"PLACE"', b"1e999")),
        ("not JSON", "user.note", b"\x00\x01 not json {"),
        ("empty", "user.note", b""),
        ("a BOM", "user.note", b"\xef\xbb\xbf" + valid),
        ("trailing data", "user.note", valid + b" trailing"),
        ("valid JSON, not an envelope", "user.note", b'{"hello": "world"}'),
        ("a JSON array", "user.note", b"[1, 2, 3]"),
        ("envelope v2", "user.note", valid.replace(b'"v":1', b'"v":2')),
        ("attempt 0", "step.enter", encode_envelope(step).replace(b'"attempt":1', b'"attempt":0')),
        ("a ts without a zone", "user.note", valid.replace(b'Z"', b'"', 1)),
        ("a type the subject disagrees with", "user.other", valid),
        ("another execution's event", "user.note", encode_envelope(ev("user.note", "8802"))),
    ]


def odd_but_valid(execution_id: str) -> list[Envelope]:
    """Events the decoder accepts that stress what comes after it: the fold, the scrub, summaries, encoding."""
    deep: Any = "bottom"
    for _ in range(62):
        deep = {"k": deep}
    return [
        ev("execution.started", execution_id, payload={"playbook": ["not", "an", "object"]}),
        ev("step.enter", execution_id, step="fetch", attempt=1, ts="2026-11-22T08:00:00.000+14:00"),
        ev("user.deep", execution_id, payload={"deep": deep}),
        ev("execution.requested", execution_id, payload={"playbook": "x" * 500, "workload": [1]}),
        ev("step.exit", execution_id, step="fetch", attempt=2**31 - 1, result_ref=None,
           payload={"result": {"big": -(10**30), "password": "hunter2", "s": "\u2028\x00é"}}),
        ev("call.error", execution_id, step="other", payload={"error": "just a string", "iteration": True}),
        ev("callback.waiting", execution_id, step="wait", payload={"callback_id": "é" * 40, "command_id": 5, "timeout_s": None}),
        ev("user.big", execution_id, payload={"n": 2**64, "f": 1e308, "neg": -0.0, "list": [[[]]] * 50}),
        ev("command.claimed", execution_id, step="fetch", causation_id="c" * 128, payload={"worker": {"not": "a str"}}),
        ev("execution.completed", execution_id, ts="1970-01-01T00:00:00Z"),
    ]


async def sse_ids(base_url: str, url: str, last: int, headers: dict[str, str]) -> list[int]:
    """The ids of an SSE stream up to and including ``last`` (bounded wait)."""
    ids: list[int] = []
    async with httpx.AsyncClient(base_url=base_url, headers=H | headers, timeout=30) as sse:
        async with sse.stream("GET", url) as resp:
            assert resp.status_code == 200, await resp.aread()

            async def read() -> None:
                async for line in resp.aiter_lines():
                    if line.startswith("id: "):
                        ids.append(int(line[4:]))
                        if ids[-1] >= last:
                            return

            await asyncio.wait_for(read(), 20)
    return ids


def served(p: Any) -> Any:
    """What the edge serves of a projection: its JSON, through the response scrub."""
    return scrub(msgspec.to_builtins(p))


async def check_reads(client: httpx.AsyncClient, valid: list[WalEvent], poison_seqs: list[int], *, source: str | None = None) -> None:
    """Every read of the execution answers 200 with exactly its valid events; poison changes nothing."""
    url = f"{EXECUTIONS}/{POISON_ID}"
    seqs = [e.seq for e in valid]
    expected = fold(None, valid)
    assert expected is not None
    resp = await client.get(url, headers=H)
    assert resp.status_code == 200, resp.text
    assert source is None or resp.headers["x-noetl-source"] == source
    assert msgspec.json.decode(resp.content) == served(expected)
    # as_of_seq at every seq, poison or not, and min_seq at a poison seq below the last valid one.
    for at in range(seqs[0], max(seqs + poison_seqs) + 1):
        resp = await client.get(url, params={"as_of_seq": at}, headers=H)
        assert resp.status_code == 200, (at, resp.text)
        want = fold(None, [e for e in valid if e.seq <= at])
        assert msgspec.json.decode(resp.content) == served(want), at
    for at in [s for s in poison_seqs if s < seqs[-1]][:3] + [seqs[-1]]:
        resp = await client.get(url, params={"min_seq": at}, headers=H)
        assert resp.status_code == 200 and decode_projection(resp.content).last_seq == seqs[-1], resp.text
    # The events page and the timeline, paged 3 at a time, and resumed after every poison seq.
    for route, key in (("events", "events"), ("timeline", "rows")):
        got: list[int] = []
        after: int | None = 0
        while after is not None:
            resp = await client.get(f"{url}/{route}", params={"after_seq": after, "limit": 3}, headers=H)
            assert resp.status_code == 200, resp.text
            got += [item["seq"] for item in resp.json()[key]]
            after = resp.json()["next_after_seq"]
        assert got == seqs, route
        for at in poison_seqs:
            resp = await client.get(f"{url}/{route}", params={"after_seq": at, "limit": 2}, headers=H)
            assert resp.status_code == 200, resp.text
            assert [item["seq"] for item in resp.json()[key]] == [s for s in seqs if s > at][:2], (route, at)
    resp = await client.get(f"{url}/timeline", params={"step": "fetch", "until_seq": max(poison_seqs)}, headers=H)
    assert resp.status_code == 200 and resp.json()["rows"], resp.text
    resp = await client.get(f"{url}/steps/fetch/result", headers=H)
    assert resp.status_code == 200 and resp.json()["result"]["password"] == "***", resp.text


@pytest.mark.slow
async def test_reads_of_an_execution_with_poison_serve_its_valid_events(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path, pump_until: Callable[..., Any]
) -> None:
    topology = default_topology(nats_url=nats_server.url)
    producer = Producer(js, topology)
    valid: list[WalEvent] = []
    poison_seqs: list[int] = []
    bad = poison(POISON_ID)
    for i, env in enumerate(odd_but_valid(POISON_ID)):
        valid.append(WalEvent((await producer.publish(env)).seq, env))
        for _, type, data in bad[2 * i : 2 * i + 2]:  # poison between every two valid events
            ack = await js.publish(wal_subject(SHARD, TENANT, PROJECT, POISON_ID, type), data)
            poison_seqs.append(ack.seq)
    assert len(poison_seqs) == len(bad)

    store = SnapshotStore(f"file://{tmp_path}/objects")
    app = create_app(topology=topology, tokens=TOKENS, snapshots=store, min_seq_wait=1.0)
    served = create_app(topology=topology, tokens=TOKENS, snapshots=store)  # the same edge, served by Hypercorn
    bind, stop = f"127.0.0.1:{free_port()}", asyncio.Event()
    server = asyncio.create_task(serve(served, [bind], stop))
    try:
        await wait_listening(bind)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://edge", timeout=30) as client:
            # Nothing folded yet: every read replays the WAL.
            await check_reads(client, valid, poison_seqs, source="replay")
            seqs = [e.seq for e in valid]
            stream = f"{EXECUTIONS}/{POISON_ID}/stream"
            assert await sse_ids(f"http://{bind}", stream, seqs[-1], {}) == seqs
            resume = poison_seqs[len(poison_seqs) // 2]
            assert await sse_ids(f"http://{bind}", stream, seqs[-1], {"Last-Event-ID": str(resume)}) == [s for s in seqs if s > resume]

            # The kernel folds the same events and dead-letters exactly the poison the reads skipped.
            cache = await KvProjectionCache.open(js, SHARD)
            manifests = {m.path: m for m in system_manifests()}

            def pumps(*names: str) -> list[Pump]:
                return [Pump(js, shard=SHARD, shard_count=4, plugin=load_plugin(manifests[n]), consumer=manifests[n].consumer, source=manifests[n].source,
                             ctx=context_for(manifests[n], SHARD, cache=cache, snapshots=store), linger=0.05, fetch_wait=0.2)
                        for n in names]

            async def folded() -> bool:
                entry = await cache.get(POISON_ID)
                return entry is not None and entry.last_seq == seqs[-1]

            await pump_until(pumps("system/project"), folded)
            await check_reads(client, valid, poison_seqs, source="cache")
            dlq = await js.stream_info(dlq_stream(SHARD))
            dead = [int(((await js.get_msg(dlq_stream(SHARD), n)).headers or {})[DLQ_SEQ]) for n in range(1, dlq.state.last_seq + 1)]
            assert sorted(dead) == poison_seqs

            async def pointed() -> bool:
                entry = await cache.get(POISON_ID)
                return entry is not None and entry.pointer is not None

            await pump_until(pumps("system/project", "system/materialize"), pointed)
            await check_reads(client, valid, poison_seqs, source="snapshot")
            # A snapshot older than the WAL, with poison in its tail: the tail is folded, the poison skipped.
            for _, type, data in bad[:3]:
                poison_seqs.append((await js.publish(wal_subject(SHARD, TENANT, PROJECT, POISON_ID, type), data)).seq)
            late = ev("user.late", POISON_ID)
            valid.append(WalEvent((await producer.publish(late)).seq, late))
            poison_seqs.append((await js.publish(wal_subject(SHARD, TENANT, PROJECT, POISON_ID, "user.note"), bad[3][2])).seq)
            await check_reads(client, valid, poison_seqs, source="replay")
    finally:
        stop.set()
        await asyncio.wait_for(server, 15)
        await app.state.edge.cells.close()
