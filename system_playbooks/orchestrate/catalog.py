"""The playbook catalog: validated playbooks in the KV bucket ``catalog``, by tenant, project, path and version.

Keys (NATS KV allows ``[-/_=.a-zA-Z0-9]``; tenant, project and path segments
never contain a dot, so the mapping is reversible):

* ``<tenant>.<project>.<path with '/' as '.'>.v<version>`` holds the playbook;
* ``<tenant>.<project>.<path with '/' as '.'>.latest`` holds the highest
  registered version as ASCII decimal.

The last token tells the two apart (``latest`` never looks like ``v<N>``).

The value is the canonical JSON of the validated :class:`Playbook` (msgspec,
dict keys sorted), not the YAML text: two files that differ only in comments,
layout or key order are the same content, and a reader decodes it straight
into the Struct without parsing YAML again.

A ``tool: wasm`` step must name a plug-in the project has registered (and,
when it pins ``version``, that version): :meth:`Catalog.add` reads the plug-in
records from the same bucket (``_plugins.*``, see :mod:`worker.plugins`) and
refuses the playbook with :class:`UnknownPlugin` naming the step, before
anything is written.

Every keychain alias a step references (``auth.credential`` of an ``http``
step, the values of a ``python`` step's ``credentials``) must be set in the
tenant/project: :meth:`Catalog.add` looks for its key in the KV bucket
``keychain`` (only whether it exists: reading a value needs the platform key,
which the catalog never has) and refuses the playbook with
:class:`UnknownCredential` naming the path, before anything is written.

A version is immutable: it is written with ``create`` (compare-and-set
against "no such key"), so a second registration of the same version is
accepted only with the same content. ``latest`` is moved with compare-and-set
on its revision, and only ever up, always after the version is written: a
``latest`` that names a version proves that version exists (a start resolves
the latest without reading the playbook). Nothing deletes a version, so one
seen once exists for good (:mod:`system_playbooks.orchestrate.latest` relies
on both).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kernel.errors import ConfigError
from worker.plugins import PluginRegistryError, find_record
from locator.names import check_name
from locator.subjects import CATALOG_BUCKET, KEYCHAIN_BUCKET
from system_playbooks.orchestrate.errors import OrchestrateError, PlaybookError
from system_playbooks.orchestrate.playbook import (
    PATH_PATTERN,
    Playbook,
    Policy,
    WasmTool,
    credential_refs,
    decode_playbook,
    load_playbook,
    parse_playbook,
)
from worker.tools.registry import BUILTIN_KINDS, registry

__all__ = [
    "LATEST",
    "Catalog",
    "CatalogError",
    "PlaybookNotFound",
    "Registered",
    "UnknownCredential",
    "UnknownPlugin",
    "VersionConflict",
    "latest_key",
    "policy_from_env",
    "version_key",
]

LATEST: Final = "latest"
_PATH_RE: Final = re.compile(PATH_PATTERN)
_VERSION_RE: Final = re.compile(r"^v([1-9][0-9]{0,17})$")
_encoder = msgspec.json.Encoder(order="sorted")


class CatalogError(OrchestrateError):
    """Root of the catalog's errors (an invalid playbook is a :class:`PlaybookError` instead)."""


class PlaybookNotFound(CatalogError):
    """No such playbook path, or no such version of it."""


class VersionConflict(CatalogError):
    """This version of the path is already registered with different content; versions are immutable."""


class UnknownPlugin(PlaybookError):
    """A ``tool: wasm`` step names a plug-in (or a pinned version of one) the project has not registered.

    >>> str(UnknownPlugin("no plug-in tools/score registered for acme/web", path="steps[2].tool.plugin"))
    'steps[2].tool.plugin: no plug-in tools/score registered for acme/web'
    """


class UnknownCredential(PlaybookError):
    """A step references a keychain alias that is not set in the playbook's tenant/project.

    >>> str(UnknownCredential("unknown credential 'api' in acme/web", path="steps[1].tool.auth.credential"))
    "steps[1].tool.auth.credential: unknown credential 'api' in acme/web"
    """


class Registered(msgspec.Struct, frozen=True):
    """The outcome of :meth:`Catalog.add`: the playbook and whether this call created the version."""

    playbook: Playbook
    created: bool


def _prefix(tenant: str, project: str, path: str) -> str:
    tenant = check_name("tenant", tenant)
    project = check_name("project", project)
    if not isinstance(path, str) or not _PATH_RE.match(path) or len(path) > 255:
        raise PlaybookNotFound(f"invalid playbook path {path!r}: must match {PATH_PATTERN}")
    return f"{tenant}.{project}.{path.replace('/', '.')}"


def version_key(tenant: str, project: str, path: str, version: int) -> str:
    """``acme.web.etl.daily.v3`` for ``acme``/``web``, path ``etl/daily``, version 3."""
    return f"{_prefix(tenant, project, path)}.v{version}"


def latest_key(tenant: str, project: str, path: str) -> str:
    """``acme.web.etl.daily.latest``: the highest registered version of the path."""
    return f"{_prefix(tenant, project, path)}.{LATEST}"


