"""An archived execution reads as it did before it was archived, through every reader of history.

Executions run on a real ``noetl-edge up``; every answer is recorded, the
execution's history is moved to the archive (the same Archiver system/cleanup
runs, called here so that the moment is the test's), its WAL messages are
checked gone, and every answer is asked for again: the projection (also with
``as_of_seq`` at its first, last and two middle seqs), the events page, the timeline, SSE from seq 0,
``replay --json`` and ``replay --check``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from locator.shard import shard_for
from locator.subjects import proj_bucket
from locator.urn import Urn
from projector.archive import Archiver, ArchiveIndex, HistoryArchive, read_stored
from projector.cache import KvProjectionCache
from projector.fold import fold
from projector.projection import canonical
from projector.replay import history
from tests.e2e.conftest import EXAMPLES, SHARDS, Stack, check_invariant, executions_url, wal_events

TENANT = "archived"


async def sse_history(edge: httpx.AsyncClient, url: str, count: int) -> list[tuple[str, str, Any]]:
    """The first ``count`` SSE events (id, event, data) of ``url`` from seq 0."""
    out: list[tuple[str, str, Any]] = []
    async with edge.stream("GET", url + "/stream", timeout=30) as resp:
        assert resp.status_code == 200, await resp.aread()
        fields: dict[str, str] = {}
        async for line in resp.aiter_lines():
            if line == "":
                if "id" in fields:
                    out.append((fields["id"], fields["event"], json.loads(fields["data"])))
                    if len(out) == count:
                        return out
                fields = {}
            elif not line.startswith((":", "retry:")):
                key, _, value = line.partition(": ")
                fields[key] = value
    return out


async def answers(stack: Stack, edge: httpx.AsyncClient, project: str, execution_id: str, seqs: list[int]) -> dict[str, Any]:
    url = executions_url(TENANT, project, execution_id)
    out: dict[str, Any] = {}
    resp = await edge.get(url)
    assert resp.status_code == 200, resp.text
    out["projection"] = resp.json()
    for seq in sorted({seqs[0], seqs[len(seqs) // 3], seqs[2 * len(seqs) // 3], seqs[-1]}):
        resp = await edge.get(url, params={"as_of_seq": seq})
        assert resp.status_code == 200, resp.text
        out[f"as_of_{seq}"] = resp.json()
    pages = []
    after = 0
    while True:
        resp = await edge.get(url + "/events", params={"after_seq": after, "limit": 3})
        assert resp.status_code == 200, resp.text
        pages.append(resp.json())
        if resp.json()["next_after_seq"] is None:
            break
        after = resp.json()["next_after_seq"]
    out["events"] = pages
    resp = await edge.get(url + "/timeline")
    assert resp.status_code == 200, resp.text
    out["timeline"] = resp.json()
    out["sse"] = await sse_history(edge, url, len(seqs))
    urn = str(Urn(TENANT, project, execution_id))
    out["replay"] = json.loads(stack.cli("replay", urn, "--json", "--state", "end").stdout)
    check = stack.cli("replay", urn, "--check", "--json", check=False)
    out["check"] = (check.returncode, json.loads(check.stdout)["check"])
    return out


async def test_an_archived_execution_reads_as_before(stack: Stack, stack_js: JetStreamContext, edge: httpx.AsyncClient) -> None:
    runs = {}
    for name in ("linear", "loop", "big_result"):
        project = f"arch-{name.replace('_', '-')}"
        run = stack.run(EXAMPLES / f"{name}.yaml", TENANT, project)
        assert run.projection is not None and run.projection["status"] == "COMPLETED", run.stderr
        await check_invariant(stack_js, edge, TENANT, project, run.execution_id)
        runs[project] = run.execution_id
    await asyncio.sleep(1.5)  # materialize lingers 1 s: let it point the finished projections at their segments

    before = {}
    for project, execution_id in runs.items():
        seqs = [e.seq for e in await wal_events(stack_js, TENANT, project, execution_id)]
        before[project] = (seqs, await answers(stack, edge, project, execution_id, seqs))

    archive = HistoryArchive.at(f"file://{stack.data_dir.absolute()}/objects")
    for project, execution_id in runs.items():
        shard = shard_for(TENANT, project, "", SHARDS)
        report = await Archiver(stack_js, shard=shard, shard_count=SHARDS, archive=archive).archive_executions([(TENANT, project, execution_id)])
        assert report.executions == 1
        assert await read_stored(stack_js, shard=shard, tenant=TENANT, project=project, execution_id=execution_id) == []
        ref, _ = await ArchiveIndex(stack_js, shard, archive.root).get(execution_id)
        assert ref is not None and ref.count >= len(before[project][0])

    for project, execution_id in runs.items():
        seqs, was = before[project]
        now = await answers(stack, edge, project, execution_id, seqs)
        for key in was:
            assert now[key] == was[key], f"{project}: {key} differs after archiving"
        assert was["check"][0] == 0

    # The KV entries of archived executions are gone: the index of archived executions serves them.
    for project, execution_id in runs.items():
        bucket = proj_bucket(shard_for(TENANT, project, "", SHARDS))
        with pytest.raises(NotFoundError):
            await stack_js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.{execution_id}")

    # A late event re-opens the archived projection (never a fresh one): folded onto it, terminal status kept.
    project, execution_id = next(iter(runs.items()))
    url = executions_url(TENANT, project, execution_id)
    resp = await edge.post(url + "/events", json={"type": "user.late", "payload": {"n": 1}})
    assert resp.status_code == 200, resp.text
    late_seq = resp.json()["acks"][0]["seq"]
    resp = await edge.get(url, params={"min_seq": late_seq})
    assert resp.status_code == 200, resp.text
    was = before[project][1]["projection"]
    served = resp.json()
    assert served["status"] == was["status"] == "COMPLETED" and served["steps"] == was["steps"]
    assert served["event_count"] == was["event_count"] + 1 and served["last_seq"] == late_seq
    shard = shard_for(TENANT, project, "", SHARDS)
    events = [e async for e in history(stack_js, shard=shard, shard_count=SHARDS, tenant=TENANT, project=project,
                                       execution_id=execution_id, archive=archive)]  # fmt: skip
    assert [e.seq for e in events][-1] == late_seq
    assert served == json.loads(canonical(fold(None, events)))  # type: ignore[arg-type]
    # ...and the kernel's KV entry holds the same, folded by system/project onto the archived projection.
    cache = await KvProjectionCache.open(stack_js, shard)
    for _ in range(200):
        entry = await cache.get(execution_id)
        if entry is not None and entry.last_seq == late_seq:
            break
        await asyncio.sleep(0.05)
    assert entry is not None and entry.projection is not None
    assert canonical(entry.projection) == canonical(fold(None, events))  # type: ignore[arg-type]
