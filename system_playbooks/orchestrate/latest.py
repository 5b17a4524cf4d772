"""The edge's memory of the catalog's ``latest`` pointers, kept current by the bucket's own stream.

A start that names a playbook without a version asked the catalog for its
``latest`` key: a NATS round trip per start, for a value that changes only
when someone registers a version. :class:`LatestVersions` remembers the latest
version of each (tenant, project, path) it has resolved and follows the
``catalog`` bucket's stream with an ordered consumer that starts at the
stream's end, so every later move of a ``latest`` key, whoever makes it,
raises the remembered version (``latest`` only ever moves up, so the higher
of two answers is the newer). It also remembers which explicit versions
exist: a version is immutable and never deleted, so once seen it is known.

What a start through this edge sees:

* a registration through this edge, at once: the playbook route
  :meth:`notes <LatestVersions.note>` the version it registered;
* a registration anywhere else (another edge, ``noetl-edge playbook
  register``), as soon as its write reaches this edge's consumer — typically
  well under a millisecond on a healthy connection; a start in between runs
  the version that was the latest a moment before, exactly as if it had
  arrived a moment earlier;
* when the connection reconnects, everything remembered is dropped and the
  consumer is created again from the stream's end: a notice missed while
  disconnected can never leave an old version in use.

It is a cache: dropping it any time changes nothing but the round trips.

>>> # latest = await LatestVersions.open(js)
>>> # await resolve_playbook(latest, "acme", "web", "etl/daily", None)   # a KV read the first time, memory after
"""

from __future__ import annotations

from typing import Final

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from locator.subjects import CATALOG_BUCKET
from projector.tail import BucketTail
from system_playbooks.orchestrate.catalog import LATEST, Catalog, latest_key, version_key


# Entries remembered (a key and an int each); past it the memory starts over, which costs one read per path.
HELD: Final = 100_000


class LatestVersions:
    """``latest_version`` and ``has_version`` of a :class:`Catalog`, answered from memory while it is current."""

    def __init__(self, js: JetStreamContext, catalog: Catalog) -> None:
        self.js = js
        self.catalog = catalog
        self._latest: dict[str, int] = {}  # latest key -> version
        self._versions: set[str] = set()  # version keys known to exist
        # Bumped whenever memory is dropped: a read that began before is not kept.
        self._generation = 0
        self.stats = {"hits": 0, "misses": 0, "resets": 0}
        self._tail = BucketTail(js, CATALOG_BUCKET, self._on_write, on_reset=self._reset)

    @classmethod
    async def open(cls, js: JetStreamContext) -> LatestVersions:
        """Follow ``js``'s ``catalog`` bucket; raises ``BucketNotFoundError`` when it does not exist."""
        latest = cls(js, Catalog(await js.key_value(CATALOG_BUCKET)))
        await latest._tail.follow()
        return latest

    def _reset(self) -> None:
        self.stats["resets"] += 1
        self._clear()

    def _clear(self) -> None:
        self._latest.clear()
        self._versions.clear()
        self._generation += 1

    async def _on_write(self, msg: Msg) -> None:
        if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE"):  # never the catalog's doing: an operator's
            self._clear()
            return
        key = self._tail.key(msg)
        if key.endswith("." + LATEST):  # else a version (immutable: known already when asked) or a plug-in record
            try:
                self._raise(key, int(msg.data or b"0"))
            except ValueError:  # not written by the catalog: trust nothing remembered
                self._clear()

    def _raise(self, key: str, version: int) -> None:
        if len(self._latest) >= HELD and key not in self._latest:
            self._latest.clear()
        if version > self._latest.get(key, 0):
            self._latest[key] = version

    async def latest_version(self, tenant: str, project: str, path: str) -> int:
        """The highest registered version of ``path``; :class:`PlaybookNotFound` if none."""
        key = latest_key(tenant, project, path)
        if not self._tail.live():
            await self._tail.follow()
        held = self._latest.get(key)
        if held is not None:
            self.stats["hits"] += 1
            return held
        self.stats["misses"] += 1
        generation = self._generation
        version = await self.catalog.latest_version(tenant, project, path)
        # Kept only while the notices still flow: a move announced during the read has raised it already.
        if generation == self._generation and self._tail.live():
            self._raise(key, version)
        return version

    async def has_version(self, tenant: str, project: str, path: str, version: int) -> bool:
        """Whether ``version`` of ``path`` is registered (the playbook is not read)."""
        key = version_key(tenant, project, path, version)
        if key in self._versions or self._latest.get(latest_key(tenant, project, path)) == version:
            self.stats["hits"] += 1
            return True
        self.stats["misses"] += 1
        if not await self.catalog.has_version(tenant, project, path, version):
            return False
        if len(self._versions) >= HELD:
            self._versions.clear()
        self._versions.add(key)  # immutable and never deleted: no notice can make this stale
        return True

    def note(self, tenant: str, project: str, path: str, version: int) -> None:
        """This edge registered ``version`` of ``path``: the next start here sees it, before the notice arrives."""
        key = latest_key(tenant, project, path)
        self._versions.add(version_key(tenant, project, path, version))
        if key in self._latest:  # else nothing is remembered and the next start reads the KV, after this write
            self._raise(key, version)

    async def close(self) -> None:
        self._clear()
        await self._tail.close()
