"""``noetl-edge replay`` against a real nats-server: golden output of a known history, point-in-time
state against the edge's ``as_of_seq`` at every seq, the options and their errors, a 50,000-event
history with its progress bar on a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import msgspec
import pytest
from nats.js import JetStreamContext
from pyarrow import feather

from edge.app import create_app
from edge.auth import TokenSpec
from edge.cli import main as cli_main
from kernel.producer import Producer
from natscluster.server import EmbeddedServer
from locator import new_event, shard_for
from locator.envelope import Envelope
from locator.subjects import execution_filter
from locator.topology import default_topology
from projector.fold import WalEvent, fold
from projector.snapshots import SnapshotStore
from tests.conftest import cli_env, cli_path
from tests.edge.replay_history import (
    EXECUTION,
    PROJECT,
    TENANT,
    golden_history,
    long_history,
)

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
ADMIN = "tok-admin-replay-51c0"
URN = f"noetl://{TENANT}/{PROJECT}/executions/{EXECUTION}"


async def publish(js: JetStreamContext, events: list[Envelope]) -> list[int]:
    acks = await Producer(js, default_topology()).publish_many(events)
    return [a.seq for a in acks]  # type: ignore[union-attr]


def run_cli(*args: str, url: str, columns: int = 160, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([cli_path(), *args, "--nats-url", url], check=False, capture_output=True, text=True, timeout=120,
                          env=cli_env(COLUMNS=str(columns)))
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def in_process(*args: str) -> tuple[int, str]:
    """The CLI run in this process (fast enough to call hundreds of times); returns (exit code, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main(list(args))
    return code, buf.getvalue()


def golden(name: str, text: str) -> None:
    """Compare with tests/golden/<name> (trailing blanks ignored); NOETL_UPDATE_GOLDEN=1 rewrites it."""
    lines = "\n".join(line.rstrip() for line in text.splitlines()).strip("\n") + "\n"
    path = GOLDEN / name
    if os.environ.get("NOETL_UPDATE_GOLDEN") == "1":
        path.write_text(lines)
    assert lines == path.read_text(), f"output differs from {path}:\n{lines}"


@pytest.fixture
async def known(js: JetStreamContext) -> list[int]:
    return await publish(js, golden_history())


async def test_timeline_table_is_the_golden_one(nats_server: EmbeddedServer, known: list[int]) -> None:
    proc = run_cli("replay", URN, url=nats_server.url)
    golden("replay_timeline.txt", proc.stdout)
    assert "hunter2" not in proc.stdout and proc.stderr == ""


async def test_piped_output_keeps_long_type_names(nats_server: EmbeddedServer, js: JetStreamContext) -> None:
    """``replay … | less`` or ``> file``: no terminal, no COLUMNS; rich's 80 columns would cut the type with '…'."""
    long_type = "user.quarterly_report.export_finished_for_every_region.emea_and_apac_sales"
    note = new_event(tenant=TENANT, project=PROJECT, execution_id=EXECUTION, type=long_type,
                     ts="2026-11-22T08:03:00.000Z", event_id="golden-long-type")
    await publish(js, [*golden_history(), note])
    env = {k: v for k, v in cli_env().items() if k not in ("COLUMNS", "LINES")}
    piped = subprocess.run([cli_path(), "replay", URN, "--nats-url", nats_server.url], capture_output=True, text=True,
                           timeout=120, env=env, check=False)
    assert piped.returncode == 0, piped.stderr
    assert long_type in piped.stdout and "…" not in piped.stdout
    assert "execution.completed" in piped.stdout
    # COLUMNS still rules when it is set: at 80 the type column is cut, as before.
    narrow = run_cli("replay", URN, url=nats_server.url, columns=80)
    assert long_type not in narrow.stdout and "user.quarterl…" in narrow.stdout


async def test_json_output_is_the_golden_one(nats_server: EmbeddedServer, known: list[int]) -> None:
    proc = run_cli("replay", EXECUTION, "--tenant", TENANT, "--project", PROJECT, "--json", "--state", url=nats_server.url)
    doc = json.loads(proc.stdout)
    golden("replay_timeline.json", json.dumps(doc, indent=1, sort_keys=True))
    assert [r["seq"] for r in doc["rows"]] == known
    assert doc["state"]["status"] == "COMPLETED" and doc["state"]["last_seq"] == known[-1]
    # The JSON lines twin: the same rows, one per line, then the state.
    lines = [json.loads(line) for line in run_cli("replay", URN, "--jsonl", "--state", url=nats_server.url).stdout.splitlines()]
    assert lines[:-1] == doc["rows"] and lines[-1] == {"state": doc["state"]}


async def test_until_seq_equals_the_edges_as_of_seq_at_every_seq_of_200_events(
    nats_server: EmbeddedServer, js: JetStreamContext, tmp_path: Path
) -> None:
    mine = long_history(200, execution_id="9001")
    other = long_history(60, execution_id="9002", seed=3)  # the same shard, interleaved: the filter must hold
    mixed = [e for pair in zip(mine, other + [None] * 140, strict=True) for e in pair if e is not None]
    seqs = await publish(js, mixed)
    shard = shard_for(TENANT, PROJECT, "", 4)
    # Poison on the execution's own subject: skipped by replay and by the edge alike.
    await js.publish(f"{execution_filter(shard, TENANT, PROJECT, '9001')[:-1]}user.bad", b"{not json")
    ours = [s for s, e in zip(seqs, mixed, strict=True) if e.execution_id == "9001"]
    assert len(ours) == 200
    # No kernel ever ran: there is no KV entry nor snapshot; the edge serves from the WAL as replay does.
    app = create_app(topology=default_topology(nats_url=nats_server.url), snapshots=SnapshotStore(f"file://{tmp_path}/o"),
                     tokens=[TokenSpec(name="admin", role="admin", tenants=("*",), token=ADMIN)])
    url = f"/api/v1/tenants/{TENANT}/projects/{PROJECT}/executions/9001"
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client:
            for seq in ours:
                code, out = await asyncio.to_thread(in_process, "replay", "9001", "--tenant", TENANT, "--project", PROJECT,
                                                    "--until-seq", str(seq), "--state", "--json",
                                                    "--nats-url", nats_server.url)
                assert code == 0
                doc = json.loads(out)
                resp = await client.get(url, params={"as_of_seq": seq}, headers={"Authorization": f"Bearer {ADMIN}"})
                assert resp.status_code == 200, resp.text
                assert doc["state"] == resp.json(), seq
                assert doc["rows"][-1]["seq"] == seq and doc["state"]["last_seq"] == seq
    finally:
        await app.state.edge.cells.close()
    # And --state each gives, row by row, the same states in one read.
    code, out = await asyncio.to_thread(in_process, "replay", "9001", "--tenant", TENANT, "--project", PROJECT,
                                        "--state", "each", "--jsonl", "--nats-url", nats_server.url)
    states = [json.loads(line)["state"] for line in out.splitlines()]
    events = [WalEvent(s, e) for s, e in zip(seqs, mixed, strict=True) if e.execution_id == "9001"]
    assert states == [msgspec.to_builtins(fold(None, events[: i + 1])) for i in range(200)]


async def test_step_filter_diff_as_of_and_export(nats_server: EmbeddedServer, known: list[int], tmp_path: Path) -> None:
    rows = json.loads(run_cli("replay", URN, "--json", "--step", "load", url=nats_server.url).stdout)["rows"]
    assert {r["step"] for r in rows} == {"load"} and len(rows) == 6
    # Δt stays the time since the execution's previous event, not since the previous row shown.
    assert rows[0]["dt_ms"] == 2
    diff = json.loads(run_cli("replay", URN, "--json", "--diff", str(known[5]), str(known[8]), url=nats_server.url).stdout)
    changes = {c["path"]: (c["before"], c["after"]) for c in diff["diff"]["changes"]}
    assert changes["last_seq"] == (known[5], known[8])
    assert changes["steps.load"][0] is None and changes["steps.load"][1]["status"] == "ERROR"
    table = run_cli("replay", URN, "--diff", str(known[5]), str(known[8]), url=nats_server.url).stdout
    assert "steps.load" in table and f"at {known[8]}" in table
    as_of = json.loads(run_cli("replay", URN, "--json", "--state", "--as-of", "2026-11-22T08:01:00Z", url=nats_server.url).stdout)
    assert [r["seq"] for r in as_of["rows"]] == known[:11] and as_of["state"]["last_seq"] == known[10]
    out = tmp_path / "history.feather"
    proc = run_cli("replay", URN, "--export", str(out), url=nats_server.url)
    table_ = feather.read_table(out)
    assert table_.column("seq").to_pylist() == known
    assert {"seq", "ts", "type", "step", "attempt", "payload", "result_ref"} <= set(table_.column_names)
    assert json.loads(table_.column("payload").to_pylist()[-3])["db_password"] == "***"
    assert table_.column("result_ref").to_pylist()[-2].endswith("/results/load/2")
    assert f"wrote {out} (14 events" in proc.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["replay", "4243", "--tenant", TENANT, "--project", PROJECT], 1, "unknown execution 4243 of golden/replay"),
        (["replay", "4242"], 2, "give a URN"),
        (["replay", "noetl://golden/replay/runs/4242"], 2, "malformed URN path"),
        (["replay", URN, "--tenant", "other"], 2, "--tenant 'other' disagrees with the URN"),
        (["replay", URN, "--diff", "9", "3"], 2, "--diff A B needs 0 <= A <= B"),
        (["replay", URN, "--as-of", "yesterday"], 2, "--as-of must be an ISO 8601 time"),
        (["replay", URN, "--follow", "--json"], 2, "--follow prints events as they come"),
        (["replay", URN, "--against-version", "2"], 2, "--against-version needs --check"),
        (["replay", URN, "--step", "Bad Step!"], 2, "step"),
        (["replay", URN, "--limit", "5"], 1, "would read 14 events, over the limit of 5"),
        (["replay", URN, "--until-seq", "0"], 2, "--until-seq must be >= 1"),
        (["replay", URN, "--export", "/nonexistent-dir/x.feather"], 1, "cannot write /nonexistent-dir/x.feather"),
        (["replay", URN, "--check"], 1, "cannot check against the catalog"),
    ],
)
async def test_bad_input_is_one_line_and_an_exit_code(
    nats_server: EmbeddedServer, known: list[int], args: list[str], code: int, message: str
) -> None:
    proc = run_cli(*args, url=nats_server.url, check=False)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("noetl-edge: error: ") and message in lines[0], proc.stderr
    if code == 2 or "unknown" in message or "limit" in message:
        assert proc.stdout == ""


