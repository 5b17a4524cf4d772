"""Idempotent starts: one execution per idempotency key within a window, across edges and restarts.

A start under a key (the edge's ``Idempotency-Key`` header on ``POST …/executions``,
``noetl-edge run --idempotency-key``) claims the key in the KV bucket
``idempotency`` before it publishes anything; NATS holds the claim, never an
edge's memory, so every edge and every restart gives the same answer.

Stored form: the KV key is ``<tenant>.<project>.<sha256 of the key, hex>`` (a
key is scoped by tenant and project, and hashed because it may hold
characters KV keys cannot); the value is a :class:`StartRecord` as JSON. The
bucket's ``max_age`` is the retention window (``NOETL_IDEMPOTENCY_WINDOW``
seconds when the bucket is bootstrapped, default 86400): past it NATS forgets
the key and the same key starts a new execution.

Order, so that a crash leaves neither a key pointing at nothing nor two
executions: the atomic KV ``create`` (tried first: a free key costs no read)
decides the one winner and fixes, in the record, the execution id and the
``event_id`` of its ``execution.requested``; the winner then publishes that
event (``Nats-Msg-Id`` = the event id) and records the WAL seq in the record.
A later claimant whose record has no seq yet (the winner is still publishing,
or crashed) looks for the event on the WAL and publishes the same event again
when it is missing; a second copy inside the duplicate window is dropped by
the server.

API (small on purpose):

- :func:`check_key` — the key, or :class:`BadIdempotencyKey` (1 to 255
  printable ASCII characters);
- :func:`start_digest` — the digest of a start request (playbook as asked,
  workload, affinity): the same key with another digest is
  :class:`IdempotencyConflict`;
- :meth:`IdempotencyStore.open` (``js`` of the first cell, where the global
  buckets live), then :meth:`IdempotencyStore.start`, which returns a
  :class:`Start` (``replayed`` says whether the execution was started by an
  earlier request), and :meth:`IdempotencyStore.get`.

>>> check_key("order-1234")
'order-1234'
>>> scoped_key("acme", "web", "order-1234")[:20]
'acme.web.71983129e50'
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
import structlog
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from kernel.errors import KernelError
from kernel.producer import Producer
from locator.envelope import Envelope, now_ts
from locator.subjects import IDEMPOTENCY_BUCKET

log = structlog.get_logger("noetl.edge.idempotency")

MAX_KEY = 255
DEFAULT_WINDOW_S = 86400.0


class IdempotencyError(KernelError):
    """Every failure of an idempotent start, with a one-line message."""


class BadIdempotencyKey(IdempotencyError):
    """The key is empty, longer than 255 characters, or holds a character other than printable ASCII."""


class IdempotencyConflict(IdempotencyError):
    """The key was used within the window for a start with another request body."""

    def __init__(self, message: str, *, execution_id: str) -> None:
        super().__init__(message)
        self.execution_id = execution_id


class StartRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the ``idempotency`` bucket holds for one key (JSON): fixed at the claim, ``seq``/``stream`` once published."""

    execution_id: str
    event_id: str
    digest: str
    playbook: dict[str, Any] | None
    created_at: str
    seq: int | None = None
    stream: str | None = None


class Start(msgspec.Struct, frozen=True, kw_only=True):
    """The execution a start under a key names, where its ``execution.requested`` is, and whether it was a replay."""

    record: StartRecord
    seq: int
    stream: str
    replayed: bool


_decode = msgspec.json.Decoder(StartRecord).decode


def check_key(key: str) -> str:
    """``key`` unchanged, or :class:`BadIdempotencyKey` saying why it is refused.

    >>> check_key("")
    Traceback (most recent call last):
    ...
    edge.idempotency.BadIdempotencyKey: an idempotency key must not be empty
    """
    if not key:
        raise BadIdempotencyKey("an idempotency key must not be empty")
    if len(key) > MAX_KEY:
        raise BadIdempotencyKey(f"an idempotency key has at most {MAX_KEY} characters, this one has {len(key)}")
    if not all(" " <= c <= "~" for c in key):
        raise BadIdempotencyKey("an idempotency key holds printable ASCII characters only (no control characters)")
    return key


def scoped_key(tenant: str, project: str, key: str) -> str:
    """The KV key of ``key`` in a tenant's project (tenant and project names are valid KV tokens)."""
    return f"{tenant}.{project}.{hashlib.sha256(key.encode('ascii')).hexdigest()}"


def start_digest(*, playbook: Mapping[str, Any] | None, workload: Mapping[str, Any], affinity: str) -> str:
    """sha256 of the canonical JSON (keys sorted) of a start request: the playbook as asked (``version`` None
    for the latest), the workload and the affinity. Resolution is not part of it, so a retry after a new
    version was registered is still the same request.

    >>> start_digest(playbook=None, workload={"b": 1, "a": 2}, affinity="") == start_digest(
    ...     playbook=None, workload={"a": 2, "b": 1}, affinity="")
    True
    """
    doc = {"playbook": None if playbook is None else {"path": playbook["path"], "version": playbook.get("version")},
           "workload": workload, "affinity": affinity}
    return hashlib.sha256(msgspec.json.encode(doc, order="sorted")).hexdigest()


