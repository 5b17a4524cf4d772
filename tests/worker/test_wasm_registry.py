"""The plug-in registry on a real nats-server: Object Store + catalog KV, versions, digests, hot reload."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta

from worker.plugins import (
    PluginDigestMismatch,
    PluginNotFound,
    PluginRegistry,
    PluginRegistryError,
    active_key,
)
from worker.toolchain import build
from worker.wasm import Grants, WasmAbiError, WasmHost
from locator.subjects import CATALOG_BUCKET, PLUGINS_BUCKET

PROBE = Path(__file__).parent / "wasm" / "probe.c"
SYSTEM = Grants(plugin="system/probe", ring="system")


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    out = tmp_path_factory.mktemp("wasm")
    return {v: build(PROBE, out / f"v{v}.wasm", defines=["PURE", f"VERSION={v}"]).read_bytes() for v in (1, 2)}


@pytest.fixture
def host() -> Iterator[WasmHost]:
    h = WasmHost(fuel=10_000_000)
    yield h
    h.close()


async def test_register_bumps_versions_and_hot_reloads(js: JetStreamContext, host: WasmHost, versions: dict[int, bytes]) -> None:
    registry = PluginRegistry(js, host)
    first, created = await registry.register("acme/web", "tools/probe", versions[1])
    assert created and first.version == 1 and first.object == "acme/web/tools/probe@v1"
    record, module = await registry.load("acme/web", "tools/probe")
    assert record == first and host.invoke(module, b"v", grants=SYSTEM).output == b"1"
    again, created = await registry.register("acme/web", "tools/probe", versions[1])
    assert not created and again == first  # the same bytes: no new version
    second, created = await registry.register("acme/web", "tools/probe", versions[2])
    assert created and second.version == 2 and second.digest != first.digest
    # The same registry (no restart) loads version 2 on the next dispatch; version 1 stays loadable.
    record, module = await registry.load("acme/web", "tools/probe")
    assert record.version == 2 and host.invoke(module, b"v", grants=SYSTEM).output == b"2"
    _, old = await registry.load("acme/web", "tools/probe", 1)
    assert host.invoke(old, b"v", grants=SYSTEM).output == b"1"
    # Another registry (another process) sees the same catalog.
    other = PluginRegistry(js, host)
    assert [(r.path, r.version) for r in await other.list("acme/web")] == [("tools/probe", 1), ("tools/probe", 2)]
    assert await other.list("acme/other") == []


async def test_a_module_whose_digest_does_not_match_is_refused(
    js: JetStreamContext, host: WasmHost, versions: dict[int, bytes]
) -> None:
    record, _ = await PluginRegistry(js, host).register("system", "probe", versions[1])
    store = await js.object_store(PLUGINS_BUCKET)
    await store.put(record.object, versions[2], meta=ObjectMeta(name=record.object))  # swapped behind the catalog's back
    with pytest.raises(PluginDigestMismatch, match=f"the catalog records {record.digest}"):
        await PluginRegistry(js, host).load("system", "probe")


async def test_unknown_plugins_and_bad_names(js: JetStreamContext, host: WasmHost, versions: dict[int, bytes]) -> None:
    registry = PluginRegistry(js, host)
    with pytest.raises(PluginNotFound, match="no plug-in nope registered for acme/web"):
        await registry.load("acme/web", "nope")
    await registry.register("acme/web", "p", versions[1])
    with pytest.raises(PluginNotFound, match="no version 7"):
        await registry.load("acme/web", "p", 7)
    for owner, path in (("acme", "p"), ("Acme/web", "p"), ("acme/web", "../p"), ("acme/web", "a.b")):
        with pytest.raises(PluginRegistryError, match="invalid plug-in"):
            await registry.register(owner, path, versions[1])
    with pytest.raises(WasmAbiError, match="not a valid WASM module"):
        await registry.register("acme/web", "q", b"not wasm")
    kv = await js.key_value(CATALOG_BUCKET)
    assert [k for k in await kv.keys() if "_plugins" in k and ".q." in k + "."] == []  # nothing written
    assert (await kv.get(active_key("acme/web", "p"))).value is not None
