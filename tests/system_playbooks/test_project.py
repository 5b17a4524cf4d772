"""system/project remembers what it wrote, and never trusts that memory past a revision check."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js import JetStreamContext
from nats.js.errors import NoKeysError

from kernel.host import context_for, load_plugin, system_manifests
from locator import new_event, shard_for
from locator.subjects import vis_bucket
from locator.topology import Topology
from projector.archiveindex import ArchiveIndex, ArchivePart, ArchiveRef, IndexRow, encode_ref
from projector.cache import KvProjectionCache, ProjectionWrite
from projector.fold import WalEvent, fold
from projector.projection import canonical
from projector.snapshots import SnapshotStore
from system_playbooks.project.plugin import ProjectPlugin

SHARD = shard_for("acme", "web", "", 4)


def events(execution_id: str, first_seq: int, count: int) -> list[WalEvent]:
    return [
        WalEvent(first_seq + i, new_event(tenant="acme", project="web", execution_id=execution_id,
                                          type="user.tick", payload={"i": first_seq + i}))
        for i in range(count)
    ]


async def test_a_stale_remembered_entry_is_refolded_from_kv(js: JetStreamContext, tmp_path: Path) -> None:
    manifest = next(m for m in system_manifests() if m.path == "system/project")
    cache = await KvProjectionCache.open(js, SHARD)
    ctx = context_for(manifest, SHARD, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/objects"))
    plugin = ProjectPlugin()
    first, second, third = events("77", 1, 3), events("77", 4, 2), events("77", 6, 2)
    await plugin.handle(ctx, first)
    await plugin.handle(ctx, second)  # folded onto the remembered entry
    entry = await cache.get("77")
    assert entry is not None and entry.projection is not None
    assert canonical(entry.projection) == canonical(fold(None, first + second))  # type: ignore[arg-type]

    # Someone else rewrites the entry (as materialize does with a pointer): the remembered revision is stale.
    await cache.put("77", entry.projection, revision=entry.revision)
    await plugin.handle(ctx, third)
    after = await cache.get("77")
    assert after is not None and after.projection is not None
    assert canonical(after.projection) == canonical(fold(None, first + second + third))  # type: ignore[arg-type]
    assert after.revision == entry.revision + 2


def step_exits(execution_id: str, first_seq: int, count: int, size: int) -> list[WalEvent]:
    """``count`` steps each ending with a result of ``size`` bytes: within every event limit, too big together."""
    return [
        WalEvent(first_seq + i, new_event(tenant="acme", project="web", execution_id=execution_id, type="step.exit",
                                          step=f"s{first_seq + i}", attempt=1, payload={"result": "r" * size}))
        for i in range(count)
    ]  # fmt: skip


async def test_a_projection_over_the_kv_limit_is_stored_by_reference_and_folded_on(
    js: JetStreamContext, tmp_path: Path
) -> None:
    store = SnapshotStore(f"file://{tmp_path}/objects")
    project, materialize = (m for m in system_manifests(["project", "materialize"]))
    cache = await KvProjectionCache.open(js, SHARD)  # the limit the server announced: 1 MiB less headroom
    ctx = context_for(project, SHARD, cache=cache, snapshots=store)
    first, second = step_exits("88", 1, 10, 60_000), step_exits("88", 11, 10, 60_000)
    small = events("89", 30, 2)
    assert await ProjectPlugin().handle(ctx, first + small) == []
    entry = await cache.get("88")
    assert entry is not None and entry.projection is not None  # 600 KB still fits a KV value

    # A new plug-in (a restarted kernel) remembers nothing: it reads the entry, folds, and the result no longer fits.
    assert await ProjectPlugin().handle(ctx, second) == []
    entry = await cache.get("88")
    whole = fold(None, first + second)
    assert whole is not None and len(canonical(whole)) > cache.max_value
    assert entry is not None and entry.projection is None and entry.pointer is not None
    assert (entry.pointer.last_seq, entry.pointer.status, entry.pointer.pointer.row) == (20, "RUNNING", 0)
    row = store.read_row(entry.pointer.pointer.segment, 0)
    assert row.projection.encode() == canonical(whole)
    assert (row.execution_id, row.status, row.last_seq, row.event_count) == ("88", "RUNNING", 20, 20)
    assert store.read_segment(entry.pointer.pointer.segment).num_rows == 1
    others = await cache.get("89")
    assert others is not None and others.projection is not None and others.projection.event_count == 2

    # The next batch folds onto the projection read back through the pointer (again by a fresh plug-in),
    # and the one after that onto the one it remembers; the execution ends while still too big for KV.
    done = WalEvent(22, new_event(tenant="acme", project="web", execution_id="88", type="execution.completed"))
    third = step_exits("88", 21, 1, 100)
    assert await ProjectPlugin().handle(ctx, third) == []
    plugin = ProjectPlugin()
    assert await plugin.handle(ctx, [done]) == []
    entry = await cache.get("88")
    final = fold(None, first + second + third + [done])
    assert final is not None and entry is not None and entry.pointer is not None
    assert (entry.pointer.last_seq, entry.pointer.status) == (22, "COMPLETED")
    assert store.read_row(entry.pointer.pointer.segment, 0).projection.encode() == canonical(final)

    # materialize finds the pointer of the finished execution: it is materialized already, no row is written
    # for it and the entry stays as it is; the small execution beside it gets its row.
    before = len(store.list_segments(SHARD))
    mctx = context_for(materialize, SHARD, cache=cache, snapshots=store)
    await load_plugin(materialize).handle(mctx, await stored(cache, "88", "89"))
    segments = store.list_segments(SHARD)
    assert len(segments) == before + 1
    assert store.read_segment(segments[-1]).column("execution_id").to_pylist() == ["89"]
    assert await cache.get("88") == entry


async def test_an_entry_that_cannot_be_read_isolates_its_execution_not_the_batch(
    js: JetStreamContext, tmp_path: Path
) -> None:
    project, materialize = (m for m in system_manifests(["project", "materialize"]))
    cache, store = await KvProjectionCache.open(js, SHARD), SnapshotStore(f"file://{tmp_path}/objects")
    ctx = context_for(project, SHARD, cache=cache, snapshots=store)
    await cache.kv.put("66", b'{"pointer": "nowhere"}')  # written by something else than noetl-edge
    broken, fine = events("66", 1, 2), events("67", 3, 2)
    rejects = await ProjectPlugin().handle(ctx, [broken[0], fine[0], broken[1], fine[1]])
    assert [(r.seq, r.reason) for r in rejects] == [(1, "projection_unreadable"), (2, "projection_unreadable")]
    assert all("the cache entry of 66 is neither a projection nor a pointer" in r.detail for r in rejects)
    entry = await cache.get("67")
    assert entry is not None and entry.projection is not None
    assert canonical(entry.projection) == canonical(fold(None, fine))  # type: ignore[arg-type]
    # materialize is delivered the bucket's writes: the unreadable one is left out, the others get rows.
    await load_plugin(materialize).handle(context_for(materialize, SHARD, cache=cache, snapshots=store),
                                          await stored(cache, "66", "67"))  # fmt: skip
    (segment,) = store.list_segments(SHARD)
    assert store.read_segment(segment).column("execution_id").to_pylist() == ["67"]


async def stored(cache: KvProjectionCache, *keys: str) -> list[ProjectionWrite]:
    """The bucket's writes of ``keys`` as system/materialize's consumer delivers them, in stream order."""
    writes = []
    for key in keys:
        entry = await cache.kv.get(key)
        assert entry.revision is not None and entry.value is not None
        writes.append(ProjectionWrite(entry.revision, key, entry.value))
    return sorted(writes)


async def vis_keys_of(js: JetStreamContext, execution_id: str) -> list[str]:
    try:
        keys = await (await js.key_value(vis_bucket(SHARD))).keys()
    except NoKeysError:
        return []
    return [k for k in keys if k.endswith(f".{execution_id}")]


async def test_an_entry_created_while_its_execution_was_archived_goes_again(
    js: JetStreamContext, topology: Topology, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fold read no entry and no index row; system/cleanup recorded the row and dropped the (absent) entry
    before the fold created one: system/project looks again after creating it, and drops it (and its listing
    key) — else it would outlive the archive for good. A fold past the archive (a late event) keeps its entry."""
    manifest = next(m for m in system_manifests() if m.path == "system/project")
    cache = await KvProjectionCache.open(js, SHARD)
    snapshots = SnapshotStore(f"file://{tmp_path}/objects")
    ctx = context_for(manifest, SHARD, cache=cache, snapshots=snapshots, js=js, topology=topology)
    index = ctx.archive_index()
    assert index is not None
    history = events("88", 1, 3)
    archived = fold(None, history)
    assert archived is not None
    part = ArchivePart(segment="file:///nowhere.arrow", row=0, rows=3, first_seq=1, last_seq=3, digest="d")
    ref = ArchiveRef(tenant="acme", project="web", parts=(part,), archived_at="2026-12-05T00:00:00.000Z")
    row = IndexRow(execution_id="88", tenant="acme", project="web", status=archived.status, last_seq=3, event_count=3,
                   projection=canonical(archived).decode(), history=encode_ref(ref))  # fmt: skip

    real_get_row = ArchiveIndex.get_row
    calls = 0

    async def archived_during_the_first_lookup(self: ArchiveIndex, execution_id: str, **kw: str | None) -> IndexRow | None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the lookup has read the manifest: the archiver records the row only now
            found = await real_get_row(self, execution_id, **kw)
            await index.record([row])
            return found
        return await real_get_row(self, execution_id, **kw)

    monkeypatch.setattr(ArchiveIndex, "get_row", archived_during_the_first_lookup)
    await ProjectPlugin().handle(ctx, history)
    assert calls == 2  # before the fold, and again after creating the entry
    assert await cache.get("88") is None
    assert await vis_keys_of(js, "88") == []

    # A late event re-opens it: folded onto the archived projection, and that entry stays.
    plugin = ProjectPlugin()
    late = events("88", 9, 1)
    await plugin.handle(ctx, late)
    entry = await cache.get("88")
    assert entry is not None and entry.projection is not None
    assert canonical(entry.projection) == canonical(fold(archived, late))  # type: ignore[arg-type]


