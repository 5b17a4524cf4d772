"""noetl-edge credential as a user runs it: a subprocess against a real nats-server."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from worker.keychain import MAX_VALUE, Keychain, PlatformKey, Scope
from natscluster.server import EmbeddedServer
from tests.conftest import cli_env

SECRET = "cli-secret-9d81f3a0b2"
ACME = Scope("acme", "web")


async def kv_messages(js: JetStreamContext) -> int:
    return (await js.stream_info("KV_keychain")).state.messages


@pytest.fixture
def keyed(tmp_path: Path) -> tuple[Path, PlatformKey]:
    """A data dir holding a platform key, as `up` leaves it."""
    data = tmp_path / "home"
    return data, PlatformKey.from_env(data_dir=data, env={}, create=True)


def one(nats_server: EmbeddedServer, data: Path, *args: str) -> list[str]:
    return ["credential", *args, "--nats-url", nats_server.url, "--data-dir", str(data)]


async def test_set_rotate_show_list_delete(
    nats_server: EmbeddedServer, js: JetStreamContext, cli: Any, keyed: tuple[Path, PlatformKey], tmp_path: Path
) -> None:
    data, kek = keyed
    who = ["--tenant", "acme", "--project", "web", "--alias", "api"]
    first = json.loads(cli(*one(nats_server, data, "set", *who), stdin=SECRET + "\n").stdout)
    assert (first["alias"], first["version"], first["size"], first["key_id"]) == ("api", 1, len(SECRET), kek.id)
    chain = Keychain(js, kek, env={})
    assert await chain.resolve(ACME, "api") == (SECRET.encode(), 1)  # the shell's newline dropped

    f = tmp_path / "value.bin"
    f.write_bytes(b"from-file\n")
    second = json.loads(cli(*one(nats_server, data, "rotate", *who, "--from-file", str(f))).stdout)
    assert second["version"] == 2
    assert await chain.resolve(ACME, "api") == (b"from-file\n", 2)  # a file is taken verbatim

    shown = cli(*one(nats_server, data, "show", *who))
    assert json.loads(shown.stdout)["version"] == 2
    listed = json.loads(cli(*one(nats_server, data, "list")).stdout)["credentials"]
    assert [(m["tenant"], m["alias"], m["version"]) for m in listed] == [("acme", "api", 2)]
    for out in (first, second, shown.stdout, listed):
        text = json.dumps(out)
        assert SECRET not in text and base64.b64encode(SECRET.encode()).decode() not in text and "from-file" not in text

    gone = cli(*one(nats_server, data, "delete", *who))
    assert json.loads(gone.stdout)["deleted"] is True
    missing = cli(*one(nats_server, data, "show", *who), check=False)
    assert missing.returncode == 1 and "no credential 'api' in tenant 'acme' project 'web'" in missing.stderr
    again = cli(*one(nats_server, data, "delete", *who), check=False)
    assert again.returncode == 1
    rot = cli(*one(nats_server, data, "rotate", *who), stdin="x", check=False)
    assert rot.returncode == 1 and "to rotate (use set)" in rot.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["set", "--alias", "api", SECRET], SECRET, "never taken from the command line"),
        (["set", "--alias", "api", "--value", SECRET], SECRET, "never taken from the command line"),
        (["rotate", "--alias", "api", SECRET], "", "never taken from the command line"),
        (["set", "--alias", "api"], "", "must not be empty"),
        (["set", "--alias", "api"], "\n", "must not be empty"),
        (["set", "--alias", "api"], "x" * (MAX_VALUE + 1), f"at most {MAX_VALUE} bytes"),
        (["set", "--alias", "Bad.Alias"], SECRET, "invalid alias 'Bad.Alias'"),
        (["set", "--alias", "api", "--from-file", "/nonexistent/v"], "", "cannot read --from-file /nonexistent/v"),
    ],
)
async def test_bad_input_exits_2_and_writes_nothing(
    nats_server: EmbeddedServer, js: JetStreamContext, cli: Any, keyed: tuple[Path, PlatformKey],
    args: list[str], stdin: str, message: str,
) -> None:  # fmt: skip
    data, _ = keyed
    proc = cli(*one(nats_server, data, *args, "--tenant", "acme", "--project", "web"), stdin=stdin, check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert SECRET not in proc.stderr + proc.stdout  # a value given as an argument is not echoed back
    assert await kv_messages(js) == 0


async def test_missing_platform_key_exits_2(nats_server: EmbeddedServer, js: JetStreamContext, cli: Any, tmp_path: Path) -> None:
    proc = cli(*one(nats_server, tmp_path / "empty", "set", "--tenant", "acme", "--project", "web", "--alias", "api"),
               stdin=SECRET, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert f"{tmp_path / 'empty'}/keychain.key does not exist" in proc.stderr
    assert await kv_messages(js) == 0


async def test_rewrap_from_a_key_file(
    nats_server: EmbeddedServer, js: JetStreamContext, cli: Any, keyed: tuple[Path, PlatformKey], tmp_path: Path
) -> None:
    data, kek = keyed
    for alias in ("api", "db"):
        cli(*one(nats_server, data, "set", "--tenant", "acme", "--project", "web", "--alias", alias), stdin=f"{SECRET}-{alias}")
    new = PlatformKey.generate()
    key_file = tmp_path / "new.key"
    key_file.write_text(base64.b64encode(new.key).decode() + "\n")
    bad = cli(*one(nats_server, data, "rewrap"), check=False)
    assert bad.returncode == 2 and "--new-key-file PATH or NOETL_KEYCHAIN_NEW_KEY" in bad.stderr
    out = json.loads(cli(*one(nats_server, data, "rewrap", "--new-key-file", str(key_file))).stdout)
    assert out == {"rewrapped": 2, "key_id": new.id, "previous_key_id": kek.id}
    assert await Keychain(js, new, env={}).resolve(ACME, "db") == (f"{SECRET}-db".encode(), 1)
    # Run again (say after a crash), it finishes: the new key unwraps what it already wrapped.
    assert json.loads(cli(*one(nats_server, data, "rewrap", "--new-key-file", str(key_file))).stdout)["rewrapped"] == 2
    # The old key (still in the data dir) reads nothing any more; the new one, given by env, does.
    third = tmp_path / "third.key"
    third.write_text(base64.b64encode(PlatformKey.generate().key).decode())
    stale = cli(*one(nats_server, data, "rewrap", "--new-key-file", str(third)), check=False)
    assert stale.returncode == 1 and f"wrapped under key {new.id}, which this process does not have" in stale.stderr
    env = cli_env(NOETL_KEYCHAIN_KEY=base64.b64encode(new.key).decode(), NOETL_KEYCHAIN_NEW_KEY=base64.b64encode(kek.key).decode())
    back = json.loads(cli(*one(nats_server, data, "rewrap"), env=env).stdout)
    assert back["rewrapped"] == 2 and back["key_id"] == kek.id