class Catalog:
    """Register and read playbooks in a KV bucket (``catalog``).

    >>> async def demo(kv: KeyValue) -> None:
    ...     catalog = Catalog(kv)
    ...     pb = await catalog.register("acme", "web", "path: demo/x\\nversion: 1\\nsteps: [{name: a, tool: {kind: noop}}]",
    ...                                 policy=Policy())
    ...     assert (await catalog.get("acme", "web", "demo/x")) == pb
    ...     assert await catalog.list("acme", "web") == [("demo/x", 1)]
    """

    def __init__(self, kv: KeyValue, *, keychain: KeyValue | None = None) -> None:
        self.kv = kv
        self.keychain = keychain

    @classmethod
    async def open(cls, js: JetStreamContext) -> Catalog:
        """The catalog in ``js``'s ``catalog`` bucket, with the ``keychain`` bucket for alias checks when it exists.

        Raises ``BucketNotFoundError`` when the catalog bucket does not exist.
        """
        kv = await js.key_value(CATALOG_BUCKET)
        try:
            keychain: KeyValue | None = await js.key_value(KEYCHAIN_BUCKET)
        except BucketNotFoundError:
            keychain = None
        return cls(kv, keychain=keychain)

    async def register(
        self, tenant: str, project: str, source: str | bytes | Path | Mapping[str, Any], *, policy: Policy
    ) -> Playbook:
        """Validate ``source`` (YAML text, a file, or a decoded document) and store it; see :meth:`add`."""
        return (await self.add(tenant, project, source, policy=policy)).playbook

    async def add(
        self, tenant: str, project: str, source: str | bytes | Path | Mapping[str, Any], *, policy: Policy
    ) -> Registered:
        """Validate, then store the version and raise ``latest`` to it.

        Raises :class:`PlaybookError` (nothing written) for an invalid playbook, :class:`UnknownPlugin`
        (a :class:`PlaybookError`, nothing written) for a ``tool: wasm`` step whose plug-in is not registered,
        :class:`UnknownCredential` (likewise) for a keychain alias not set in the tenant/project,
        and :class:`VersionConflict` when the version exists with other content.
        Registering the same content again is a no-op that answers ``created=False``.
        """
        playbook = parse_playbook(source, policy=policy) if isinstance(source, Mapping) else load_playbook(source, policy=policy)
        key = version_key(tenant, project, playbook.path, playbook.version)
        await self.check_plugins(tenant, project, playbook)
        await self.check_credentials(tenant, project, playbook)
        data = _encoder.encode(playbook)
        created = True
        try:
            await self.kv.create(key, data)
        except KeyWrongLastSequenceError:
            created = False
            stored = await self._read(key)
            if stored is None or _encoder.encode(stored) != data:
                raise VersionConflict(
                    f"{playbook.path} version {playbook.version} is already registered in {tenant}/{project} "
                    "with different content; register it under a new version"
                ) from None
        # Also on a repeat: a registration that died between the two writes left `latest` behind.
        await self._raise_latest(latest_key(tenant, project, playbook.path), playbook.version)
        return Registered(playbook=playbook, created=created)

    async def check_plugins(self, tenant: str, project: str, playbook: Playbook) -> None:
        """Raise :class:`UnknownPlugin` for the first ``tool: wasm`` step whose plug-in (version) is not registered."""
        owner = f"{tenant}/{project}"
        for i, step in enumerate(playbook.steps):
            if not isinstance(step.tool, WasmTool):
                continue
            tool = step.tool
            try:
                found = await find_record(self.kv, owner, tool.plugin, tool.version)
                if found is None and tool.version is not None and await find_record(self.kv, owner, tool.plugin):
                    raise UnknownPlugin(
                        f"plug-in {tool.plugin} has no version {tool.version} registered for {owner} "
                        "(`noetl-edge plugin list` shows the versions)",
                        path=f"steps[{i}].tool.version",
                    )
            except PluginRegistryError as e:
                raise UnknownPlugin(str(e), path=f"steps[{i}].tool.plugin") from None
            if found is None:
                raise UnknownPlugin(
                    f"no plug-in {tool.plugin} registered for {owner}: register it first "
                    "(`noetl-edge plugin register`)",
                    path=f"steps[{i}].tool.plugin",
                )

    async def check_credentials(self, tenant: str, project: str, playbook: Playbook) -> None:
        """Raise :class:`UnknownCredential` for the first keychain alias not set in ``tenant``/``project``.

        Only the key's existence is read (``<tenant>.<project>.<alias>`` in the ``keychain`` bucket): never a value.
        """
        for path, alias in credential_refs(playbook):
            if self.keychain is None:
                raise UnknownCredential(
                    f"credential {alias!r} cannot be checked: the KV bucket {KEYCHAIN_BUCKET!r} does not exist "
                    "(bootstrap first; `noetl-edge up` does it)",
                    path=path,
                )
            try:
                await self.keychain.get(f"{tenant}.{project}.{alias}")
            except KeyNotFoundError:  # never set, or deleted
                raise UnknownCredential(
                    f"unknown credential {alias!r} in {tenant}/{project} (set it with `noetl-edge credential set`)",
                    path=path,
                ) from None

    async def _raise_latest(self, key: str, version: int) -> None:
        while True:
            try:
                entry = await self.kv.get(key)
            except KeyNotFoundError:
                try:
                    await self.kv.create(key, str(version).encode())
                    return
                except KeyWrongLastSequenceError:
                    continue  # another registration created it first: compare with theirs
            if int(entry.value or b"0") >= version:
                return
            try:
                await self.kv.update(key, str(version).encode(), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue  # moved under us: read it again

    async def _read(self, key: str) -> Playbook | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return decode_playbook(entry.value or b"")

    async def latest_version(self, tenant: str, project: str, path: str) -> int:
        """The highest registered version of ``path``; :class:`PlaybookNotFound` if none."""
        try:
            entry = await self.kv.get(latest_key(tenant, project, path))
        except KeyNotFoundError:
            raise PlaybookNotFound(f"no playbook {path} in {tenant}/{project}") from None
        return int(entry.value or b"0")

    async def has_version(self, tenant: str, project: str, path: str, version: int) -> bool:
        """Whether ``version`` of ``path`` is registered, without decoding the playbook."""
        try:
            await self.kv.get(version_key(tenant, project, path, version))
        except KeyNotFoundError:
            return False
        return True

    async def get(self, tenant: str, project: str, path: str, version: int | None = None) -> Playbook:
        """Version ``version`` of ``path`` (the latest when None); :class:`PlaybookNotFound` if there is none."""
        if version is None:
            version = await self.latest_version(tenant, project, path)
        playbook = await self._read(version_key(tenant, project, path, version))
        if playbook is None:
            raise PlaybookNotFound(f"no version {version} of playbook {path} in {tenant}/{project}")
        return playbook

    async def list(self, tenant: str, project: str) -> list[tuple[str, int]]:
        """Every registered (path, version) of the project, sorted."""
        prefix = f"{check_name('tenant', tenant)}.{check_name('project', project)}."
        watcher = await self.kv.watch(prefix + ">", ignore_deletes=True, meta_only=True)
        found: list[tuple[str, int]] = []
        try:
            async for entry in watcher:
                if entry is None:  # the end of the initial values
                    break
                head, _, last = entry.key[len(prefix):].rpartition(".")
                match = _VERSION_RE.match(last)
                if head and match:
                    found.append((head.replace(".", "/"), int(match.group(1))))
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
        return sorted(found)


def policy_from_env(env: Mapping[str, str]) -> Policy:
    """The operator's :class:`Policy` from the environment, each variable comma-separated:

    * ``NOETL_PYTHON_ALLOW`` (module prefixes) and ``NOETL_HTTP_HOSTS`` (hosts): unset means nothing is allowed;
    * ``NOETL_TOOL_KINDS``: the tool kinds playbooks may use; unset or empty means the built-in ones. Each
      must be installed (an entry point of group ``noetl_edge.tools`` that loads), else a
      :class:`~kernel.errors.ConfigError` naming it: the edge, the kernel and the workers read it alike;
    * ``NOETL_NATS_SUBJECTS``: NATS subject patterns ``nats`` tools may publish to; unset means none.

    >>> policy_from_env({"NOETL_PYTHON_ALLOW": "examples.tools., acme", "NOETL_HTTP_HOSTS": ""})
    ... # doctest: +NORMALIZE_WHITESPACE
    Policy(python_allow=('examples.tools.', 'acme'), http_hosts=(),
           tool_kinds=('callback', 'duckdb', 'http', 'nats', 'noop', 'playbook', 'python', 'wasm'), nats_subjects=())
    >>> policy_from_env({"NOETL_TOOL_KINDS": "noop,shell"})
    Traceback (most recent call last):
    ...
    kernel.errors.ConfigError: NOETL_TOOL_KINDS: no tool kind 'shell' is installed (no entry point 'shell' in group noetl_edge.tools)
    """

    def items(name: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(part.strip() for part in env.get(name, "").split(",") if part.strip()))

    kinds = items("NOETL_TOOL_KINDS") or BUILTIN_KINDS
    registry().check_allowed(kinds)
    subjects = items("NOETL_NATS_SUBJECTS")
    for pattern in subjects:
        tokens = pattern.split(".")
        if any(not t or any(c.isspace() for c in t) or (t != ">" and ">" in t) or (t != "*" and "*" in t)
               for t in tokens) or ">" in tokens[:-1]:  # fmt: skip
            raise ConfigError(f"NOETL_NATS_SUBJECTS: invalid subject pattern {pattern!r} (dot-separated tokens; "
                              "'*' a whole token, '>' only the last)")  # fmt: skip
    return Policy(python_allow=items("NOETL_PYTHON_ALLOW"), http_hosts=items("NOETL_HTTP_HOSTS"), tool_kinds=kinds,
                  nats_subjects=subjects)  # fmt: skip
