"""`noetl-edge history stats` and `history archive --now` as subprocesses, and the /metrics gauges, on a real nats-server."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from edge.app import create_app
from edge.auth import TokenSpec
from kernel.producer import Producer
from natscluster.server import EmbeddedServer, free_port
from locator import new_event, shard_for
from locator.subjects import hist_bucket, wal_consumer, wal_stream, wal_subjects
from locator.topology import Topology, default_topology
from projector.archive import ArchiveIndex, HistoryArchive, read_stored
from projector.replay import history
from projector.snapshots import SnapshotStore

ACME = shard_for("acme", "web", "", 4)
# A second tenant on another shard, so narrowing by --tenant and per-shard figures are both seen.
ZETA = next(t for t in (f"z{n}" for n in range(100)) if shard_for(t, "web", "", 4) != ACME)
ZETA_SHARD = shard_for(ZETA, "web", "", 4)
ENDS = {"1": "execution.completed", "2": "execution.failed", "3": "execution.cancelled", "4": None}


def ev(execution_id: str, type: str, tenant: str = "acme", **kw: Any) -> Any:
    return new_event(tenant=tenant, project="web", execution_id=execution_id, type=type, **kw)


async def publish_executions(js: JetStreamContext, topology: Topology) -> None:
    """acme/web: 1 completed, 2 failed, 3 cancelled, 4 still running; ZETA/web: 5 completed."""
    producer = Producer(js, topology)
    # Interleaved, as executions run: purging the ended ones leaves interior deletes between 4's events.
    for x in ENDS:
        await producer.publish(ev(x, "execution.started"))
    for x in ENDS:
        await producer.publish(ev(x, "step.enter", step="a", attempt=1))
    for x in ENDS:
        await producer.publish(ev(x, "user.note", payload={"n": x}))
    for x, end in ENDS.items():
        if end:
            await producer.publish(ev(x, end))
    await producer.publish(ev("5", "execution.started", tenant=ZETA))
    await producer.publish(ev("5", "execution.completed", tenant=ZETA))


async def server_figures(js: JetStreamContext, shard: int) -> dict[str, int]:
    """The WAL's figures as nats-py reads them from the server (independent of projector.historystats)."""
    info = await js.stream_info(wal_stream(shard))
    listed = await js.stream_info(wal_stream(shard), subjects_filter=f"wal.{shard}.>")
    return {
        "messages": info.state.messages, "bytes": info.state.bytes, "subjects": len(listed.state.subjects or {}),
        "first_seq": info.state.first_seq, "last_seq": info.state.last_seq, "deleted": info.state.num_deleted or 0,
    }  # fmt: skip


def segment_files(objects: Path, shard: int) -> list[Path]:
    directory = objects / "history" / f"shard={shard}"
    return sorted(p for p in directory.glob("*.arrow") if not p.name.startswith(".")) if directory.exists() else []


def stats(cli: Any, url: str, data_dir: Path) -> dict[int, dict[str, Any]]:
    out = json.loads(cli("history", "stats", "--json", "--nats-url", url, "--data-dir", str(data_dir)).stdout)
    assert out["objects_url"] == f"file://{data_dir}/objects"
    return {s["shard"]: s for s in out["shards"]}


