"""The catalog against a real nats-server: register, read, list, immutability, and `latest` only going up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from locator.errors import LocatorError
from system_playbooks.orchestrate.catalog import (
    Catalog,
    PlaybookNotFound,
    UnknownPlugin,
    VersionConflict,
    latest_key,
    version_key,
)
from system_playbooks.orchestrate.playbook import PlaybookError, Policy, load_playbook
from tests import wasm_plugins
from tests.wasm_plugins import register_plugin

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = sorted((REPO / "examples" / "playbooks").glob("*.yaml"))
BAD = sorted((Path(__file__).parent / "bad").glob("*.yaml"))
POLICY = Policy(python_allow=("examples.tools.",), http_hosts=("api.example.com", "*.example.org"))

score_wasm = wasm_plugins.score_wasm  # the session fixture, for this module


def text(path: str = "demo/hello", version: int = 1, result: str = "hi") -> str:
    return f"path: {path}\nversion: {version}\nsteps:\n  - {{name: a, tool: {{kind: noop, result: {result}}}}}\n"


@pytest.fixture
async def kv(js: JetStreamContext) -> KeyValue:
    return await js.key_value("catalog")


@pytest.fixture
def catalog(kv: KeyValue) -> Catalog:
    return Catalog(kv)


async def snapshot(kv: KeyValue) -> dict[str, tuple[int, bytes]]:
    """Every key with its revision and value: what 'nothing changed' is compared with.

    The keys come from the bucket's stream (the subjects that hold a message), not from ``kv.keys()``,
    whose watcher can report an empty bucket when it starts before its first message arrives.
    """
    info = await kv._js.stream_info(f"KV_{kv._name}", subjects_filter=f"$KV.{kv._name}.>")
    out: dict[str, tuple[int, bytes]] = {}
    for subject in sorted(info.state.subjects or {}):
        key = subject.removeprefix(f"$KV.{kv._name}.")
        entry = await kv.get(key)
        out[key] = (entry.revision or 0, entry.value or b"")
    return out


def test_keys_are_valid_nats_kv_keys() -> None:
    assert version_key("acme", "web", "etl/daily-run", 3) == "acme.web.etl.daily-run.v3"
    assert latest_key("acme", "web", "etl/daily-run") == "acme.web.etl.daily-run.latest"
    with pytest.raises(LocatorError):
        version_key("Acme", "web", "x", 1)
    with pytest.raises(PlaybookNotFound):
        latest_key("acme", "web", "../etc")


async def test_register_get_list(catalog: Catalog, kv: KeyValue) -> None:
    pb = await catalog.register("acme", "web", text(), policy=POLICY)
    assert (pb.path, pb.version) == ("demo/hello", 1)
    assert await catalog.get("acme", "web", "demo/hello") == pb
    assert await catalog.get("acme", "web", "demo/hello", 1) == pb
    assert await catalog.list("acme", "web") == [("demo/hello", 1)]
    # The value is the playbook's canonical JSON; `latest` holds the version number.
    entry = await kv.get("acme.web.demo.hello.v1")
    assert msgspec.json.decode(entry.value or b"")["path"] == "demo/hello"
    assert (await kv.get("acme.web.demo.hello.latest")).value == b"1"
    # Other tenants and projects see nothing.
    assert await catalog.list("acme", "api") == []
    assert await catalog.list("other", "web") == []
    with pytest.raises(PlaybookNotFound):
        await catalog.get("other", "web", "demo/hello")


async def test_every_example_registers_and_lists(catalog: Catalog, js: JetStreamContext, score_wasm: Path) -> None:
    await register_plugin(js, score_wasm, "tools/score")  # examples/playbooks/wasm_score.yaml runs it
    for path in EXAMPLES:
        await catalog.register("acme", "web", path, policy=POLICY)
    listed = await catalog.list("acme", "web")
    assert listed == sorted((load_playbook(p, policy=POLICY).path, load_playbook(p, policy=POLICY).version) for p in EXAMPLES)
    for path in EXAMPLES:
        want = load_playbook(path, policy=POLICY)
        assert await catalog.get("acme", "web", want.path, want.version) == want


async def test_a_wasm_step_needs_the_plugin_version_it_names(
    catalog: Catalog, kv: KeyValue, js: JetStreamContext, score_wasm: Path
) -> None:
    def wasm(plugin: str, pin: str = "") -> str:
        return f"path: demo/w\nversion: 1\nsteps:\n  - {{name: a, tool: {{kind: wasm, plugin: {plugin}{pin}}}}}\n"

    with pytest.raises(UnknownPlugin, match=r"^steps\[0\]\.tool\.plugin: no plug-in tools/score registered for acme/web") as e:
        await catalog.add("acme", "web", wasm("tools/score"), policy=POLICY)
    assert isinstance(e.value, PlaybookError) and e.value.path == "steps[0].tool.plugin"
    assert await snapshot(kv) == {}
    record = await register_plugin(js, score_wasm, "tools/score")
    before = await snapshot(kv)
    with pytest.raises(UnknownPlugin, match=r"^steps\[0\]\.tool\.version: plug-in tools/score has no version 2"):
        await catalog.add("acme", "web", wasm("tools/score", ", version: 2"), policy=POLICY)
    assert await snapshot(kv) == before
    assert (await catalog.add("acme", "web", wasm("tools/score", f", version: {record.version}"), policy=POLICY)).created


async def test_same_content_again_is_idempotent(catalog: Catalog, kv: KeyValue) -> None:
    first = await catalog.add("acme", "web", text(), policy=POLICY)
    before = await snapshot(kv)
    # Comments and layout are not content: the canonical JSON is compared.
    again = await catalog.add("acme", "web", "# a comment\n" + text().replace("steps:\n  - ", "steps:\n    - "), policy=POLICY)
    assert first.created and not again.created and again.playbook == first.playbook
    assert await snapshot(kv) == before


async def test_conflicting_version_is_refused_and_changes_nothing(catalog: Catalog, kv: KeyValue) -> None:
    await catalog.register("acme", "web", text(result="one"), policy=POLICY)
    before = await snapshot(kv)
    with pytest.raises(VersionConflict, match="demo/hello version 1 is already registered"):
        await catalog.register("acme", "web", text(result="two"), policy=POLICY)
    assert await snapshot(kv) == before
    assert (await catalog.get("acme", "web", "demo/hello")).steps[0].tool.result == "one"  # type: ignore[union-attr]


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
async def test_bad_playbook_is_rejected_with_its_path_and_changes_nothing(catalog: Catalog, kv: KeyValue, path: Path) -> None:
    await catalog.register("acme", "web", text(), policy=POLICY)
    before = await snapshot(kv)
    expect = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(PlaybookError) as info:
        await catalog.register("acme", "web", path, policy=POLICY)
    assert expect in str(info.value)
    assert await snapshot(kv) == before


async def test_example_needing_the_policy_is_refused_without_it(catalog: Catalog, kv: KeyValue) -> None:
    needs_python = [p for p in EXAMPLES if "kind: python" in p.read_text()]
    assert needs_python
    with pytest.raises(PlaybookError, match=r"^steps\[\d+\]\.tool\.call: "):
        await catalog.register("acme", "web", needs_python[0], policy=Policy())
    assert await snapshot(kv) == {}


async def test_latest_never_goes_down(catalog: Catalog, kv: KeyValue) -> None:
    await catalog.register("acme", "web", text(version=2, result="two"), policy=POLICY)
    await catalog.register("acme", "web", text(version=1, result="one"), policy=POLICY)
    assert (await catalog.get("acme", "web", "demo/hello")).version == 2
    assert (await catalog.get("acme", "web", "demo/hello", 1)).version == 1
    assert await catalog.list("acme", "web") == [("demo/hello", 1), ("demo/hello", 2)]
    assert (await kv.get(latest_key("acme", "web", "demo/hello"))).value == b"2"


async def test_concurrent_registrations_end_on_the_highest_version(catalog: Catalog, js: JetStreamContext) -> None:
    # Separate Catalog objects so every registration races on the KV, not on shared Python state.
    kvs = [await js.key_value("catalog") for _ in range(10)]
    await asyncio.gather(
        *(Catalog(kv).register("acme", "web", text(version=v, result=f"r{v}"), policy=POLICY) for kv, v in zip(kvs, range(1, 11)))
    )
    assert await catalog.latest_version("acme", "web", "demo/hello") == 10
    assert len(await catalog.list("acme", "web")) == 10


async def test_missing_version_and_missing_path(catalog: Catalog) -> None:
    await catalog.register("acme", "web", text(), policy=POLICY)
    with pytest.raises(PlaybookNotFound, match="no version 7"):
        await catalog.get("acme", "web", "demo/hello", 7)
    with pytest.raises(PlaybookNotFound, match="no playbook demo/other"):
        await catalog.get("acme", "web", "demo/other")


async def test_registration_that_died_before_latest_is_repaired_by_a_retry(catalog: Catalog, kv: KeyValue) -> None:
    await catalog.register("acme", "web", text(), policy=POLICY)
    await kv.purge(latest_key("acme", "web", "demo/hello"))
    with pytest.raises(KeyNotFoundError):
        await kv.get(latest_key("acme", "web", "demo/hello"))
    assert not (await catalog.add("acme", "web", text(), policy=POLICY)).created
    assert await catalog.latest_version("acme", "web", "demo/hello") == 1


async def test_a_decoded_document_registers_like_yaml(catalog: Catalog) -> None:
    doc = {"path": "demo/json", "version": 1, "steps": [{"name": "a", "tool": {"kind": "noop"}}]}
    pb = await catalog.register("acme", "web", doc, policy=POLICY)
    assert await catalog.get("acme", "web", "demo/json") == pb
