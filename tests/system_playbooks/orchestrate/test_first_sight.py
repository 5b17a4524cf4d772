"""The orchestrator's first sight of an execution: a request stored after the lease began is planned without a
WAL lookup; one the shard's earlier holder, or a failed batch, may have decided on is looked up first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from kernel.host import ShardContext, context_for, system_manifests
from kernel.producer import Producer
from locator import new_event, shard_for
from locator.subjects import wal_stream
from locator.topology import Topology
from projector.cache import KvProjectionCache
from projector.fold import WalEvent
from projector.snapshots import SnapshotStore
from system_playbooks.orchestrate.catalog import Catalog
from system_playbooks.orchestrate.playbook import Policy
from system_playbooks.orchestrate.plugin import OrchestratePlugin

TENANT, PROJECT = "acme", "web"
PLAYBOOK = "path: demo/two\nversion: 1\nsteps:\n  - {name: a, tool: {kind: noop}, next: [{step: b}]}\n  - {name: b, tool: {kind: noop}}\n"


@pytest.fixture
async def ctx(js: JetStreamContext, topology: Topology, tmp_path: Path) -> ShardContext:
    await Catalog(await js.key_value("catalog")).register(TENANT, PROJECT, PLAYBOOK, policy=Policy())
    manifest = next(m for m in system_manifests() if m.path == "system/orchestrate")
    shard = shard_for(TENANT, PROJECT, "", topology.shard_count)
    return context_for(manifest, shard, cache=await KvProjectionCache.open(js, shard),
                       snapshots=SnapshotStore(f"file://{tmp_path}/objects"), js=js, topology=topology)  # fmt: skip


def counted(ctx: ShardContext) -> list[str]:
    """The executions ``ctx.next_event_seq`` is asked about, in order."""
    asked: list[str] = []
    real = ctx.next_event_seq

    async def next_event_seq(tenant: str, project: str, execution_id: str, **kw: Any) -> int | None:
        asked.append(execution_id)
        return await real(tenant, project, execution_id, **kw)

    ctx.next_event_seq = next_event_seq  # type: ignore[method-assign]
    return asked


async def request(js: JetStreamContext, topology: Topology, execution_id: str) -> WalEvent:
    env = new_event(tenant=TENANT, project=PROJECT, execution_id=execution_id, type="execution.requested",
                    payload={"playbook": {"path": "demo/two", "version": 1}, "workload": {}})  # fmt: skip
    ack = await Producer(js, topology).publish(env)
    return WalEvent(ack.seq, env)


async def decided(js: JetStreamContext, ctx: ShardContext, execution_id: str) -> list[str]:
    """The types the orchestrator stored for ``execution_id`` (after its request)."""
    types = []
    seq = 0
    while True:
        try:
            msg = await js.get_msg(wal_stream(ctx.shard), seq=seq + 1, next=True,
                                   subject=f"wal.{ctx.shard}.{TENANT}.{PROJECT}.{execution_id}.>")  # fmt: skip
        except Exception:
            return types
        seq = msg.seq or 0
        types.append(msg.subject.split(".", 5)[5])


async def test_a_request_stored_after_the_lease_began_is_planned_without_a_lookup(
    js: JetStreamContext, topology: Topology, ctx: ShardContext
) -> None:
    plugin = OrchestratePlugin()
    asked = counted(ctx)
    before = await request(js, topology, "7100000001")  # in the WAL when the lease's first batch came
    await plugin.handle(ctx, [before])
    after = await request(js, topology, "7100000002")
    await plugin.handle(ctx, [after])
    assert asked == ["7100000001"]
    for execution_id in ("7100000001", "7100000002"):
        types = await decided(js, ctx, execution_id)
        assert types[0] == "execution.requested" and types[-1] == "execution.completed", types
    # A new lease (a new context) forgets: the earlier holder may have decided on what it finds.
    again = context_for(next(m for m in system_manifests() if m.path == "system/orchestrate"), ctx.shard,
                        cache=await KvProjectionCache.open(js, ctx.shard), snapshots=SnapshotStore("file:///nowhere"),
                        js=js, topology=topology)  # fmt: skip
    asked_again = counted(again)
    await OrchestratePlugin().handle(again, [after])
    assert asked_again == ["7100000002"]
    assert (await decided(js, ctx, "7100000002")).count("execution.completed") == 1  # rebuilt, nothing doubled


async def test_a_request_of_a_batch_that_failed_is_looked_up_when_it_comes_again(
    js: JetStreamContext, topology: Topology, ctx: ShardContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = OrchestratePlugin()
    asked = counted(ctx)
    await plugin.handle(ctx, [await request(js, topology, "7100000010")])  # the lease begins
    failing = await request(js, topology, "7100000011")
    real_publish = plugin._publish
    calls = 0

    async def publish_then_fail(*args: Any) -> None:
        nonlocal calls
        calls += 1
        await real_publish(*args)
        if calls == 1:
            raise ConnectionError("the connection dropped after the decisions were stored")

    monkeypatch.setattr(plugin, "_publish", publish_then_fail)
    with pytest.raises(ConnectionError):
        await plugin.handle(ctx, [failing])
    assert asked == ["7100000010"]
    await plugin.handle(ctx, [failing])  # the pump delivers the batch again
    assert asked == ["7100000010", "7100000011"]
    types = await decided(js, ctx, "7100000011")
    assert types.count("command.issued") == 2 and types.count("execution.completed") == 1, types
    later = await request(js, topology, "7100000012")
    await plugin.handle(ctx, [later])  # past the failed batch: no lookup again
    assert asked == ["7100000010", "7100000011"]
