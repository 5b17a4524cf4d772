"""The keychain on a real nats-server: versions, encryption at rest, rewrap, bad input writing nothing."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from worker.keychain import (
    MAX_VALUE,
    SYSTEM,
    Keychain,
    KeychainError,
    PlatformKey,
    Scope,
    UnknownCredential,
)

ACME = Scope("acme", "web")
OTHER = Scope("globex", "web")
SECRET = b"tok-3f9a1c77e2b04d5a"


async def messages(js: JetStreamContext) -> int:
    return (await js.stream_info("KV_keychain")).state.messages


async def raw_bytes(js: JetStreamContext) -> bytes:
    """Every message the stream ``KV_keychain`` stores, subject + headers + data, read one by one."""
    info = await js.stream_info("KV_keychain")
    out = b""
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            msg = await js.get_msg("KV_keychain", seq)
        except NotFoundError:  # a revision a rollup or purge removed
            continue
        out += msg.subject.encode() + repr(msg.headers).encode() + (msg.data or b"")
    return out


def chain(js: JetStreamContext, kek: PlatformKey, **kw: object) -> Keychain:
    return Keychain(js, kek, env={}, **kw)  # type: ignore[arg-type]


async def test_set_resolve_and_versions(js: JetStreamContext) -> None:
    keys = chain(js, PlatformKey.generate())
    first = await keys.set(ACME, "api", SECRET)
    assert (first.tenant, first.project, first.alias, first.version, first.size) == ("acme", "web", "api", 1, len(SECRET))
    assert await keys.resolve(ACME, "api") == (SECRET, 1)
    second = await keys.set(ACME, "api", b"rotated-value")
    assert second.version == 2
    assert await keys.resolve(ACME, "api") == (b"rotated-value", 2)
    assert await keys.meta(ACME, "api") == second
    assert await keys.exists(ACME, "api") and not await keys.exists(ACME, "nope")
    assert await keys.meta(ACME, "nope") is None
    # The KV history keeps the versions.
    kv = await js.key_value("keychain")
    assert [msgspec.json.decode(e.value or b"")["version"] for e in await kv.history("acme.web.api")] == [1, 2]


async def test_scopes_are_isolated_and_listed(js: JetStreamContext) -> None:
    keys = chain(js, PlatformKey.generate())
    await keys.set(ACME, "api", SECRET)
    await keys.set(OTHER, "db", b"dsn")
    with pytest.raises(UnknownCredential, match="'api' in tenant 'globex' project 'web'"):
        await keys.resolve(OTHER, "api")
    assert [m.alias for m in await keys.list(ACME)] == ["api"]
    assert [(m.tenant, m.alias) for m in await keys.list()] == [("acme", "api"), ("globex", "db")]
    assert await keys.list(Scope("nobody", "x")) == []


async def test_delete_purges_and_versions_go_on(js: JetStreamContext) -> None:
    keys = chain(js, PlatformKey.generate())
    await keys.set(ACME, "api", b"one")
    await keys.set(ACME, "api", b"two")
    await keys.delete(ACME, "api")
    assert not await keys.exists(ACME, "api") and await keys.list() == []
    assert b"one" not in await raw_bytes(js)  # not only hidden: the old ciphertexts are gone
    with pytest.raises(UnknownCredential):
        await keys.resolve(ACME, "api")
    with pytest.raises(UnknownCredential):
        await keys.delete(ACME, "api")
    again = await keys.set(ACME, "api", b"three")
    assert again.version == 3  # "api@1" never names two different values


async def test_stored_bytes_hold_neither_value_nor_its_base64(js: JetStreamContext) -> None:
    keys = chain(js, PlatformKey.generate())
    await keys.set(ACME, "api", SECRET)
    await keys.set(ACME, "api", SECRET + b"-2")
    raw = await raw_bytes(js)
    for needle in (SECRET, base64.b64encode(SECRET), base64.urlsafe_b64encode(SECRET), SECRET.hex().encode()):
        assert needle not in raw
    assert b"acme.web.api" in raw  # the stream read is the real one


async def test_a_ciphertext_moved_to_another_key_does_not_decrypt(js: JetStreamContext) -> None:
    keys = chain(js, PlatformKey.generate())
    await keys.set(ACME, "api", SECRET)
    await keys.set(ACME, "other", b"x")
    kv = await js.key_value("keychain")
    stolen = (await kv.get("acme.web.api")).value or b""
    await kv.put("acme.web.other", stolen)  # same version (1), another place
    with pytest.raises(KeychainError, match="tampered or moved"):
        await keys.resolve(ACME, "other")
    await kv.put("globex.web.api", stolen)  # same alias, another tenant
    with pytest.raises(KeychainError, match="tampered or moved"):
        await keys.resolve(OTHER, "api")
    assert await keys.resolve(ACME, "api") == (SECRET, 1)


async def test_rewrap_moves_every_value_to_the_new_key(js: JetStreamContext) -> None:
    old, new = PlatformKey.generate(), PlatformKey.generate()
    keys = chain(js, old)
    await keys.set(ACME, "api", b"old-version")
    await keys.set(ACME, "api", SECRET)
    await keys.set(OTHER, "db", b"dsn")
    await keys.set(OTHER, "gone", b"x")
    await keys.delete(OTHER, "gone")
    assert await keys.rewrap(new) == 2
    assert {m.key_id for m in await keys.list()} == {new.id}
    with_new = chain(js, new)
    assert await with_new.resolve(ACME, "api") == (SECRET, 2)
    assert await with_new.resolve(OTHER, "db") == (b"dsn", 1)
    with_old = chain(js, old)
    with pytest.raises(KeychainError, match=f"wrapped under key {new.id}, which this process does not have"):
        await with_old.resolve(ACME, "api")
    # No revision wrapped under the old key is left for the old key alone to read.
    kv = await js.key_value("keychain")
    assert [msgspec.json.decode(e.value or b"")["key_id"] for e in await kv.history("acme.web.api")] == [new.id]
    # A rewrap needing a key it was not given refuses, naming the key.
    with pytest.raises(KeychainError, match=f"wrapped under key {new.id}"):
        await chain(js, old).rewrap(PlatformKey.generate())
    assert await with_new.resolve(ACME, "api") == (SECRET, 2)
    # old_keks let a process read during a rewrap.
    assert await chain(js, PlatformKey.generate(), old_keks=[new]).resolve(OTHER, "db") == (b"dsn", 1)


async def test_bad_input_writes_nothing(js: JetStreamContext) -> None:
    keys = chain(js, PlatformKey.generate())
    await keys.set(ACME, "api", SECRET)
    before = await messages(js)
    for alias, value, message in [
        ("api", b"", "must not be empty"),
        ("api", b"x" * (MAX_VALUE + 1), f"at most {MAX_VALUE} bytes, got {MAX_VALUE + 1}"),
        ("Bad.Alias", b"x", "invalid alias 'Bad.Alias'"),
        ("", b"x", "invalid alias ''"),
        ("a" * 64, b"x", "invalid alias"),
        ("api", "text", "must be bytes"),
    ]:
        with pytest.raises(KeychainError, match=message):
            await keys.set(ACME, alias, value)  # type: ignore[arg-type]
    with pytest.raises(KeychainError, match="invalid tenant 'A.B'"):
        await keys.set(Scope("A.B", "web"), "api", b"x")
    assert await messages(js) == before
    assert (await keys.set(ACME, "api", b"x" * MAX_VALUE)).size == MAX_VALUE


async def test_env_credentials_are_system_scope_version_0(js: JetStreamContext) -> None:
    env = {"NOETL_KEYCHAIN_ENV_VARS": "PLATFORM_TOKEN, OTHER_ONE", "PLATFORM_TOKEN": "pt-1", "OTHER_ONE": "o"}
    keys = Keychain(js, PlatformKey.generate(), env=env)
    assert await keys.resolve(SYSTEM, "platform_token") == (b"pt-1", 0)
    assert await keys.exists(SYSTEM, "other_one") and not await keys.exists(ACME, "platform_token")
    assert [(m.alias, m.version, m.key_id) for m in await keys.list(SYSTEM)] == [("other_one", 0, "env"), ("platform_token", 0, "env")]
    with pytest.raises(KeychainError, match="comes from the environment"):
        await keys.set(SYSTEM, "platform_token", b"x")
    assert await messages(js) == 0  # never stored
    with pytest.raises(KeychainError, match="names MISSING, which is not set"):
        Keychain.env_credentials({"NOETL_KEYCHAIN_ENV_VARS": "MISSING"})
    with pytest.raises(KeychainError, match="no valid alias"):
        Keychain.env_credentials({"NOETL_KEYCHAIN_ENV_VARS": "A.B", "A.B": "x"})
    assert Keychain.env_credentials({}) == {}


def test_platform_key_sources(tmp_path: Path) -> None:
    with pytest.raises(KeychainError, match=f"NOETL_KEYCHAIN_KEY_FILE are unset and {tmp_path}/keychain.key does not exist"):
        PlatformKey.from_env(data_dir=tmp_path, env={})
    assert not (tmp_path / "keychain.key").exists()
    made = PlatformKey.from_env(data_dir=tmp_path, env={}, create=True)
    assert made.created and len(made.key) == 32 and len(made.id) == 8
    assert stat.S_IMODE(os.stat(tmp_path / "keychain.key").st_mode) == 0o600
    again = PlatformKey.from_env(data_dir=tmp_path, env={}, create=True)
    assert again.key == made.key and not again.created
    assert made.key.hex() not in repr(made) and base64.b64encode(made.key).decode() not in repr(made)

    other = PlatformKey.generate()
    text = base64.b64encode(other.key).decode()
    assert PlatformKey.from_env(data_dir=tmp_path, env={"NOETL_KEYCHAIN_KEY": text}).key == other.key
    (tmp_path / "k2").write_text(text + "\n")
    assert PlatformKey.from_env(data_dir=tmp_path, env={"NOETL_KEYCHAIN_KEY_FILE": str(tmp_path / "k2")}).id == other.id
    with pytest.raises(KeychainError, match="in NOETL_KEYCHAIN_KEY must be base64 of 32 bytes, got 16"):
        PlatformKey.from_env(data_dir=tmp_path, env={"NOETL_KEYCHAIN_KEY": base64.b64encode(b"x" * 16).decode()})
    with pytest.raises(KeychainError, match="NOETL_KEYCHAIN_KEY is not base64"):
        PlatformKey.from_env(data_dir=tmp_path, env={"NOETL_KEYCHAIN_KEY": "not base64!"})
    with pytest.raises(KeychainError, match=f"no platform key file at {tmp_path}/nope"):
        PlatformKey.from_env(data_dir=tmp_path, env={"NOETL_KEYCHAIN_KEY_FILE": str(tmp_path / "nope")})


async def test_missing_bucket_is_a_clear_error(nc: object) -> None:
    from nats.aio.client import Client

    assert isinstance(nc, Client)
    keys = chain(nc.jetstream(), PlatformKey.generate())
    with pytest.raises(KeychainError, match="KV bucket 'keychain' does not exist: bootstrap first"):
        await keys.resolve(ACME, "api")