class IdempotencyStore:
    """Claims of idempotency keys in the KV bucket ``idempotency``.

    >>> # store = await IdempotencyStore.open(js)
    >>> # start = await store.start(producer, "acme", "web", "order-1", digest=d, fresh=new_env, again=env_of)
    >>> # start.record.execution_id, start.replayed
    """

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> IdempotencyStore:
        try:
            return cls(await js.key_value(IDEMPOTENCY_BUCKET))
        except BucketNotFoundError as e:
            raise IdempotencyError(
                f"KV bucket {IDEMPOTENCY_BUCKET!r} does not exist: bootstrap first (`noetl-edge up` does it)"
            ) from e

    async def _read(self, kv_key: str) -> tuple[StartRecord, int] | None:
        try:
            entry = await self.kv.get(kv_key)
        except KeyNotFoundError:  # never claimed, or forgotten past the window
            return None
        return _decode(entry.value or b""), entry.revision or 0

    async def get(self, tenant: str, project: str, key: str) -> StartRecord | None:
        """The record of ``key`` in the tenant's project, or None (never used, or past the window)."""
        found = await self._read(scoped_key(tenant, project, check_key(key)))
        return None if found is None else found[0]

    async def start(
        self,
        producer: Producer,
        tenant: str,
        project: str,
        key: str,
        *,
        digest: str,
        fresh: Callable[[], Awaitable[Envelope]],
        again: Callable[[StartRecord], Envelope],
    ) -> Start:
        """Start once under ``key``: the first request's execution, whichever edge or process asks.

        ``fresh`` builds the ``execution.requested`` of a new execution (it may resolve and raise: nothing
        is written then). It is called before the claim, so that a free key (the common case) costs the
        claim alone and no read first; it publishes nothing, and when the key turns out to be taken its
        event is dropped unpublished (and, if it raised, the earlier claim answers as if it had not been
        called). ``again`` rebuilds the event from the record of an earlier claim (this request's body is
        the same: the digests matched). Raises :class:`IdempotencyConflict` when the key was claimed with
        another digest.
        """
        kv_key = scoped_key(tenant, project, check_key(key))
        found: tuple[StartRecord, int] | None = None
        tries = 0
        while found is None:
            tries += 1
            try:
                env = await fresh()
                producer.prepare(env)  # an invalid or oversized event raises here, before the claim
            except Exception:
                # A repeat answers what the first request got, whatever building a new start would raise now.
                found = await self._read(kv_key)
                if found is None:
                    raise
                break
            record = StartRecord(execution_id=env.execution_id, event_id=env.event_id, digest=digest,
                                 playbook=env.payload.get("playbook"), created_at=now_ts())
            try:
                revision = await self._claim(kv_key, msgspec.json.encode(record), first=tries == 1)
            except KeyWrongLastSequenceError:  # claimed by an earlier or a concurrent request
                found = await self._read(kv_key)
                continue
            ack = await producer.publish(env)
            await self._settle(kv_key, revision, record, ack.seq, ack.stream)
            log.info("idempotency.started", tenant=tenant, project=project, execution_id=env.execution_id)
            return Start(record=record, seq=ack.seq, stream=ack.stream, replayed=False)
        record, revision = found
        if record.digest != digest:
            raise IdempotencyConflict(
                f"the idempotency key was used for another request (execution {record.execution_id}, started "
                f"{record.created_at}): repeat the same request, or use a new key for a new execution",
                execution_id=record.execution_id,
            )
        if record.seq is not None and record.stream is not None:
            return Start(record=record, seq=record.seq, stream=record.stream, replayed=True)
        seq, stream = await self._publish_again(producer, again(record))
        await self._settle(kv_key, revision, record, seq, stream)
        return Start(record=record, seq=seq, stream=stream, replayed=True)

    async def _claim(self, kv_key: str, value: bytes, *, first: bool) -> int:
        """The revision of a new claim of ``kv_key``; ``KeyWrongLastSequenceError`` when it is taken.

        The first try expects the key to have no message at all: one request (``KeyValue.create`` reads the
        key after every refusal, and a taken key is read here anyway). A later try, after a refusal whose key
        then read as missing (a delete marker: never written by the store, but an operator may), is
        ``create``'s full compare, which claims over the marker.
        """
        if first:
            return await self.kv.update(kv_key, value, last=0)
        return await self.kv.create(kv_key, value)

    async def _publish_again(self, producer: Producer, env: Envelope) -> tuple[int, str]:
        """The WAL position of a claimed execution's ``execution.requested``, published now if it is missing."""
        prepared = producer.prepare(env)
        try:
            msg = await producer.js.get_msg(prepared.stream, subject=prepared.subject)
        except NotFoundError:
            ack = await producer.publish(env)  # the same Nats-Msg-Id: a copy in flight is dropped as a duplicate
            return ack.seq, ack.stream
        return msg.seq or 0, prepared.stream

    async def _settle(self, kv_key: str, revision: int, record: StartRecord, seq: int, stream: str) -> None:
        settled = msgspec.structs.replace(record, seq=seq, stream=stream)
        try:
            await self.kv.update(kv_key, msgspec.json.encode(settled), last=revision)
        except KeyWrongLastSequenceError:
            pass  # another request recorded the same position first