async def test_archive_now_moves_ended_executions_and_stats_follow_the_server(
    nats_server: EmbeddedServer, js: JetStreamContext, topology: Topology, tmp_path: Path, cli: Any
) -> None:
    await publish_executions(js, topology)
    objects = tmp_path / "objects"
    archive = HistoryArchive.at(f"file://{objects}")
    before_history = [e async for e in history(js, shard=ACME, shard_count=4, tenant="acme", project="web", execution_id="1")]

    before = stats(cli, nats_server.url, tmp_path)
    assert sorted(before) == [0, 1, 2, 3]
    for shard, s in before.items():
        assert s["wal"] == await server_figures(js, shard)
        assert s["executions_archived"] == 0 and s["hist"] == {"keys": 0, "bytes": 0}
        assert s["history_segments"] == {"objects": 0, "bytes": 0}
    assert (before[ACME]["executions_in_wal"], before[ACME]["ended_in_wal"]) == (4, 3)
    assert before[ACME]["wal"]["subjects"] == 15  # 4 executions x 3 subjects, and 3 terminal ones
    assert (before[ZETA_SHARD]["executions_in_wal"], before[ZETA_SHARD]["ended_in_wal"]) == (1, 1)

    proc = cli("history", "archive", "--now", "--tenant", "acme", "--nats-url", nats_server.url, "--data-dir", str(tmp_path))
    assert proc.stdout == "archived 3 executions, 12 messages, 1 segments\n"

    index = ArchiveIndex(js, ACME, archive.root)
    for x, end in ENDS.items():
        ref, _ = await index.get(x)
        in_wal = await read_stored(js, shard=ACME, tenant="acme", project="web", execution_id=x)
        if end is None:  # still running: untouched
            assert ref is None and len(in_wal) == 3
        else:
            assert ref is not None and ref.count == 4 and in_wal == []
    assert (await ArchiveIndex(js, ZETA_SHARD, archive.root).get("5"))[0] is None  # another tenant: not asked for
    after_history = [e async for e in history(js, shard=ACME, shard_count=4, tenant="acme", project="web",
                                              execution_id="1", archive=archive)]  # fmt: skip
    assert after_history == before_history

    after = stats(cli, nats_server.url, tmp_path)
    for shard, s in after.items():
        assert s["wal"] == await server_figures(js, shard)
        hist = await js.stream_info(f"KV_{hist_bucket(shard)}")
        assert s["hist"]["bytes"] == hist.state.bytes
    acme = after[ACME]
    assert acme["wal"]["messages"] == before[ACME]["wal"]["messages"] - 12
    assert acme["wal"]["subjects"] == 3 and acme["wal"]["last_seq"] == before[ACME]["wal"]["last_seq"]
    assert (acme["executions_in_wal"], acme["ended_in_wal"], acme["executions_archived"]) == (1, 0, 3)
    assert acme["hist"]["keys"] == 1  # the index's manifest: one key whatever the number archived
    [segment] = segment_files(objects, ACME)
    assert acme["history_segments"] == {"objects": 1, "bytes": segment.stat().st_size}
    assert (after[ZETA_SHARD]["executions_in_wal"], after[ZETA_SHARD]["ended_in_wal"]) == (1, 1)

    # Every tenant, as JSON: only ZETA's execution is left to archive.
    summary = json.loads(cli("history", "archive", "--now", "--json", "--nats-url", nats_server.url,
                             "--data-dir", str(tmp_path)).stdout)  # fmt: skip
    assert summary["executions"] == 1 and summary["messages"] == 2 and summary["segments"] == 1
    [zeta] = [s for s in summary["shards"] if s["executions"]]
    assert zeta["shard"] == ZETA_SHARD and zeta["segments"] == [f"file://{segment_files(objects, ZETA_SHARD)[0]}"]

    # A late event of an archived execution stays in the WAL: it has not ended again, so it is not archived again.
    await Producer(js, topology).publish(ev("1", "user.late"))
    again = cli("history", "archive", "--now", "--nats-url", nats_server.url, "--data-dir", str(tmp_path))
    assert again.stdout == "archived 0 executions, 0 messages, 0 segments\n"
    late = await read_stored(js, shard=ACME, tenant="acme", project="web", execution_id="1")
    assert [m.subject for m in late] == [f"wal.{ACME}.acme.web.1.user.late"]
    assert [e.env.type for e in await _history(js, "1", archive)][-2:] == ["execution.completed", "user.late"]


