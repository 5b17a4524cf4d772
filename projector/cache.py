"""The warm projection cache: KV ``proj_<shard>``, keyed by execution id, fenced by revision.

A value is the projection's canonical JSON, or — once a terminal execution
has been materialized — a pointer to its row in a Feather segment::

    {"last_seq": 17, "pointer": {"row": 3, "segment": "file:///…/x.feather"}, "status": "COMPLETED"}
"""

from __future__ import annotations

import abc

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from locator.subjects import proj_bucket
from projector.errors import ProjectorError
from projector.projection import Projection, canonical, decode_projection


class CacheConflict(ProjectorError):
    """The entry changed since it was read (another writer, or a stale lease holder): nothing was written."""


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


class _Probe(msgspec.Struct):
    pointer: SegmentPointer | None = None


_probe = msgspec.json.Decoder(_Probe)
_pointer = msgspec.json.Decoder(Pointer)
_encoder = msgspec.json.Encoder(order="sorted")


def decode_entry(data: bytes, revision: int) -> CacheEntry:
    if _probe.decode(data).pointer is not None:
        return CacheEntry(revision=revision, pointer=_pointer.decode(data))
    return CacheEntry(revision=revision, projection=decode_projection(data))


class ProjectionCache(abc.ABC):
    """Where folded projections live between requests. Writes are compare-and-set on revision."""

    @abc.abstractmethod
    async def get(self, execution_id: str) -> CacheEntry | None: ...

    @abc.abstractmethod
    async def put(self, execution_id: str, projection: Projection, *, revision: int | None) -> int:
        """Write; ``revision=None`` means the key must not exist. Returns the new revision."""

    @abc.abstractmethod
    async def put_pointer(self, execution_id: str, pointer: Pointer, *, revision: int) -> int: ...

    @abc.abstractmethod
    async def delete(self, execution_id: str) -> None: ...


class KvProjectionCache(ProjectionCache):
    """:class:`ProjectionCache` on a NATS KV bucket (one per shard)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, shard: int) -> KvProjectionCache:
        return cls(await js.key_value(proj_bucket(shard)))

    async def get(self, execution_id: str) -> CacheEntry | None:
        try:
            entry = await self.kv.get(execution_id)
        except NotFoundError:  # never written, or purged (a tombstone)
            return None
        assert entry.value is not None and entry.revision is not None
        return decode_entry(entry.value, entry.revision)

    async def _write(self, execution_id: str, data: bytes, revision: int | None) -> int:
        try:
            if revision is None:
                return int(await self.kv.create(execution_id, data))
            return int(await self.kv.update(execution_id, data, last=revision))
        except KeyWrongLastSequenceError as e:
            seen = "absent" if revision is None else f"at revision {revision}"
            raise CacheConflict(f"projection {execution_id} changed since it was read ({seen})") from e

    async def put(self, execution_id: str, projection: Projection, *, revision: int | None) -> int:
        return await self._write(execution_id, canonical(projection), revision)

    async def put_pointer(self, execution_id: str, pointer: Pointer, *, revision: int) -> int:
        return await self._write(execution_id, _encoder.encode(pointer), revision)

    async def delete(self, execution_id: str) -> None:
        await self.kv.purge(execution_id)
