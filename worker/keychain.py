"""The keychain: credentials by alias, encrypted at rest, resolved only where a step runs.

Each credential lives in the KV bucket ``keychain`` under the key
``<tenant>.<project>.<alias>``; every ``set`` is a new version (the KV history
keeps the older ones). A value is encrypted with AES-256-GCM under a fresh
data key, with its location ``<tenant>.<project>.<alias>.<version>`` as
associated data, and the data key is wrapped (AES-256-GCM, same associated
data) under the platform key, the KEK, whose id is stored beside it. Nothing
here ever logs or returns a value except :meth:`Keychain.resolve`.

>>> kek = PlatformKey.from_bytes(bytes(32))
>>> kek.id
'66687aad'
>>> Scope("acme", "web").key("api")
'acme.web.api'
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import msgspec
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.js import JetStreamContext
from nats.js.kv import KeyValue
from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from kernel.errors import KernelError
from locator.names import NAME_RULE
from locator.subjects import KEYCHAIN_BUCKET
from projector.historystats import stream_subjects

log = structlog.get_logger("noetl.worker.keychain")

MAX_VALUE = 16 * 1024
ALIAS_RE = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ALIAS = re.compile(ALIAS_RE)
KEY_FILE = "keychain.key"
ENV_KEY_ID = "env"  # the key id shown for a credential lifted from the environment (NOETL_KEYCHAIN_ENV_VARS)
_NONCE = 12


class KeychainError(KernelError):
    """Every keychain failure, with a one-line message that never holds a value."""


class UnknownCredential(KeychainError):
    """The alias is not set in that scope."""


class Scope(NamedTuple):
    """Where a credential belongs: a tenant and a project (``SYSTEM`` is the platform's own)."""

    tenant: str
    project: str

    def key(self, alias: str) -> str:
        return f"{self.tenant}.{self.project}.{alias}"


SYSTEM = Scope("system", "system")


class CredentialMeta(msgspec.Struct, frozen=True, kw_only=True):
    """What may be shown about a credential: never its value."""

    tenant: str
    project: str
    alias: str
    version: int
    created_at: str
    key_id: str
    size: int


class Resolved(NamedTuple):
    value: bytes
    version: int


class _Stored(msgspec.Struct, frozen=True, kw_only=True):
    """The KV value (JSON): the ciphertext and its wrapped data key, with metadata in clear."""

    version: int
    created_at: str
    key_id: str
    wrapped_key: str  # base64 of nonce (12) + AES-GCM(KEK) of the 32-byte data key
    nonce: str  # base64, 12 bytes
    ciphertext: str  # base64 of AES-GCM(data key) of the value
    size: int


class _Tombstone(msgspec.Struct, frozen=True, kw_only=True):
    """The payload of a delete's purge marker: the last version, so a later set goes on counting."""

    version: int


_decode_stored = msgspec.json.Decoder(_Stored)
_decode_tombstone = msgspec.json.Decoder(_Tombstone)
_encode = msgspec.json.Encoder()


@dataclass(frozen=True, repr=False)
class PlatformKey:
    """The key-encryption key: 32 bytes, and an id (the first 8 hex digits of its SHA-256).

    >>> PlatformKey.from_bytes(b"short")
    Traceback (most recent call last):
    ...
    worker.keychain.KeychainError: a platform key must be 32 bytes, got 5
    """

    id: str
    key: bytes
    source: str = "bytes"
    created: bool = False

    def __repr__(self) -> str:  # never the key itself
        return f"PlatformKey(id={self.id!r}, source={self.source!r})"

    @classmethod
    def from_bytes(cls, key: bytes, *, source: str = "bytes", created: bool = False) -> PlatformKey:
        if len(key) != 32:
            raise KeychainError(f"a platform key must be 32 bytes, got {len(key)}")
        return cls(id=hashlib.sha256(key).hexdigest()[:8], key=bytes(key), source=source, created=created)

    @classmethod
    def generate(cls) -> PlatformKey:
        return cls.from_bytes(secrets.token_bytes(32), source="generated")

    @classmethod
    def from_text(cls, text: str, *, source: str) -> PlatformKey:
        """From base64 text (a key file's content or ``NOETL_KEYCHAIN_KEY``)."""
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            raise KeychainError(f"the platform key in {source} is not base64") from e
        if len(raw) != 32:
            raise KeychainError(f"the platform key in {source} must be base64 of 32 bytes, got {len(raw)} bytes")
        return cls.from_bytes(raw, source=source)

    @classmethod
    def from_file(cls, path: Path) -> PlatformKey:
        try:
            text = path.read_text(encoding="ascii")
        except FileNotFoundError as e:
            raise KeychainError(f"no platform key file at {path}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise KeychainError(f"cannot read the platform key file {path}: {e}") from e
        return cls.from_text(text, source=str(path))

    @classmethod
    def from_env(cls, *, data_dir: Path, env: Mapping[str, str] | None = None, create: bool = False) -> PlatformKey:
        """``NOETL_KEYCHAIN_KEY`` (base64), else ``NOETL_KEYCHAIN_KEY_FILE``, else ``<data_dir>/keychain.key``.

        ``create=True`` writes ``<data_dir>/keychain.key`` (mode 0600) when none of
        them is given and the file is missing; the result then has ``created=True``.
        """
        env = os.environ if env is None else env
        if env.get("NOETL_KEYCHAIN_KEY"):
            return cls.from_text(env["NOETL_KEYCHAIN_KEY"], source="NOETL_KEYCHAIN_KEY")
        if env.get("NOETL_KEYCHAIN_KEY_FILE"):
            return cls.from_file(Path(env["NOETL_KEYCHAIN_KEY_FILE"]))
        path = data_dir / KEY_FILE
        if create and not path.exists():
            key = secrets.token_bytes(32)
            data_dir.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return cls.from_file(path)  # another process created it first
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(base64.b64encode(key).decode("ascii") + "\n")
            return cls.from_bytes(key, source=str(path), created=True)
        if not path.exists():
            raise KeychainError(
                f"no platform key: NOETL_KEYCHAIN_KEY and NOETL_KEYCHAIN_KEY_FILE are unset and {path} does not exist "
                "(`noetl-edge up` creates it on its first start)"
            )
        return cls.from_file(path)


def old_keys_from_env(env: Mapping[str, str] | None = None) -> list[PlatformKey]:
    """Earlier platform keys still accepted for reading: ``NOETL_KEYCHAIN_OLD_KEY_FILES`` (comma-separated paths).

    Give them to every reader while a rewrap runs, so no step fails between the rewrap and the restart.
    """
    env = os.environ if env is None else env
    return [PlatformKey.from_file(Path(p.strip())) for p in env.get("NOETL_KEYCHAIN_OLD_KEY_FILES", "").split(",") if p.strip()]


def check_alias(alias: object) -> str:
    if not isinstance(alias, str) or _ALIAS.fullmatch(alias) is None:
        shown = repr(alias) if not isinstance(alias, str) or len(alias) <= 80 else repr(alias[:77] + "...")
        raise KeychainError(f"invalid alias {shown}: must match {ALIAS_RE} ({NAME_RULE})")
    return alias


def _check_scope(scope: Scope) -> Scope:
    for field, value in (("tenant", scope.tenant), ("project", scope.project)):
        if not isinstance(value, str) or _ALIAS.fullmatch(value) is None:
            raise KeychainError(f"invalid {field} {value!r}: must match {ALIAS_RE} ({NAME_RULE})")
    return scope


def check_value(value: bytes) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise KeychainError(f"a credential value must be bytes, got {type(value).__name__}")
    if not value:
        raise KeychainError("a credential value must not be empty")
    if len(value) > MAX_VALUE:
        raise KeychainError(f"a credential value must be at most {MAX_VALUE} bytes, got {len(value)}")
    return bytes(value)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeychainError(f"the stored {what} of {where} is not base64") from e


def _wrap(kek: PlatformKey, data_key: bytes, aad: bytes) -> str:
    nonce = secrets.token_bytes(_NONCE)
    return _b64(nonce + AESGCM(kek.key).encrypt(nonce, data_key, aad))


def _unwrap(kek: PlatformKey, wrapped: str, aad: bytes, where: str) -> bytes:
    raw = _unb64(wrapped, "data key", where)
    try:
        return AESGCM(kek.key).decrypt(raw[:_NONCE], raw[_NONCE:], aad)
    except (InvalidTag, ValueError) as e:
        raise KeychainError(f"the data key of {where} does not decrypt under platform key {kek.id} (tampered or moved)") from e


class Keychain:
    """Credentials in the ``keychain`` KV bucket, encrypted under a platform key.

    ``old_keks`` are earlier platform keys still accepted for reading (during a
    rewrap); ``env`` (default: the process environment) names, in
    ``NOETL_KEYCHAIN_ENV_VARS``, variables lifted into the ``SYSTEM`` scope as
    version 0, never stored.

    Usage (with a bootstrapped JetStream)::

        chain = Keychain(js, PlatformKey.from_env(data_dir=Path("data")))
        await chain.set(Scope("acme", "web"), "api", b"s3cret")
        (await chain.resolve(Scope("acme", "web"), "api")).version  # 1
    """

    def __init__(
        self,
        js: JetStreamContext,
        kek: PlatformKey,
        *,
        old_keks: Sequence[PlatformKey] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._js = js
        self._kek = kek
        self._keks = {k.id: k for k in old_keks} | {kek.id: kek}
        self._env = self.env_credentials(os.environ if env is None else env)

    @staticmethod
    def env_credentials(env: Mapping[str, str]) -> dict[str, bytes]:
        """The variables ``NOETL_KEYCHAIN_ENV_VARS`` names, by lowercased name (their ``SYSTEM`` alias)."""
        names = [n.strip() for n in env.get("NOETL_KEYCHAIN_ENV_VARS", "").split(",") if n.strip()]
        lifted: dict[str, bytes] = {}
        for name in names:
            alias = name.lower()
            if _ALIAS.fullmatch(alias) is None:
                raise KeychainError(f"NOETL_KEYCHAIN_ENV_VARS names {name!r}, whose lowercased name is no valid alias ({ALIAS_RE})")
            if name not in env:
                raise KeychainError(f"NOETL_KEYCHAIN_ENV_VARS names {name}, which is not set in the environment")
            value = env[name].encode("utf-8")
            if not value or len(value) > MAX_VALUE:
                raise KeychainError(f"the environment variable {name} (NOETL_KEYCHAIN_ENV_VARS) must hold 1 to {MAX_VALUE} bytes")
            lifted[alias] = value
        return lifted

    async def _kv(self) -> KeyValue:
        try:
            return await self._js.key_value(KEYCHAIN_BUCKET)
        except NotFoundError as e:
            raise KeychainError(f"KV bucket {KEYCHAIN_BUCKET!r} does not exist: bootstrap first (`noetl-edge up` does it)") from e

    async def _latest(self, key: str) -> tuple[_Stored | None, int, int]:
        """(newest stored value or None, its revision or the tombstone's or 0, the last version ever set)."""
        kv = await self._kv()
        try:
            entry = await kv._get(key)
        except KeyDeletedError as e:
            last = 0
            if e.entry is not None and e.entry.value:
                try:
                    last = _decode_tombstone.decode(e.entry.value).version
                except msgspec.DecodeError:
                    last = 0
            return None, e.entry.revision if e.entry is not None else 0, last
        except KeyNotFoundError:
            return None, 0, 0
        stored = self._decode(entry.value or b"", key)
        return stored, entry.revision or 0, stored.version

    @staticmethod
    def _decode(raw: bytes, key: str) -> _Stored:
        try:
            return _decode_stored.decode(raw)
        except msgspec.DecodeError as e:
            raise KeychainError(f"the stored credential {key} is unreadable: {e}") from e

    def _meta(self, scope: Scope, alias: str, stored: _Stored) -> CredentialMeta:
        return CredentialMeta(
            tenant=scope.tenant, project=scope.project, alias=alias, version=stored.version,
            created_at=stored.created_at, key_id=stored.key_id, size=stored.size,
        )  # fmt: skip

    def _env_meta(self, alias: str) -> CredentialMeta:
        return CredentialMeta(
            tenant=SYSTEM.tenant, project=SYSTEM.project, alias=alias, version=0, created_at="",
            key_id=ENV_KEY_ID, size=len(self._env[alias]),
        )  # fmt: skip

    def _from_env(self, scope: Scope, alias: str) -> bool:
        return scope == SYSTEM and alias in self._env

    async def set(self, scope: Scope, alias: str, value: bytes) -> CredentialMeta:
        """Store ``value`` as the alias's next version (1 for a new alias); nothing is written on an error."""
        _check_scope(scope)
        check_alias(alias)
        value = check_value(value)
        if self._from_env(scope, alias):
            raise KeychainError(f"system/system/{alias} comes from the environment (NOETL_KEYCHAIN_ENV_VARS): set it there")
        key = scope.key(alias)
        kv = await self._kv()
        for _ in range(10):
            _, revision, last = await self._latest(key)
            version = last + 1
            aad = f"{key}.{version}".encode()
            data_key = AESGCM.generate_key(bit_length=256)
            nonce = secrets.token_bytes(_NONCE)
            stored = _Stored(
                version=version,
                created_at=datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                key_id=self._kek.id,
                wrapped_key=_wrap(self._kek, data_key, aad),
                nonce=_b64(nonce),
                ciphertext=_b64(AESGCM(data_key).encrypt(nonce, value, aad)),
                size=len(value),
            )
            try:
                await kv.update(key, _encode.encode(stored), last=revision)
            except KeyWrongLastSequenceError:
                continue  # another writer set a version in between: count again
            log.info("keychain.set", tenant=scope.tenant, project=scope.project, alias=alias, version=version)
            return self._meta(scope, alias, stored)
        raise KeychainError(f"{key}: too many concurrent writers, nothing was written")

    async def resolve(self, scope: Scope, alias: str) -> Resolved:
        """The newest version's value; :class:`UnknownCredential` if the alias is not set in ``scope``."""
        _check_scope(scope)
        check_alias(alias)
        if self._from_env(scope, alias):
            return Resolved(self._env[alias], 0)
        key = scope.key(alias)
        stored, _, _ = await self._latest(key)
        if stored is None:
            raise UnknownCredential(f"no credential {alias!r} in tenant {scope.tenant!r} project {scope.project!r}")
        aad = f"{key}.{stored.version}".encode()
        kek = self._keks.get(stored.key_id)
        if kek is None:
            raise KeychainError(f"credential {key} version {stored.version} is wrapped under key {stored.key_id}, which this process does not have")
        data_key = _unwrap(kek, stored.wrapped_key, aad, f"{key} version {stored.version}")
        try:
            value = AESGCM(data_key).decrypt(
                _unb64(stored.nonce, "nonce", key), _unb64(stored.ciphertext, "ciphertext", key), aad
            )
        except (InvalidTag, ValueError) as e:
            raise KeychainError(f"credential {key} version {stored.version} does not decrypt (tampered or moved)") from e
        return Resolved(value, stored.version)

    async def meta(self, scope: Scope, alias: str) -> CredentialMeta | None:
        _check_scope(scope)
        check_alias(alias)
        if self._from_env(scope, alias):
            return self._env_meta(alias)
        stored, _, _ = await self._latest(scope.key(alias))
        return None if stored is None else self._meta(scope, alias, stored)

    async def exists(self, scope: Scope, alias: str) -> bool:
        return await self.meta(scope, alias) is not None

    async def _keys(self, scope: Scope | None) -> list[str]:
        await self._kv()
        prefix = f"$KV.{KEYCHAIN_BUCKET}."
        wanted = f"{prefix}{scope.tenant}.{scope.project}.*" if scope else f"{prefix}*.*.*"
        return sorted([s[len(prefix):] async for s in stream_subjects(self._js, f"KV_{KEYCHAIN_BUCKET}", wanted)])

    async def list(self, scope: Scope | None = None) -> list[CredentialMeta]:
        """Metadata of every credential in ``scope`` (None: every scope), sorted by tenant, project, alias."""
        if scope is not None:
            _check_scope(scope)
        found: list[CredentialMeta] = []
        if scope is None or scope == SYSTEM:
            found += [self._env_meta(alias) for alias in self._env]
        for key in await self._keys(scope):
            tenant, project, alias = key.split(".", 2)
            if tenant == SYSTEM.tenant and project == SYSTEM.project and alias in self._env:
                continue
            stored, _, _ = await self._latest(key)
            if stored is not None:
                found.append(self._meta(Scope(tenant, project), alias, stored))
        return sorted(found, key=lambda m: (m.tenant, m.project, m.alias))

    async def delete(self, scope: Scope, alias: str) -> None:
        """Remove the alias with every version it had (a purge); the next ``set`` goes on counting versions."""
        _check_scope(scope)
        check_alias(alias)
        if self._from_env(scope, alias):
            raise KeychainError(f"system/system/{alias} comes from the environment (NOETL_KEYCHAIN_ENV_VARS): unset it there")
        key = scope.key(alias)
        stored, revision, _ = await self._latest(key)
        if stored is None:
            raise UnknownCredential(f"no credential {alias!r} in tenant {scope.tenant!r} project {scope.project!r}")
        headers = {
            "KV-Operation": "PURGE",
            "Nats-Rollup": "sub",
            "Nats-Expected-Last-Subject-Sequence": str(revision),
        }
        try:
            await self._js.publish(f"$KV.{KEYCHAIN_BUCKET}.{key}", _encode.encode(_Tombstone(version=stored.version)), headers=headers)
        except APIError as e:
            raise KeychainError(f"{key} changed while it was being deleted; nothing was deleted: {e.description}") from e
        log.info("keychain.delete", tenant=scope.tenant, project=scope.project, alias=alias)

    async def rewrap(self, new: PlatformKey) -> int:
        """Re-wrap every credential's data key under ``new``; the count re-wrapped.

        Values are not re-encrypted. Each key is rewritten compare-and-set with a
        rollup, so the older versions (wrapped under an old key) are dropped.
        """
        keks = self._keks | {new.id: new}
        count = 0
        for key in await self._keys(None):
            for _ in range(10):
                stored, revision, _ = await self._latest(key)
                if stored is None:
                    break
                old = keks.get(stored.key_id)
                if old is None:
                    raise KeychainError(f"credential {key} is wrapped under key {stored.key_id}, which this process does not have")
                aad = f"{key}.{stored.version}".encode()
                data_key = _unwrap(old, stored.wrapped_key, aad, f"{key} version {stored.version}")
                moved = msgspec.structs.replace(stored, key_id=new.id, wrapped_key=_wrap(new, data_key, aad))
                headers = {"Nats-Rollup": "sub", "Nats-Expected-Last-Subject-Sequence": str(revision)}
                try:
                    await self._js.publish(f"$KV.{KEYCHAIN_BUCKET}.{key}", _encode.encode(moved), headers=headers)
                except APIError as e:
                    if e.err_code in (10071, 10164):
                        continue  # set or deleted meanwhile: read it again
                    raise KeychainError(f"cannot rewrap {key}: {e.description}") from e
                count += 1
                break
            else:
                raise KeychainError(f"{key} kept changing during the rewrap; run it again")
        self._kek = new
        self._keks = keks
        log.info("keychain.rewrap", count=count, key_id=new.id)
        return count