async def test_archive_now_leaves_what_system_project_has_not_folded_and_says_so(
    nats_server: EmbeddedServer, js: JetStreamContext, topology: Topology, tmp_path: Path, cli: Any
) -> None:
    # A stopped kernel's system/project consumer, nothing acked: no KV entry exists, and one could still be
    # written for these events once it runs again, so archiving now would leave that entry behind for good.
    await publish_executions(js, topology)
    stalled = ConsumerConfig(durable_name=wal_consumer("project", ACME), ack_policy=AckPolicy.EXPLICIT,
                             filter_subject=wal_subjects(ACME))  # fmt: skip
    await js.add_consumer(wal_stream(ACME), config=stalled)
    before = await server_figures(js, ACME)
    proc = cli("history", "archive", "--now", "--tenant", "acme", "--nats-url", nats_server.url, "--data-dir", str(tmp_path))
    assert proc.stdout == (
        "archived 0 executions, 0 messages, 0 segments; left 3 not handled by the kernel yet (run it again later)\n"
    )
    assert await server_figures(js, ACME) == before  # nothing purged
    summary = json.loads(cli("history", "archive", "--now", "--tenant", "acme", "--json", "--nats-url", nats_server.url,
                             "--data-dir", str(tmp_path)).stdout)  # fmt: skip
    assert (summary["executions"], summary["left"]) == (0, 3)
    assert [s["left"] for s in summary["shards"] if s["shard"] == ACME] == [3]

    # Acked up to the end (what the kernel does once it folded them): archived on the next run.
    sub = await js.pull_subscribe_bind(wal_consumer("project", ACME), stream=wal_stream(ACME))
    for msg in await sub.fetch(100, timeout=5):
        await msg.ack_sync()
    proc = cli("history", "archive", "--now", "--tenant", "acme", "--nats-url", nats_server.url, "--data-dir", str(tmp_path))
    assert proc.stdout == "archived 3 executions, 12 messages, 1 segments\n"


async def _history(js: JetStreamContext, execution_id: str, archive: HistoryArchive) -> list[Any]:
    return [e async for e in history(js, shard=ACME, shard_count=4, tenant="acme", project="web",
                                     execution_id=execution_id, archive=archive)]  # fmt: skip