async def test_follow_prints_new_events_until_ctrl_c(nats_server: EmbeddedServer, js: JetStreamContext, known: list[int]) -> None:
    with subprocess.Popen([cli_path(), "replay", URN, "--follow", "--jsonl", "--nats-url", nats_server.url],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()) as proc:
        try:
            assert proc.stderr is not None and proc.stdout is not None
            assert "following" in proc.stderr.readline()
            later = golden_history()[11]
            more = [msgspec.structs.replace(later, event_id=f"late-{i}", payload={"n": i}) for i in range(3)]
            seqs = await publish(js, more)
            got = [json.loads(proc.stdout.readline()) for _ in range(14 + 3)]
            assert [r["seq"] for r in got] == known + seqs and got[-1]["payload"] == {"n": 2}
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
            assert proc.stderr.read() == ""  # a clean stop: no traceback of a task left behind
        finally:
            proc.kill()


@pytest.fixture
async def fifty_thousand(js: JetStreamContext) -> list[Envelope]:
    events = long_history(50_000, execution_id="7777")
    for i in range(0, len(events), 5000):
        await publish(js, events[i : i + 5000])
    return events


def read_pty(fd: int, proc: subprocess.Popen[bytes], until: Callable[[], bool]) -> bytes:
    data = b""
    while proc.poll() is None or select.select([fd], [], [], 0)[0]:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                data += os.read(fd, 65536)
            except OSError:
                break
    return data


async def test_fifty_thousand_events_replay_with_a_progress_bar(
    nats_server: EmbeddedServer, fifty_thousand: list[Envelope], tmp_path: Path
) -> None:
    main, secondary = pty.openpty()
    out = tmp_path / "out.jsonl"
    with out.open("wb") as stdout:
        proc = subprocess.Popen(
            [cli_path(), "replay", "7777", "--tenant", TENANT, "--project", PROJECT, "--jsonl", "--state",
             "--nats-url", nats_server.url],
            stdout=stdout, stderr=secondary, env=cli_env(COLUMNS="120", TERM="xterm"),
        )
        os.close(secondary)
        try:
            terminal = await asyncio.to_thread(read_pty, main, proc, lambda: False)
            assert proc.wait(timeout=300) == 0, terminal[-2000:]
        finally:
            proc.kill()
            os.close(main)
    text = terminal.decode(errors="replace")
    assert "reading 7777" in text and re.search(r"\d+/50000", text), text[-2000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 50_001
    state = json.loads(lines[-1])["state"]
    assert state["event_count"] == 50_000 and state["status"] == "COMPLETED"
