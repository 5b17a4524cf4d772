"""The warm projection cache: KV ``proj_<shard>``, keyed by execution id, fenced by revision.

A value is the projection's canonical JSON, or a pointer to its row in a
Feather segment — once a terminal execution has been materialized, or when the
projection is larger than a KV value may be (:class:`EntryTooLarge`)::

    {"last_seq": 17, "pointer": {"row": 3, "segment": "file:///…/x.feather"}, "status": "COMPLETED"}
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, InvalidKeyError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from locator.subjects import proj_bucket
from projector.errors import ProjectorError
from projector.projection import Projection, canonical, decode_projection


# Room left under the server's max_payload for the headers of a KV write (the server counts them, the client does not).
VALUE_HEADROOM = 4 * 1024
# JetStream's "message size exceeds maximum allowed" (a stream's or bucket's own limit).
_JS_MESSAGE_TOO_LARGE = 10054


class CacheConflict(ProjectorError):
    """The entry changed since it was read (another writer, or a stale lease holder): nothing was written."""


class EntryTooLarge(ProjectorError):
    """The value is larger than the KV accepts (:attr:`KvProjectionCache.max_value`): nothing was written.

    The writer stores such a projection by reference instead (a segment row and a pointer).
    """


class EntryRefused(ProjectorError):
    """The server refused to write this entry for a reason of its own (not a conflict, size or outage)."""


class EntryUnreadable(ProjectorError):
    """The stored value is neither a projection nor a pointer."""


class SegmentPointer(msgspec.Struct, frozen=True, kw_only=True):
    segment: str
    row: int


class Pointer(msgspec.Struct, frozen=True, kw_only=True):
    pointer: SegmentPointer
    last_seq: int
    status: str


class CacheEntry(msgspec.Struct, frozen=True, kw_only=True):
    """What the cache holds for one execution, with the revision that fences the next write."""

    revision: int
    projection: Projection | None = None
    pointer: Pointer | None = None

    @property
    def last_seq(self) -> int:
        if self.projection is not None:
            return self.projection.last_seq
        assert self.pointer is not None
        return self.pointer.last_seq


class ProjectionWrite(NamedTuple):
    """One write of a projection bucket, as a ``source: projections`` plug-in is delivered it.

    ``revision`` is the write's sequence in the bucket's stream (the revision a compare-and-set names);
    ``data`` the stored bytes: a projection's canonical JSON, or a pointer (:func:`decode_entry` tells which).
    """

    revision: int
    execution_id: str
    data: bytes


class _Probe(msgspec.Struct):
    pointer: SegmentPointer | None = None


_probe = msgspec.json.Decoder(_Probe)


class _Owner(msgspec.Struct):
    """Whose an entry is, read without decoding the rest of the projection (a pointer says nobody)."""

    tenant: str | None = None
    project: str | None = None
    pointer: SegmentPointer | None = None


_owner = msgspec.json.Decoder(_Owner)
_pointer = msgspec.json.Decoder(Pointer)
_encoder = msgspec.json.Encoder(order="sorted")


def is_pointer(data: bytes) -> bool:
    """Whether a stored value is a pointer (else it is a projection); :class:`EntryUnreadable` if it is neither.

    >>> is_pointer(b'{"last_seq":3,"pointer":{"row":0,"segment":"s"},"status":"COMPLETED"}'), is_pointer(b'{"x":1}')
    (True, False)
    """
    try:
        return _probe.decode(data).pointer is not None
    except msgspec.DecodeError as e:
        raise EntryUnreadable(f"not a projection or a pointer: {e}") from e


def decode_entry(data: bytes, revision: int) -> CacheEntry:
    if _probe.decode(data).pointer is not None:
        return CacheEntry(revision=revision, pointer=_pointer.decode(data))
    return CacheEntry(revision=revision, projection=decode_projection(data))


def pointer_to(segment: str, row: int, projection: Projection) -> Pointer:
    """The pointer that stands for ``projection`` stored at ``row`` of ``segment``."""
    where = SegmentPointer(segment=segment, row=row)
    return Pointer(pointer=where, last_seq=projection.last_seq, status=projection.status)


class ProjectionCache(abc.ABC):
    """Where folded projections live between requests. Writes are compare-and-set on revision."""

    @abc.abstractmethod
    async def get(self, execution_id: str) -> CacheEntry | None: ...

    @abc.abstractmethod
    async def put(self, execution_id: str, projection: Projection, *, revision: int | None) -> int:
        """Write; ``revision=None`` means the key must not exist. Returns the new revision.

        Raises :class:`CacheConflict` (the revision moved), :class:`EntryTooLarge` (store it by reference)
        or :class:`EntryRefused`; nothing was written then.
        """

    @abc.abstractmethod
    async def put_pointer(self, execution_id: str, pointer: Pointer, *, revision: int | None) -> int:
        """Write a pointer, compare-and-set like :meth:`put`."""

    @abc.abstractmethod
    async def delete(self, execution_id: str) -> None: ...


class KvProjectionCache(ProjectionCache):
    """:class:`ProjectionCache` on a NATS KV bucket (one per shard).

    ``max_value`` bounds what :meth:`put` sends; by default it follows the ``max_payload`` the server
    announced on the bucket's connection, less :data:`VALUE_HEADROOM` for the write's headers.
    """

    def __init__(self, kv: KeyValue, *, max_value: int | None = None) -> None:
        self.kv = kv
        self._max_value = max_value

    @classmethod
    async def open(cls, js: JetStreamContext, shard: int, *, max_value: int | None = None) -> KvProjectionCache:
        return cls(await js.key_value(proj_bucket(shard)), max_value=max_value)

    @property
    def max_value(self) -> int:
        """The largest value :meth:`put` sends, in bytes."""
        if self._max_value is not None:
            return self._max_value
        # nats-py keeps the connection behind the bucket private; its max_payload is the server's INFO.
        return self.kv._js._nc.max_payload - VALUE_HEADROOM

    async def get(self, execution_id: str) -> CacheEntry | None:
        got = await self.get_sized(execution_id)
        return None if got is None else got[0]

    async def get_sized(self, execution_id: str) -> tuple[CacheEntry, int] | None:
        """:meth:`get`, with the size of the stored value in bytes (what holding it in memory costs)."""
        try:
            entry = await self.kv.get(execution_id)
        except NotFoundError:  # never written, or purged (a tombstone)
            return None
        assert entry.value is not None and entry.revision is not None
        try:
            return decode_entry(entry.value, entry.revision), len(entry.value)
        except msgspec.DecodeError as e:  # ValidationError is one too
            raise EntryUnreadable(f"the cache entry of {execution_id} is neither a projection nor a pointer: {e}") from e

    async def owner(self, execution_id: str) -> tuple[str, str] | None:
        """The tenant and project of the inline projection under ``execution_id``; None for no entry or a pointer.

        One KV read, and only those two fields decoded: the edge's ``POST …/events`` asks this before every publish.
        """
        try:
            entry = await self.kv.get(execution_id)
        except NotFoundError:
            return None
        try:
            got = _owner.decode(entry.value or b"")
        except msgspec.DecodeError as e:
            raise EntryUnreadable(f"the cache entry of {execution_id} is neither a projection nor a pointer: {e}") from e
        if got.pointer is not None or got.tenant is None or got.project is None:
            return None
        return got.tenant, got.project

    async def _write(self, execution_id: str, data: bytes, revision: int | None) -> int:
        limit = self.max_value
        if len(data) > limit:
            raise EntryTooLarge(f"projection {execution_id} is {len(data)} bytes, over the KV value limit of {limit}")
        try:
            if revision is None:
                return int(await self.kv.create(execution_id, data))
            return int(await self.kv.update(execution_id, data, last=revision))
        except KeyWrongLastSequenceError as e:
            seen = "absent" if revision is None else f"at revision {revision}"
            raise CacheConflict(f"projection {execution_id} changed since it was read ({seen})") from e
        except nats.errors.MaxPayloadError as e:
            raise EntryTooLarge(f"projection {execution_id} is {len(data)} bytes, over the server's max_payload") from e
        except BadRequestError as e:
            if e.err_code == _JS_MESSAGE_TOO_LARGE:
                raise EntryTooLarge(f"projection {execution_id} is {len(data)} bytes: {e.description}") from e
            raise EntryRefused(f"the server refused the cache entry of {execution_id}: {e.description}") from e
        except InvalidKeyError as e:
            raise EntryRefused(f"the cache entry of {execution_id} cannot be written: {e}") from e

    async def put(self, execution_id: str, projection: Projection, *, revision: int | None) -> int:
        return await self._write(execution_id, canonical(projection), revision)

    async def put_pointer(self, execution_id: str, pointer: Pointer, *, revision: int | None) -> int:
        return await self._write(execution_id, _encoder.encode(pointer), revision)

    async def delete(self, execution_id: str) -> None:
        await self.kv.purge(execution_id)
