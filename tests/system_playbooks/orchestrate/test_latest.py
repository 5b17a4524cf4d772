"""The edge's memory of ``latest`` pointers against a real nats-server: read once then remembered, raised by
another writer's registration through the bucket's stream, raised at once by :meth:`note`, dropped on a
reconnect; and resolving a start through it or the catalog never needs the playbook itself."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from kernel.connect import close, connect
from natscluster.server import EmbeddedServer
from system_playbooks.orchestrate.catalog import Catalog, PlaybookNotFound, version_key
from system_playbooks.orchestrate.latest import LatestVersions
from system_playbooks.orchestrate.playbook import Policy
from system_playbooks.orchestrate.start import UnknownPlaybook, resolve_playbook

POLICY = Policy()


def text(path: str = "demo/hello", version: int = 1) -> str:
    return f"path: {path}\nversion: {version}\nsteps:\n  - {{name: a, tool: {{kind: noop, result: {version}}}}}\n"


@pytest.fixture
async def catalog(js: JetStreamContext) -> Catalog:
    return Catalog(await js.key_value("catalog"))


@pytest.fixture
async def latest(js: JetStreamContext) -> AsyncIterator[LatestVersions]:
    held = await LatestVersions.open(js)
    try:
        yield held
    finally:
        await held.close()


async def until_latest(latest: LatestVersions, want: int) -> int:
    """Ask until the remembered latest is ``want`` (bounded: the stream delivers in well under the bound)."""
    for _ in range(500):
        got = await latest.latest_version("acme", "web", "demo/hello")
        if got == want:
            return got
        await asyncio.sleep(0.01)
    return got


async def test_the_latest_is_read_once_then_remembered(js: JetStreamContext, catalog: Catalog) -> None:
    await catalog.register("acme", "web", text(version=1), policy=POLICY)
    latest = await LatestVersions.open(js)  # after the registration: no notice of it arrives
    assert await latest.latest_version("acme", "web", "demo/hello") == 1
    assert await latest.latest_version("acme", "web", "demo/hello") == 1
    assert (latest.stats["misses"], latest.stats["hits"]) == (1, 1)
    with pytest.raises(PlaybookNotFound):  # an unknown path is not remembered as anything
        await latest.latest_version("acme", "web", "demo/nope")
    with pytest.raises(PlaybookNotFound):
        await latest.latest_version("globex", "web", "demo/hello")
    await latest.close()


async def test_a_registration_by_another_writer_raises_it_without_a_read(
    nats_server: EmbeddedServer, js: JetStreamContext, catalog: Catalog
) -> None:
    await catalog.register("acme", "web", text(version=1), policy=POLICY)
    latest = await LatestVersions.open(js)
    assert await latest.latest_version("acme", "web", "demo/hello") == 1
    other = await connect([nats_server.url], name="another-edge")
    try:
        await Catalog(await other.jetstream().key_value("catalog")).register("acme", "web", text(version=2), policy=POLICY)
    finally:
        await close(other)
    assert await until_latest(latest, 2) == 2
    assert latest.stats["misses"] == 1  # the notice raised it: never read again
    await latest.close()


async def test_latest_only_goes_up_and_a_note_is_seen_at_once(catalog: Catalog, latest: LatestVersions) -> None:
    await catalog.register("acme", "web", text(version=3), policy=POLICY)
    assert await latest.latest_version("acme", "web", "demo/hello") == 3
    await catalog.register("acme", "web", text(version=2), policy=POLICY)  # an older version, registered later
    latest.note("acme", "web", "demo/hello", 2)
    assert await latest.latest_version("acme", "web", "demo/hello") == 3
    await catalog.register("acme", "web", text(version=4), policy=POLICY)
    latest.note("acme", "web", "demo/hello", 4)  # what the edge's playbook route does after registering
    assert await latest.latest_version("acme", "web", "demo/hello") == 4
    assert await latest.has_version("acme", "web", "demo/hello", 2)


async def test_resolving_names_the_field_and_never_decodes_the_playbook(
    js: JetStreamContext, catalog: Catalog, latest: LatestVersions
) -> None:
    await catalog.register("acme", "web", text(version=1), policy=POLICY)
    await catalog.register("acme", "web", text(version=2), policy=POLICY)
    # A version whose stored value is not a playbook: resolving must not read it.
    kv = await js.key_value("catalog")
    await kv.create(version_key("acme", "web", "demo/hello", 5), b"not a playbook")
    for versions in (catalog, latest):
        assert await resolve_playbook(versions, "acme", "web", "demo/hello", None) == {"path": "demo/hello", "version": 2}
        assert await resolve_playbook(versions, "acme", "web", "demo/hello", 1) == {"path": "demo/hello", "version": 1}
        assert await resolve_playbook(versions, "acme", "web", "demo/hello", 5) == {"path": "demo/hello", "version": 5}
        with pytest.raises(UnknownPlaybook) as e:
            await resolve_playbook(versions, "acme", "web", "demo/hello", 3)
        assert e.value.field == "playbook.version"
        assert str(e.value) == "no version 3 of playbook demo/hello in acme/web (the latest is version 2)"
        for version in (None, 1):
            with pytest.raises(UnknownPlaybook) as e:
                await resolve_playbook(versions, "acme", "web", "demo/nope", version)
            assert e.value.field == "playbook.path"
            assert str(e.value).startswith("no playbook demo/nope in acme/web: register it first")
    hits = latest.stats["hits"]
    assert await resolve_playbook(latest, "acme", "web", "demo/hello", 1) == {"path": "demo/hello", "version": 1}
    assert latest.stats["hits"] == hits + 1  # an explicit version seen once is known: versions are never deleted


async def test_a_reconnect_drops_everything_remembered(nats_server: EmbeddedServer, js: JetStreamContext) -> None:
    nc: NATS = await connect([nats_server.url], name="edge", reconnect_wait=0.05)
    try:
        await Catalog(await js.key_value("catalog")).register("acme", "web", text(version=1), policy=POLICY)
        latest = await LatestVersions.open(nc.jetstream())
        assert await latest.latest_version("acme", "web", "demo/hello") == 1
        nats_server.stop()
        nats_server.start()  # same store, same port
        for _ in range(500):
            if nc.is_connected and nc.stats["reconnects"] == 1:
                break
            await asyncio.sleep(0.01)
        assert nc.stats["reconnects"] == 1
        misses = latest.stats["misses"]
        assert await latest.latest_version("acme", "web", "demo/hello") == 1
        assert (latest.stats["misses"], latest.stats["resets"]) == (misses + 1, 1)  # read again, following again
        assert await latest.latest_version("acme", "web", "demo/hello") == 1
        assert latest.stats["misses"] == misses + 1
        await latest.close()
    finally:
        await close(nc)