async def test_metrics_gauges_report_the_tiers(
    nats_server: EmbeddedServer, js: JetStreamContext, topology: Topology, tmp_path: Path, cli: Any
) -> None:
    await publish_executions(js, topology)
    cli("history", "archive", "--now", "--tenant", "acme", "--nats-url", nats_server.url, "--data-dir", str(tmp_path))
    app = create_app(
        topology=default_topology(nats_url=nats_server.url),
        tokens=[TokenSpec(name="t", role="admin", tenants=("*",), token="x")],
        snapshots=SnapshotStore(f"file://{tmp_path}/objects"),
    )
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
            text = (await client.get("/metrics")).text
    finally:
        await app.state.edge.cells.close()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    [segment] = segment_files(tmp_path / "objects", ACME)
    for shard in range(4):
        figures = await server_figures(js, shard)
        for gauge, key in (("wal_messages", "messages"), ("wal_bytes", "bytes"), ("wal_subjects", "subjects"),
                           ("wal_deleted", "deleted"), ("wal_last_seq", "last_seq")):  # fmt: skip
            assert samples[f'noetl_{gauge}{{shard="{shard}"}}'] == figures[key], (shard, gauge)
        archived = 3 if shard == ACME else 0
        assert samples[f'noetl_history_archived_executions{{shard="{shard}"}}'] == archived
        assert samples[f'noetl_kv_keys{{bucket="hist",shard="{shard}"}}'] == (1 if archived else 0)  # the manifest
        hist = await js.stream_info(f"KV_{hist_bucket(shard)}")
        assert samples[f'noetl_kv_bytes{{bucket="hist",shard="{shard}"}}'] == hist.state.bytes
        assert samples[f'noetl_kv_keys{{bucket="proj",shard="{shard}"}}'] == 0  # no kernel ran
        assert samples[f'noetl_segments{{shard="{shard}",tier="history"}}'] == (1 if shard == ACME else 0)
        assert samples[f'noetl_segment_bytes{{shard="{shard}",tier="history"}}'] == (
            segment.stat().st_size if shard == ACME else 0
        )
        assert samples[f'noetl_segments{{shard="{shard}",tier="snapshot"}}'] == 0
    assert samples[f'noetl_wal_deleted{{shard="{ACME}"}}'] > 0  # the purged histories sat between kept messages


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["history", "stats", "--shards", "0"], "shard_count must be"),
        (["history", "stats", "--shard", "9"], "--shard 9 is out of range"),
        (["history", "archive", "--now", "--shards", "2"], "bootstrapped for 4 shards"),
        (["history", "archive", "--now", "--project", "web"], "--project needs --tenant"),
        (["history", "archive", "--now", "--tenant", "Acme!"], "tenant"),
        (["history", "archive", "--now", "--batch", "0"], "--batch must be"),
        (["history", "archive"], "--now"),
        (["history", "archive", "--now", "--idle", "soon"], "--idle"),
        (["history", "archive", "--now", "--idle", "off"], "--idle needs a duration"),
    ],
)
async def test_bad_input_exits_2_with_one_line_and_changes_nothing(
    nats_server: EmbeddedServer, js: JetStreamContext, topology: Topology, tmp_path: Path, cli: Any,
    args: list[str], message: str,
) -> None:  # fmt: skip
    await publish_executions(js, topology)
    before = [await server_figures(js, shard) for shard in range(4)]
    proc = cli(*args, "--nats-url", nats_server.url, "--data-dir", str(tmp_path), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith(("noetl-edge: error:", "noetl-edge history")), proc.stderr
    assert proc.stdout == ""
    assert [await server_figures(js, shard) for shard in range(4)] == before
    assert not (tmp_path / "objects").exists()


@pytest.mark.parametrize("action", [["stats"], ["archive", "--now"]])
def test_unreachable_nats_exits_1_with_one_line(tmp_path: Path, cli: Any, action: list[str]) -> None:
    port = free_port()
    proc = cli("history", *action, "--nats-url", f"nats://127.0.0.1:{port}", "--data-dir", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("noetl-edge:")]
    assert len(errors) == 1 and errors[0].startswith(f"noetl-edge: error: cannot connect to NATS at nats://127.0.0.1:{port}")
    assert proc.stdout == ""
    assert not os.path.exists(tmp_path / "objects")


def test_a_server_not_bootstrapped_exits_1_naming_the_stream(nats_server: EmbeddedServer, tmp_path: Path, cli: Any) -> None:
    proc = cli("history", "archive", "--now", "--nats-url", nats_server.url, "--data-dir", str(tmp_path), check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "noetl-edge: error: stream WAL_0 does not exist: bootstrap the topology first "
        "(`noetl-edge up` does it, or `noetl-edge cluster bootstrap`)"
    )
    assert proc.stdout == "" and not (tmp_path / "objects").exists()


async def test_archive_now_beside_a_running_cleanup_loses_and_doubles_nothing(
    nats_server: EmbeddedServer, js: JetStreamContext, topology: Topology, tmp_path: Path, cli_command: list[str],
    cli_environ: dict[str, str],
) -> None:  # fmt: skip
    import asyncio

    from kernel.host import context_for, system_manifests
    from kernel.pump import Pump
    from projector.cache import KvProjectionCache
    from system_playbooks.cleanup.plugin import CleanupPlugin, RetentionPolicy

    producer = Producer(js, topology)
    published: dict[str, set[str]] = {}
    envs = []
    for n in range(200):
        x = str(1000 + n)
        envs += [ev(x, "execution.started"), ev(x, "user.note", payload={"n": n}), ev(x, "execution.completed")]
    await producer.publish_many(envs)
    for env in envs:
        published.setdefault(env.execution_id, set()).add(env.event_id)

    snapshots = SnapshotStore(f"file://{tmp_path}/objects")
    manifest = system_manifests(["cleanup"])[0]
    ctx = context_for(manifest, ACME, cache=await KvProjectionCache.open(js, ACME), snapshots=snapshots, js=js,
                      topology=topology)  # fmt: skip
    pump = Pump(js, shard=ACME, shard_count=4, plugin=CleanupPlugin(RetentionPolicy.parse("0.01s")), ctx=ctx,
                consumer="cleanup", fetch_wait=0.2, types=manifest.types, max_batch=5)  # fmt: skip
    stop = asyncio.Event()
    kernel = asyncio.create_task(pump.run(stop))
    try:
        proc = await asyncio.create_subprocess_exec(
            *cli_command, "history", "archive", "--now", "--batch", "10", "--json", "--nats-url", nats_server.url,
            "--data-dir", str(tmp_path), env=cli_environ, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        index = ArchiveIndex(js, ACME, HistoryArchive.at(snapshots.base_url).root)
        for _ in range(600):  # the kernel may still be finishing a batch the command skipped
            refs = [(await index.get(x))[0] for x in published]
            if all(ref is not None for ref in refs):
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(kernel, 15)

    archive = HistoryArchive.at(snapshots.base_url)
    by_command = json.loads(out)["executions"]
    assert 0 <= by_command <= len(published)
    for x, ids in published.items():
        ref, _ = await index.get(x)
        assert ref is not None and ref.count == 3, x
        assert await read_stored(js, shard=ACME, tenant="acme", project="web", execution_id=x) == []
        read = [e.env.event_id for e in await _history(js, x, archive)]
        assert sorted(read) == sorted(ids), x  # each event once: none lost, none doubled


async def test_archive_idle_moves_executions_that_never_ended_and_went_quiet(
    nats_server: EmbeddedServer, js: JetStreamContext, topology: Topology, tmp_path: Path, cli: Any
) -> None:
    """The idle-age rule: a raw stream with no terminal event is archived once it has been quiet long enough."""
    from kernel.host import context_for, system_manifests
    from kernel.pump import Pump
    from projector.cache import KvProjectionCache
    from system_playbooks.project.plugin import ProjectPlugin

    producer = Producer(js, topology)
    old, fresh = "2026-01-01T00:00:00.000Z", None
    for x, ts in (("7", old), ("8", fresh)):  # 7 went quiet long ago; 8 is still talking
        await producer.publish(ev(x, "user.reading", payload={"v": 1}, ts=ts))
        await producer.publish(ev(x, "user.reading", payload={"v": 2}, ts=ts))
    cache = await KvProjectionCache.open(js, ACME)
    manifest = system_manifests(["project"])[0]
    ctx = context_for(manifest, ACME, cache=cache, snapshots=SnapshotStore(f"file://{tmp_path}/objects"))
    pump = Pump(js, shard=ACME, shard_count=4, plugin=ProjectPlugin(), ctx=ctx, consumer="project", fetch_wait=0.2)
    import asyncio

    stop = asyncio.Event()
    task = asyncio.create_task(pump.run(stop))
    try:
        for _ in range(200):
            if [await cache.get(x) for x in ("7", "8")].count(None) == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)

    # Without --idle nothing of them is archived (they never ended).
    plain = json.loads(cli("history", "archive", "--now", "--tenant", "acme", "--json", "--nats-url", nats_server.url,
                           "--data-dir", str(tmp_path)).stdout)
    assert plain["executions"] == 0
    out = json.loads(cli("history", "archive", "--now", "--idle", "1h", "--tenant", "acme", "--json", "--nats-url",
                         nats_server.url, "--data-dir", str(tmp_path)).stdout)
    assert out["executions"] == 1 and out["messages"] == 2
    index = ArchiveIndex(js, ACME, HistoryArchive.at(f"file://{tmp_path}/objects").root)
    assert (await index.get("7"))[0] is not None and (await index.get("8"))[0] is None
    assert await read_stored(js, shard=ACME, tenant="acme", project="web", execution_id="7") == []
    assert len(await read_stored(js, shard=ACME, tenant="acme", project="web", execution_id="8")) == 2
    archive = HistoryArchive.at(f"file://{tmp_path}/objects")
    events = [e async for e in history(js, shard=ACME, shard_count=4, tenant="acme", project="web", execution_id="7",
                                       archive=archive)]
    assert [e.env.payload["v"] for e in events] == [1, 2]
