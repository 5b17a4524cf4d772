"""The WASM plug-in registry: modules in the Object Store ``plugins``, versions in the KV ``catalog``.

An owner is ``system`` (the project's own plug-ins) or ``<tenant>/<project>``.
Keys in KV ``catalog`` (tenant names start with a letter or digit, so the
leading ``_`` keeps them apart from playbook keys):

* ``_plugins.<owner>.<path>.v<N>``: the JSON :class:`PluginRecord` of version N;
* ``_plugins.<owner>.<path>.active``: the record of the active version (the highest registered);

with ``/`` written as ``.`` and the owner ``system`` as ``_system``. The module
itself is the object ``<owner>/<path>@v<N>`` (``_system/...`` for system),
with its sha256 in the header ``Noetl-Sha256``.

:meth:`PluginRegistry.load` reads the active record (one KV get), and
compiles the module only when (owner, path, version, digest) is not cached: a
version bump is picked up on the next dispatch without a restart. A module
whose bytes do not hash to the recorded digest is refused.

>>> object_name("acme/web", "tools/score", 2), record_key("system", "materialize", 1)
('acme/web/tools/score@v2', '_plugins._system.materialize.v1')
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import msgspec
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
    ObjectNotFoundError,
)
from nats.js.kv import KeyValue

from kernel.errors import KernelError
from locator.envelope import now_ts
from locator.errors import LocatorError
from locator.names import check_name
from locator.subjects import CATALOG_BUCKET, PLUGINS_BUCKET

if TYPE_CHECKING:  # the catalog checks records without the WASM runtime: only the registry's users load it
    from worker.wasm import WasmHost, WasmModule

__all__ = [
    "PluginDigestMismatch",
    "PluginNotFound",
    "PluginRecord",
    "PluginRegistry",
    "PluginRegistryError",
    "check_owner",
    "find_record",
    "object_name",
    "record_key",
]

SYSTEM: Final = "system"
PATH_RE: Final = re.compile(r"^[a-z0-9_-]+(/[a-z0-9_-]+)*$")
MAX_MODULE_BYTES: Final = 64 * 1024 * 1024
DIGEST_HEADER: Final = "Noetl-Sha256"
_VERSION_RE: Final = re.compile(r"^v([1-9][0-9]{0,17})$")


class PluginRegistryError(KernelError):
    """Root of the registry's errors; ``type`` is the code a ``call.error`` carries."""

    type = "plugin_registry"


class PluginNotFound(PluginRegistryError):
    """No such plug-in path for this owner, or no such version of it."""

    type = "plugin_not_found"


class PluginDigestMismatch(PluginRegistryError):
    """The stored module does not hash to the digest its catalog record names: it is refused."""

    type = "plugin_digest_mismatch"


class PluginRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One registered version of a plug-in (the catalog's JSON value)."""

    owner: str
    path: str
    version: int
    digest: str
    size: int
    object: str
    registered_at: str


def check_owner(owner: str) -> str:
    """``system`` or ``<tenant>/<project>`` with valid names; raises :class:`PluginRegistryError`."""
    if owner == SYSTEM:
        return owner
    tenant, sep, project = owner.partition("/")
    try:
        if not sep:
            raise ValueError("expected 'system' or '<tenant>/<project>'")
        check_name("tenant", tenant)
        check_name("project", project)
    except (ValueError, LocatorError) as e:
        raise PluginRegistryError(f"invalid plug-in owner {owner!r}: {e}") from None
    return owner


def _check_path(path: str) -> str:
    if not isinstance(path, str) or len(path) > 255 or PATH_RE.fullmatch(path) is None:
        raise PluginRegistryError(f"invalid plug-in path {path!r}: must match {PATH_RE.pattern}")
    return path


def _owner_token(owner: str) -> str:
    return "_system" if check_owner(owner) == SYSTEM else owner


def _prefix(owner: str, path: str) -> str:
    return f"_plugins.{_owner_token(owner).replace('/', '.')}.{_check_path(path).replace('/', '.')}"


def record_key(owner: str, path: str, version: int) -> str:
    return f"{_prefix(owner, path)}.v{version}"


def active_key(owner: str, path: str) -> str:
    return f"{_prefix(owner, path)}.active"


def object_name(owner: str, path: str, version: int) -> str:
    return f"{_owner_token(owner)}/{_check_path(path)}@v{version}"


_decoder: Final = msgspec.json.Decoder(PluginRecord)
_encoder: Final = msgspec.json.Encoder()


async def _entry(kv: KeyValue, key: str) -> tuple[PluginRecord, int] | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return _decoder.decode(entry.value or b""), entry.revision or 0


async def find_record(kv: KeyValue, owner: str, path: str, version: int | None = None) -> PluginRecord | None:
    """The record of ``version`` (the active one when None) in the KV ``catalog``; None if it is not registered.

    Raises :class:`PluginRegistryError` for an invalid owner or path (nothing is read).
    """
    found = await _entry(kv, active_key(owner, path) if version is None else record_key(owner, path, version))
    return None if found is None else found[0]


@dataclass
class PluginRegistry:
    """Register, list and load WASM plug-ins; ``load`` keeps compiled modules by (owner, path, version, digest).

    >>> async def demo(js: JetStreamContext, wasm: bytes) -> None:
    ...     registry = PluginRegistry(js, WasmHost())
    ...     record, created = await registry.register("acme/web", "tools/score", wasm)
    ...     record, module = await registry.load("acme/web", "tools/score")
    """

    js: JetStreamContext
    host: WasmHost
    _compiled: dict[tuple[str, str, int, str], WasmModule] = field(default_factory=dict, repr=False)

    async def register(self, owner: str, path: str, wasm: bytes) -> tuple[PluginRecord, bool]:
        """Check, upload and activate ``wasm`` as the next version; the same bytes as the active one are a no-op.

        The module is compiled and ABI-checked first, so nothing is written for a module that cannot run.
        """
        if len(wasm) > MAX_MODULE_BYTES:
            raise PluginRegistryError(f"plug-in module is {len(wasm)} bytes, over {MAX_MODULE_BYTES}")
        name = f"{owner}:{path}"
        _prefix(owner, path)
        module = self.host.compile(wasm, name=name)
        kv = await self.js.key_value(CATALOG_BUCKET)
        while True:
            current = await self._active_entry(owner, path)
            if current is not None and current[0].digest == module.digest:
                return current[0], False
            version = current[0].version + 1 if current is not None else 1
            record = PluginRecord(
                owner=owner, path=path, version=version, digest=module.digest, size=len(wasm),
                object=object_name(owner, path, version), registered_at=now_ts(),
            )  # fmt: skip
            store = await self.js.object_store(PLUGINS_BUCKET)
            await store.put(record.object, wasm, meta=ObjectMeta(name=record.object, headers={DIGEST_HEADER: module.digest}))
            data = _encoder.encode(record)
            try:
                await kv.create(record_key(owner, path, version), data)
            except KeyWrongLastSequenceError:
                continue  # another registration took this version: try the next one
            try:
                if current is None:
                    await kv.create(active_key(owner, path), data)
                else:
                    await kv.update(active_key(owner, path), data, last=current[1])
            except KeyWrongLastSequenceError:
                continue  # pragma: no cover - raced by another registration; its version is higher
            self._compiled[(owner, path, version, module.digest)] = module
            return record, True

    async def _active_entry(self, owner: str, path: str) -> tuple[PluginRecord, int] | None:
        return await _entry(await self.js.key_value(CATALOG_BUCKET), active_key(owner, path))

    async def record(self, owner: str, path: str, version: int | None = None) -> PluginRecord:
        """The record of ``version`` (the active one when None); :class:`PluginNotFound` if there is none."""
        found = await find_record(await self.js.key_value(CATALOG_BUCKET), owner, path, version)
        if found is None:
            if version is None:
                raise PluginNotFound(f"no plug-in {path} registered for {owner}")
            raise PluginNotFound(f"no version {version} of plug-in {path} registered for {owner}")
        return found

    async def list(self, owner: str) -> list[PluginRecord]:
        """Every registered version of every plug-in of ``owner``, sorted by path and version."""
        kv = await self.js.key_value(CATALOG_BUCKET)
        watcher = await kv.watch(f"_plugins.{_owner_token(owner).replace('/', '.')}.>", ignore_deletes=True)
        found: list[PluginRecord] = []
        try:
            async for entry in watcher:
                if entry is None:  # the end of the initial values
                    break
                if _VERSION_RE.match(entry.key.rpartition(".")[2]):
                    found.append(_decoder.decode(entry.value or b""))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
        return sorted(found, key=lambda r: (r.path, r.version))

    async def load(self, owner: str, path: str, version: int | None = None) -> tuple[PluginRecord, WasmModule]:
        """The record and compiled module of ``version`` (the active one when None).

        Raises :class:`PluginNotFound` or :class:`PluginDigestMismatch` (the module is refused).
        """
        record = await self.record(owner, path, version)
        key = (owner, path, record.version, record.digest)
        module = self._compiled.get(key)
        if module is None:
            store = await self.js.object_store(PLUGINS_BUCKET)
            try:
                result = await store.get(record.object)
            except (ObjectNotFoundError, NotFoundError):
                raise PluginNotFound(f"plug-in {path} version {record.version} of {owner}: module {record.object} is missing") from None
            wasm = result.data or b""
            digest = hashlib.sha256(wasm).hexdigest()
            if digest != record.digest:
                raise PluginDigestMismatch(
                    f"plug-in {path} version {record.version} of {owner} refused: its module hashes to sha256 "
                    f"{digest}, the catalog records {record.digest}"
                )
            module = self.host.compile(wasm, name=f"{owner}:{path}@v{record.version}")
            self._compiled[key] = module
        return record, module
