"""system/project remembers what it wrote, and never trusts that memory past a revision check."""

from __future__ import annotations

from pathlib import Path

from nats.js import JetStreamContext

from kernel.host import context_for, system_manifests
from locator import new_event, shard_for
from projector.cache import KvProjectionCache
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
