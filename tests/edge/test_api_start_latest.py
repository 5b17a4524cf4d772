"""Starts resolve the latest version from the edge's memory of the catalog, against a real nats-server: a
registration through the same edge is used by its very next start, one through another edge soon after, and
unknown paths and versions are still 404s naming the field."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from starlette.applications import Starlette

from tests.edge.test_api_idempotency import client, two_edges  # noqa: F401 (fixtures)
from tests.edge.test_api_routes import H, assert_problem, base, client_for, register


async def started_version(client: httpx.AsyncClient, **ref: Any) -> int:
    resp = await client.post(base(), json={"playbook": {"path": "demo/etl", **ref}}, headers=H)
    assert resp.status_code == 202, resp.text
    version: int = resp.json()["playbook"]["version"]
    return version


async def test_a_registration_is_used_by_the_next_start_here_and_soon_after_elsewhere(two_edges: list[Starlette]) -> None:
    async with client_for(two_edges[0]) as a, client_for(two_edges[1]) as b:
        await register(a, "demo/etl", 1)
        assert await started_version(a) == 1
        assert await started_version(b) == 1  # both edges now remember version 1
        for version in (2, 3):
            await register(a, "demo/etl", version)
            assert await started_version(a) == version  # the very next start through the same edge
            for _ in range(500):  # through the other edge: as soon as the bucket's stream tells it
                got = await started_version(b)
                if got == version:
                    break
                assert got == version - 1
                await asyncio.sleep(0.01)
            assert got == version


async def test_unknown_paths_and_versions_are_404s_once_the_latest_is_remembered(client: httpx.AsyncClient) -> None:
    await register(client, "demo/etl", 1)
    await register(client, "demo/etl", 3)
    assert await started_version(client) == 3
    assert await started_version(client, version=1) == 1
    assert await started_version(client, version=1) == 1  # a version seen once is known
    body = assert_problem(await client.post(base(), json={"playbook": {"path": "demo/etl", "version": 2}}, headers=H), 404)
    assert body["field"] == "playbook.version"
    assert body["detail"] == "no version 2 of playbook demo/etl in acme/web (the latest is version 3)"
    for ref in ({"path": "demo/nope"}, {"path": "demo/nope", "version": 1}):
        body = assert_problem(await client.post(base(), json={"playbook": ref}, headers=H), 404)
        assert body["field"] == "playbook.path"
        assert body["detail"].startswith("no playbook demo/nope in acme/web: register it first")


async def test_a_repeat_under_a_key_answers_the_first_version_after_a_new_one(client: httpx.AsyncClient) -> None:
    await register(client, "demo/etl", 1)
    headers = {**H, "Idempotency-Key": "nightly-1"}
    first = await client.post(base(), json={"playbook": {"path": "demo/etl"}}, headers=headers)
    assert first.status_code == 202, first.text
    await register(client, "demo/etl", 2)
    again = await client.post(base(), json={"playbook": {"path": "demo/etl"}}, headers=headers)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json() and again.json()["playbook"] == {"path": "demo/etl", "version": 1}
