"""``noetl-edge up`` serves its HTTP edge from a child process (edge/cli/upedge.py) that lives and dies with it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.edge.test_serve import Proc, client_for, procs, start_up  # noqa: F401 (procs: a fixture)


def _children(pid: int) -> dict[int, str]:
    """Child pid → command line (NUL-separated arguments joined by spaces)."""
    out: dict[int, str] = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            out[int(child)] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return out


def _edge_child(up: Proc, http: str) -> int:
    children = _children(up.proc.pid)
    edges = [pid for pid, cmd in children.items() if "edge.cli.upedge" in cmd]
    assert len(edges) == 1, children
    assert f"--bind {http.removeprefix('http://')}" in children[edges[0]]
    return edges[0]


def _gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, waiting for its (dead) parent's reaper
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
async def test_up_serves_http_from_a_child_that_stops_with_it(tmp_path: Path, procs: list[Proc]) -> None:
    up = start_up(procs, tmp_path)
    edge = _edge_child(up.proc, up.http)
    async with client_for(up.http, up.token) as client:
        r = await client.post("/api/v1/tenants/acme/projects/web/executions", json={"workload": {"x": 1}})
        assert r.status_code == 202, r.text
        assert (await client.get(r.headers["location"])).status_code == 200
    assert up.proc.terminate() == 0
    assert _gone(edge), "the edge outlived up's clean stop"


@pytest.mark.slow
def test_a_killed_up_takes_its_edge_along(tmp_path: Path, procs: list[Proc]) -> None:
    up = start_up(procs, tmp_path)
    edge = _edge_child(up.proc, up.http)
    os.kill(up.proc.proc.pid, signal.SIGKILL)
    up.proc.proc.wait(timeout=30)
    assert _gone(edge), "the edge outlived a SIGKILLed up"
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{up.http}/healthz", timeout=5)


@pytest.mark.slow
def test_up_stops_and_fails_when_its_edge_dies(tmp_path: Path, procs: list[Proc]) -> None:
    up = start_up(procs, tmp_path)
    os.kill(_edge_child(up.proc, up.http), signal.SIGKILL)
    assert up.proc.proc.wait(timeout=60) == 1
    assert "the HTTP edge exited (code -9); stopping" in up.proc.stderr()