async def test_a_redelivered_batch_drops_an_entry_its_execution_was_archived_past(
    js: JetStreamContext, topology: Topology, tmp_path: Path
) -> None:
    """The batch that created the entry failed before its look at the index (NATS timed out under load) and
    system/cleanup archived the execution meanwhile: the redelivery, which folds nothing new, drops it."""
    manifest = next(m for m in system_manifests() if m.path == "system/project")
    cache = await KvProjectionCache.open(js, SHARD)
    ctx = context_for(manifest, SHARD, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/objects"), js=js,
                      topology=topology)  # fmt: skip
    index = ctx.archive_index()
    assert index is not None
    history = events("99", 1, 4)
    await ProjectPlugin().handle(ctx, history)
    entry = await cache.get("99")
    assert entry is not None and entry.last_seq == 4
    archived = fold(None, history)
    assert archived is not None
    part = ArchivePart(segment="file:///nowhere.arrow", row=0, rows=4, first_seq=1, last_seq=4, digest="d")
    ref = ArchiveRef(tenant="acme", project="web", parts=(part,), archived_at="2026-12-05T00:00:00.000Z")
    await index.record([IndexRow(execution_id="99", tenant="acme", project="web", status=archived.status, last_seq=4,
                                 event_count=4, projection=canonical(archived).decode(), history=encode_ref(ref))])  # fmt: skip

    await ProjectPlugin().handle(ctx, history)  # redelivered (a new pump: nothing remembered)
    assert await cache.get("99") is None
    assert await vis_keys_of(js, "99") == []


async def test_a_redelivery_keeps_the_entry_of_an_execution_not_archived(
    js: JetStreamContext, topology: Topology, tmp_path: Path
) -> None:
    manifest = next(m for m in system_manifests() if m.path == "system/project")
    cache = await KvProjectionCache.open(js, SHARD)
    ctx = context_for(manifest, SHARD, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/objects"), js=js,
                      topology=topology)  # fmt: skip
    history = events("98", 1, 3)
    await ProjectPlugin().handle(ctx, history)
    await ProjectPlugin().handle(ctx, history)
    entry = await cache.get("98")
    assert entry is not None and entry.last_seq == 3
    assert await vis_keys_of(js, "98") != []
