"""Drift guard: nats-server's own partition() mapping must agree with the locator's shard_for."""

from __future__ import annotations

import asyncio
import json
import random
import string
import subprocess
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from natscluster.server import EmbeddedServer
from locator import shard_for
from locator.subjects import ingest_subject, wal_subject

FIRST = string.ascii_lowercase + string.digits
REST = FIRST + "_-"


def random_name(rng: random.Random) -> str:
    length = rng.choice([1, 2, 5, 12, 30, 63])
    return rng.choice(FIRST) + "".join(rng.choice(REST) for _ in range(length - 1))


def generated_names(count: int, seed: int) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        affinity = "" if i % 2 == 0 else random_name(rng)
        out.append((random_name(rng), random_name(rng), affinity))
    return out


@pytest.mark.parametrize("shard_count", [4, 7])
async def test_server_mapping_routes_like_shard_for(
    nats_server: EmbeddedServer, js: JetStreamContext, shard_count: int
) -> None:
    names = generated_names(240, seed=shard_count)
    assert sum(1 for *_, a in names if a) >= 100 and sum(1 for *_, a in names if not a) >= 100
    # A plain nats-py client, knowing nothing of the topology, publishes to the ingest subjects.
    plain = await nats.connect(nats_server.url)
    try:
        pjs = plain.jetstream()
        futures = []
        for i, (tenant, project, affinity) in enumerate(names):
            subject = ingest_subject(tenant, project, str(i + 1), "user.drift", affinity=affinity)
            futures.append(await pjs.publish_async(subject, b"{}", headers={"Nats-Msg-Id": f"drift-{i}"}))
        acks = await asyncio.gather(*futures)
    finally:
        await plain.close()
    mismatches = []
    for i, ((tenant, project, affinity), ack) in enumerate(zip(names, acks)):
        shard = shard_for(tenant, project, affinity, shard_count)
        if ack.stream != f"WAL_{shard}":
            mismatches.append((tenant, project, affinity, ack.stream, shard))
            continue
        stored = await js.get_msg(ack.stream, ack.seq)
        assert stored.subject == wal_subject(shard, tenant, project, str(i + 1), "user.drift")
    assert mismatches == []
    used = {a.stream for a in acks}
    assert len(used) == shard_count, "the sample should reach every shard"


async def test_plain_client_on_located_subject(
    nats_server: EmbeddedServer, js: JetStreamContext, cli: Any
) -> None:
    out = cli("locate", "--tenant", "acme", "--project", "web", "--affinity", "eu-1")
    located = json.loads(out.stdout)
    plain = await nats.connect(nats_server.url)
    try:
        body = json.dumps({"v": 1, "event_id": "plain-1"}).encode()
        ack = await plain.jetstream().publish(
            f"{located['subject_prefix']}.77.user.from-go", body, headers={"Nats-Msg-Id": "plain-1"}
        )
    finally:
        await plain.close()
    assert ack.stream == located["stream"] == f"WAL_{shard_for('acme', 'web', 'eu-1', 4)}"
    msg = await js.get_msg(ack.stream, ack.seq)
    assert msg.subject == f"wal.{located['shard']}.acme.web.77.user.from-go" and msg.data == body
